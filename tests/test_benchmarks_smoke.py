"""The GPU check and the launch counter, at tiny shapes on CPU, so neither rots before a GPU arrives."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CMDB_SCAN_BACKEND", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# earlier results\n")
    parts = "a,b,g,k,c,d,e,f"  # o (ONNX) and x (ablation) are their own scripts' code, tested there
    _run("gpu.py", "--smoke", "--parts", parts, "--results", str(results))
    text = results.read_text()
    assert text.startswith("# earlier results\n")
    assert f"## GPU check: `python benchmarks/gpu.py --smoke --parts {parts}`" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert {r.split("|")[1].strip() for r in rows[1:]} >= {"a", "b", "g", "k", "c", "d", "e", "f"}
    assert "FAILED" not in text
    errors = {m[0]: float(m[1]) for m in re.findall(r"\| a \| `(\w+)` vs CPU chunked scan.*?\| ([0-9.e+-]+) \|", text)}
    assert set(errors) == {"native", "torch", "torch_parallel", "triton"}  # triton through its interpreter
    assert all(e <= 1e-4 for e in errors.values()), errors


@pytest.mark.slow
def test_launch_counter_smoke():
    out = _run("launches.py", "--smoke").stdout
    totals = [int(t.replace(",", "")) for t in re.findall(r"\*\*([\d,]+)\*\*", out)]
    assert len(totals) == 3 and totals[0] > totals[1] > totals[2] > 1000  # torch, torch_parallel, triton
    assert "torch_parallel: total" in out and "triton: total" in out


# python -c BLOCKED gpu.py ARGS: the script with rasterio, albumentations and pydantic unimportable
BLOCKED = """
import importlib.abc, runpy, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"rasterio", "albumentations", "pydantic", "pydantic_settings"}:
            raise ImportError(name + " is blocked here")
sys.meta_path.insert(0, Blocked())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_gpu_check_scan_parts_run_without_rasterio_albumentations_pydantic(tmp_path):
    """The scan parts need torch and cmdbnet.models alone; the parts that need the blocked packages
    each leave a FAILED row naming the import, the others still run, and the file is written."""
    results = tmp_path / "RESULTS.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CMDB_SCAN_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", BLOCKED, str(ROOT / "benchmarks" / "gpu.py"), "--smoke",
                           "--parts", "c,a,g,e", "--results", str(results)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # parts failed, said so
    text = results.read_text()
    errors = {m[0]: float(m[1]) for m in re.findall(r"\| a \| `(\w+)` vs CPU chunked scan.*?\| ([0-9.e+-]+) \|", text)}
    assert set(errors) >= {"torch", "torch_parallel", "triton"} and max(errors.values()) <= 1e-4, text
    assert re.search(r"\| g \| Triton grid, stage 1-4.*\| 32 -> 640 programs", text), text
    for part in "ce":
        assert re.search(rf"\| {part} \| FAILED \| ImportError: (pydantic|rasterio)\w* is blocked here", text), text


def test_a_part_that_fails_keeps_its_rows_whatever_its_message(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    gpu = importlib.import_module("gpu")

    def part(ctx):
        yield "first", "1", "", None
        raise RuntimeError("")  # no message: the old handler died on it with IndexError

    monkeypatch.setitem(sys.modules, "fake_part", types.SimpleNamespace(part=part))
    monkeypatch.setitem(gpu.PARTS, "x", ("fake_part:part", 1, "fake"))
    table = gpu.Table(smoke=True)
    gpu.run_part("x", None, table)
    assert table.rows == [("x", "first", "1", "", ""), ("x", "FAILED", "RuntimeError", "", "")] and table.failed
