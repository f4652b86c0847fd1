"""What predict says besides its outputs: the real scan-backend error, uncut, and one line before a long run."""

from __future__ import annotations

from typer.testing import CliRunner

from cmdbnet.cli import app
from cmdbnet.inference import files
from cmdbnet.models import scan
from cmdbnet.settings import PredictSettings


def test_a_scan_backend_error_is_reported_as_itself_and_whole(tiny_ckpt, city, tmp_path, monkeypatch):
    src = city.write_tif(tmp_path / "scene.tif", 64, 64, seed=1)
    monkeypatch.setenv(scan.BACKEND_ENV, "mamba_ssm")  # not installed here, and CPU tensors
    res = CliRunner().invoke(app, ["predict", str(src), "-o", str(tmp_path / "out"), "-k", str(tiny_ckpt),
                                   "--device", "cpu"])
    (line,) = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and line.startswith("cmdb: error: CMDB_SCAN_BACKEND=mamba_ssm but mamba_ssm cannot "
                                                  "be imported")
    assert "band input" not in line and line.endswith("or set CMDB_SCAN_BACKEND=auto")


def test_a_long_run_is_announced_before_it_starts(tiny_ckpt, city, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(files, "LARGE_RUN_WINDOWS", 2)
    src = city.write_tif(tmp_path / "scene.tif", 64, 96, seed=1)
    files.predict(src, tmp_path / "out", tiny_ckpt, PredictSettings(tile=64, device="cpu"), progress=False)
    assert capsys.readouterr().err.splitlines() == [
        "cmdb: note: 2 windows of 64 x 64 px to predict (0.0 Mpx in 1 file, 1 process)"]
