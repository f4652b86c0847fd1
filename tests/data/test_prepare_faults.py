"""``prepare`` under faults: NaN pixels get an explicit policy; SIGKILL leaves no workers running."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio

from cmdbnet.data.dataset import PreparedDataset
from cmdbnet.data.preparation import PrepareWarning, prepare
from cmdbnet.errors import CmdbError
from cmdbnet.settings import load_settings
from cmdbnet.training.setup import settings_for_data


def _float_raw(synth_potsdam_raw, dst: Path, tiles: int = 2, dtype: str = "float32", scale: float = 1.0) -> Path:
    """Potsdam RGB tiles as float32 (or another type, times ``scale``), as some pipelines export them."""
    for tile in synth_potsdam_raw.tiles[:tiles]:
        for src in (tile.images["rgb"], tile.label):
            target = dst / src.relative_to(synth_potsdam_raw.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
        image = dst / tile.images["rgb"].relative_to(synth_potsdam_raw.root)
        with rasterio.open(image) as s:
            profile, array = s.profile, (s.read() * scale).astype(dtype)
        profile.update(dtype=dtype)
        with rasterio.open(image, "w", **profile) as d:
            d.write(array)
    return dst


def test_nan_pixels_become_ignore_and_are_reported(synth_potsdam_raw, tmp_path):
    raw = _float_raw(synth_potsdam_raw, tmp_path / "raw")
    image = next(raw.rglob("*2_10_RGB.tif"))
    with rasterio.open(image, "r+") as d:
        a = d.read()
        a[1, 5:7, 9:11] = np.nan  # 4 NaN pixels in one band
        a[:, 200, 3] = np.inf
        d.write(a)
    with pytest.warns(PrepareWarning, match=r"5 NaN/inf pixel\(s\) in 1 image.*labelled ignore \(255\)"):
        manifest = prepare("potsdam", raw, tmp_path / "out", crop=128, progress=False)
    assert manifest["nonfinite_pixels"]["total"] == 5
    assert manifest["nonfinite_pixels"]["images"] == {str(image): 5}
    ds = PreparedDataset(tmp_path / "out", "train", transform=lambda image, mask: {"image": image, "mask": mask})
    for i in range(len(ds)):
        item = ds[i]
        assert torch_finite(item["image"])
    first = ds[ds.stems.index(next(s for s in ds.stems if s.endswith("00000_00000")))]
    assert (first["label"][5:7, 9:11] == 255).all() and (first["image"][:, 5:7, 9:11] == 0).all()


def torch_finite(t) -> bool:
    return bool(np.isfinite(t.numpy()).all())


def _children(pid: int) -> set[int]:
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its exit status is left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_prepare_leaves_no_worker_running(synth_potsdam_raw, tmp_path):
    out = tmp_path / "out"
    code = (f"from cmdbnet.data.preparation import prepare\n"
            f"prepare('potsdam', {str(synth_potsdam_raw.root)!r}, {str(out)!r}, crop=32, stride=16, "
            f"workers=2, progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: set[int] = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        workers |= _children(proc.pid)
        if len(workers) >= 2 and out.is_dir() and any(out.rglob("*.tif")):
            break
        time.sleep(0.05)
    assert proc.poll() is None and len(workers) >= 2, "prepare finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)], "pool workers outlived prepare"
    counted = sum(1 for _ in out.rglob("*"))
    time.sleep(1.0)
    assert sum(1 for _ in out.rglob("*")) == counted, "files still appear after the kill"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrepareWarning)
        manifest = prepare("potsdam", synth_potsdam_raw.root, out, crop=32, stride=16, progress=False)
    assert not [p for p in out.rglob(".*.part*")]
    assert sum(len(v) for v in manifest["crops"].values()) == sum(1 for _ in out.rglob("images/*.tif"))


def test_uint16_data_gets_its_own_statistics(synth_potsdam_raw, tmp_path):
    raw = _float_raw(synth_potsdam_raw, tmp_path / "raw", dtype="uint16", scale=100.0)
    manifest = prepare("potsdam", raw, tmp_path / "out", crop=128, progress=False)
    train_image = next(raw.rglob("*2_10_RGB.tif"))  # the one training tile of the two
    with rasterio.open(train_image) as src:
        pixels = src.read().reshape(3, -1).astype(np.float64)
    np.testing.assert_allclose(manifest["mean"], pixels.mean(1), rtol=1e-4)
    np.testing.assert_allclose(manifest["std"], pixels.std(1), rtol=1e-4)
    settings = load_settings(None, {"data": {"prepared": tmp_path / "out"}})
    assert settings_for_data(settings, manifest).data.mean == manifest["mean"]
    custom = load_settings(None, {"data": {"prepared": tmp_path / "out", "mean": [1, 2, 3], "std": [4, 5, 6]}})
    assert settings_for_data(custom, manifest).data.mean == [1, 2, 3]
    with pytest.raises(CmdbError, match="uint16 pixels, but data.mean/data.std are 8-bit"):
        settings_for_data(settings, {k: v for k, v in manifest.items() if k not in ("mean", "std")})


def _file_size_limit(limit: int):
    """For a child process: files it writes may not grow past ``limit`` bytes (writes then fail with
    EFBIG, as on a full disk, instead of SIGXFSZ killing it)."""
    import resource

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_stops_prepare_with_one_line_and_a_rerun_finishes(synth_potsdam_raw, prepared_potsdam, tmp_path):
    """An image crop (3 x 128 x 128 bytes of pixels) no longer fits: GDAL fails at its final flush."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cmdbnet", "prepare", "potsdam", "-r", str(synth_potsdam_raw.root), "-o", str(out),
           "--crop", "128", "--workers", "0"]
    res = subprocess.run(cmd, preexec_fn=_file_size_limit(3 * 128 * 128), capture_output=True, text=True,
                         timeout=120)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("cmdb: error:")]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("cmdb: error: disk full writing ") and "images" in errors[0]
    assert [p for p in out.rglob("*") if p.is_file()] == []  # no crop, part, done marker or manifest
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    crops = sorted(p.relative_to(out) for p in out.rglob("*.tif"))
    assert crops == sorted(p.relative_to(prepared_potsdam) for p in prepared_potsdam.rglob("*.tif"))
    assert all((out / c).read_bytes() == (prepared_potsdam / c).read_bytes() for c in crops)
