"""Bad input to ``cmdb prepare``: one clear line, non-zero exit, no traceback, nothing half-written."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from typer.testing import CliRunner

from cmdbnet.cli import app
from cmdbnet.data.registry import get_spec


@pytest.fixture
def raw(synth_potsdam_raw, tmp_path) -> Path:
    """Two Potsdam tiles (train 2_10 and val 2_12), RGB and labels, in the download layout."""
    dst = tmp_path / "raw"
    for tile in synth_potsdam_raw.tiles[:2]:
        for src in (tile.images["rgb"], tile.label, tile.eroded_label):
            target = dst / src.relative_to(synth_potsdam_raw.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    return dst


def image_of(raw: Path, tile_id: str = "2_12") -> Path:
    return raw / "2_Ortho_RGB" / f"top_potsdam_{tile_id}_RGB.tif"


def label_of(raw: Path, tile_id: str = "2_12") -> Path:
    return raw / "5_Labels_all" / f"top_potsdam_{tile_id}_label.tif"


def write(path: Path, array: np.ndarray) -> None:
    """Overwrite a raw file with ``array`` (C, H, W), without georeferencing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        _write(path, array)


def _write(path: Path, array: np.ndarray) -> None:
    with rasterio.open(path, "w", driver="GTiff", height=array.shape[1], width=array.shape[2],
                       count=array.shape[0], dtype=array.dtype) as dst:
        dst.write(array)


def run_prepare(raw: Path, out: Path, *extra: str) -> str:
    """Run the command, check the error contract, return the one stderr line."""
    result = CliRunner().invoke(app, ["prepare", "potsdam", "--root", str(raw), "--out", str(out),
                                      "--crop", "128", *extra])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cmdb: error: "), result.stderr
    assert "Traceback" not in result.output
    if out.is_dir():
        assert not (out / "manifest.json").exists()
        assert not [p for p in out.rglob("*") if ".part" in p.name]
    return lines[0]


def crops_of(out: Path, tile_id: str) -> list[Path]:
    return [p for p in out.rglob("*.tif") if f"_{tile_id}_" in p.name]


def test_missing_root(tmp_path):
    assert "raw folder not found" in run_prepare(tmp_path / "nope", tmp_path / "out")


def test_empty_folders(tmp_path):
    (tmp_path / "raw" / "2_Ortho_RGB").mkdir(parents=True)
    (tmp_path / "raw" / "5_Labels_all").mkdir()
    line = run_prepare(tmp_path / "raw", tmp_path / "out")
    assert "no ISPRS Potsdam RGB images found" in line and "top_potsdam_2_10_RGB.tif" in line


def test_image_without_its_label(raw, tmp_path):
    label_of(raw).unlink()
    line = run_prepare(raw, tmp_path / "out")
    assert "image without its label" in line and "top_potsdam_2_12_label.tif" in line


def test_image_label_size_mismatch(raw, tmp_path):
    write(label_of(raw), np.full((3, 200, 256), 255, np.uint8))
    assert "size mismatch" in run_prepare(raw, tmp_path / "out")


@pytest.mark.parametrize("keep", [300, 0.8])
def test_corrupt_or_truncated_tiff(raw, tmp_path, keep):
    path = image_of(raw)
    data = path.read_bytes()
    path.write_bytes(data[:keep] if isinstance(keep, int) else data[:int(len(data) * keep)])
    out = tmp_path / "out"
    line = run_prepare(raw, out)
    assert str(path) in line and ("corrupt or truncated" in line)
    assert not crops_of(out, "2_12")  # the bad tile leaves no crop behind


def test_label_colour_outside_the_palette(raw, tmp_path):
    path = label_of(raw)
    with rasterio.open(path, "r+") as dst:
        rgb = dst.read()
        rgb[:, 200:203, 10:15] = np.array([12, 34, 56], np.uint8)[:, None, None]  # bottom strip
        dst.write(rgb)
    out = tmp_path / "out"
    line = run_prepare(raw, out)
    assert str(path) in line and "colour (12, 34, 56)" in line and "(15 px)" in line
    assert not crops_of(out, "2_12")  # its top strip had been cut, then removed


def test_full_labels_with_black_suggest_eroded(raw, tmp_path):
    shutil.copy2(raw / "5_Labels_all_noBoundary" / "top_potsdam_2_12_label_noBoundary.tif", label_of(raw))
    line = run_prepare(raw, tmp_path / "out")
    assert "colour (0, 0, 0)" in line and "--eroded" in line


@pytest.mark.parametrize("array, message", [
    (np.zeros((2, 256, 256), np.uint8), "2 band(s)"),
    (np.zeros((3, 256, 256), np.int32), "unsupported data type int32"),
])
def test_unsupported_band_count_or_dtype(raw, tmp_path, array, message):
    write(image_of(raw), array)
    assert message in run_prepare(raw, tmp_path / "out")


def test_crop_larger_than_the_tile(raw, tmp_path):
    line = run_prepare(raw, tmp_path / "out", "--crop", "300")
    assert "smaller than the crop 300" in line and "top_potsdam_2_10_RGB.tif" in line


def test_output_folder_that_cannot_be_written(raw, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert "cannot write to output folder" in run_prepare(raw, blocker / "out")
    assert "output is not a folder" in run_prepare(raw, blocker)


def test_bad_flag_values_are_one_line_each(raw, tmp_path):
    line = run_prepare(raw, tmp_path / "out", "--bands", "rgbi")
    assert line.startswith("cmdb: error: settings: data.bands")


def test_loveda_mask_value_outside_the_classes(synth_loveda_raw, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(synth_loveda_raw.root, raw)
    mask = raw / "Val" / "Rural" / "masks_png" / "1.png"
    from PIL import Image

    values = np.array(Image.open(mask))
    values[:4, :4] = 9
    Image.fromarray(values).save(mask)
    result = CliRunner().invoke(app, ["prepare", "loveda", "-r", str(raw), "-o", str(tmp_path / "o"), "--crop", "128"])
    assert result.exit_code == 2 and "value 9 is not in the LoveDA palette (16 px)" in result.stderr


def test_console_script_prints_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cmdbnet", "prepare", "vaihingen", "--root", str(tmp_path),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "no ISPRS Vaihingen IRRG images found" in proc.stderr
    assert get_spec("vaihingen").label_folders[0] in proc.stderr
