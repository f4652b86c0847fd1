"""``cmdb doctor``: the facts it reports follow the dispatch and the environment."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cmdbnet.cli import app
from cmdbnet.models import scan
from cmdbnet.models.scan import dispatch
from cmdbnet.training.console import scan_note


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(scan.BACKEND_ENV, raising=False)
    monkeypatch.setattr(dispatch, "_TRITON_FAILURE", [])
    imports = (dispatch._mamba_ssm_import, dispatch._triton_import)  # the cached originals
    for imp in imports:
        imp.cache_clear()
    yield
    for imp in imports:
        imp.cache_clear()


def _doctor_json() -> dict:
    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_reports_versions_devices_and_backends(monkeypatch):
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)
    report = _doctor_json()
    assert report["torch"] == torch.__version__ and report["cuda"] == torch.version.cuda
    assert report["devices"][0]["device"] == "cpu"
    assert len(report["devices"]) == 1 + (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert report["scan_backend"] == {"cpu": "native", "cuda": "triton"}
    assert report["native_scan"]["ok"] and Path(report["native_scan"]["library"]).is_file()
    assert report["native_scan"]["openmp"] is True  # gcc here has -fopenmp
    assert report["optional"]["triton"]["ok"] and report["optional"]["triton"]["version"]
    mamba = report["optional"]["mamba_ssm"]
    assert not mamba["ok"] and mamba["reason"].startswith(("ModuleNotFoundError", "ImportError"))


def test_without_triton_cuda_gets_the_parallel_scan_and_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)
    monkeypatch.setattr(dispatch, "_triton_import", lambda: (None, "ImportError: DLL load failed"))
    report = _doctor_json()
    assert report["scan_backend"]["cuda"] == "torch_parallel"
    assert report["optional"]["triton"] == {"ok": False, "version": report["optional"]["triton"]["version"],
                                            "reason": "ImportError: DLL load failed"}
    table = CliRunner().invoke(app, ["doctor"]).stdout
    assert "torch_parallel" in table and "DLL load failed" in table


def test_forced_backend_and_a_bad_one(monkeypatch):
    monkeypatch.setenv(scan.BACKEND_ENV, "torch_parallel")
    assert _doctor_json()["scan_backend"] == {"cpu": "torch_parallel", "cuda": "torch_parallel"}
    monkeypatch.setenv(scan.BACKEND_ENV, "fast")
    report = _doctor_json()  # doctor reports the error instead of failing on it
    assert all(v.startswith("error: CMDB_SCAN_BACKEND='fast' is not a scan backend")
               for v in report["scan_backend"].values())


def test_training_start_line_names_the_backend(monkeypatch):
    assert scan_note(torch.device("cpu")) == "selective scan on cpu: native"
    monkeypatch.setenv(scan.BACKEND_ENV, "torch_parallel")
    assert scan_note(torch.device("cpu")) == "selective scan on cpu: torch_parallel"
