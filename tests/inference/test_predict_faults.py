"""A disk that fills up while predict writes: one error line, nothing under a final name."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from typer.testing import CliRunner

from cmdbnet.cli import app


def _small_disk():
    """Files this process writes may not grow past 60 kB: writes then fail as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))


@pytest.mark.parametrize("extra", [[], ["--cog"]])
def test_a_full_disk_leaves_no_output_under_a_final_name(tiny_ckpt, city, tmp_path, extra):
    src = city.write_tif(tmp_path / "scene.tif", 192, 192, seed=1)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cmdbnet", "predict", str(src), "-o", str(out), "-k", str(tiny_ckpt),
           "--tile", "64", "--probs", "--format", "both", "--device", "cpu", *extra]
    res = subprocess.run(cmd, preexec_fn=_small_disk, capture_output=True, text=True, timeout=300)
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert err[-1].startswith("cmdb: error: cannot write") and "disk full" in err[-1], err[-1]
    assert not [line for line in err if "File too large" in line], err  # libtiff's raw _tiffWriteProc line
    assert not out.exists()  # no product, no part, no lock, not even the folder it made


def test_a_full_disk_while_writing_the_mosaic_is_one_line_and_a_rerun_writes_it(tiny_ckpt, city, tmp_path):
    """The masks (about 3.6 kB each) fit under the limit; mosaic.vrt (a colour table: 13 kB) does not."""
    folder = tmp_path / "in"
    folder.mkdir()
    city.write_tif(folder / "a.tif", 64, 64, seed=2)
    city.write_tif(folder / "b.tif", 64, 64, seed=3, corner=(64, 0))
    out = tmp_path / "out"
    args = ["predict", str(folder), "-o", str(out), "-k", str(tiny_ckpt), "--tile", "64", "--device", "cpu"]

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000))

    res = subprocess.run([sys.executable, "-m", "cmdbnet", *args], preexec_fn=limited, capture_output=True,
                         text=True, timeout=300)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("cmdb: error:")]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith(f"cmdb: error: disk full writing {out / 'mosaic.vrt'}"), errors
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.qml", "a_mask.tif", "b_mask.qml", "b_mask.tif",
                                                    "predict_summary.json"]  # each mask with its QGIS style
    summary = json.loads((out / "predict_summary.json").read_text())
    assert summary["mosaic"] is None and "mosaic.vrt" in summary["error"]
    again = CliRunner().invoke(app, args)  # the limit lifted: the masks are skipped, the mosaic written
    assert again.exit_code == 0 and again.stdout.count("skipped") == 2 and (out / "mosaic.vrt").is_file()


def test_resume_predicts_again_an_input_whose_pixels_changed_under_the_same_size_and_mtime(tiny_ckpt, city, tmp_path):
    src = tmp_path / "scene.tif"
    with rasterio.open(src, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(368000.0, 5808000.0, 0.5, 0.5)) as d:  # uncompressed: edits keep the size
        d.write(city.scene(64, 64, seed=1))
    args = ["predict", str(src), "-o", str(tmp_path / "mask.tif"), "-k", str(tiny_ckpt), "--tile", "64",
            "--device", "cpu"]
    assert CliRunner().invoke(app, args).exit_code == 0
    before = src.stat()
    with rasterio.open(src, "r+") as d:  # other pixels, written in place
        d.write(city.scene(64, 64, seed=7))
    os.utime(src, ns=(before.st_atime_ns, before.st_mtime_ns))  # as a copy that keeps times would
    assert (src.stat().st_size, src.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with rasterio.open(tmp_path / "mask.tif") as m:
        old = m.read()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "skipped" not in res.stdout, res.output
    with rasterio.open(tmp_path / "mask.tif") as m:
        assert not np.array_equal(m.read(), old)  # the mask of the new pixels
