"""``prepare``: crop geometry, label fidelity, layouts, resuming; bad input in test_prepare_errors."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from cmdbnet.data import axis_starts, crop_windows, prepare, read_manifest
from cmdbnet.data.preparation import PrepareWarning
from cmdbnet.errors import CmdbError


def offsets(stem: str) -> tuple[int, int]:
    *_, y, x = stem.split("_")
    return int(y), int(x)


def read(path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            return src.read()


def copy_tiles(scenes, dst: Path, n: int | None = None, bands: str = "rgb") -> Path:
    """Copy the first ``n`` tiles (one band choice, all labels) keeping the raw layout."""
    for tile in scenes.tiles[:n]:
        for src in (tile.images[bands], tile.label, tile.eroded_label):
            if src is not None:
                target = dst / src.relative_to(scenes.root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)
    return dst


@pytest.mark.parametrize("length, crop, stride, starts", [
    (256, 128, 128, [0, 128]),
    (250, 128, 128, [0, 122]),  # last crop shifted back to end at the edge
    (250, 128, 100, [0, 100, 122]),
    (256, 128, 64, [0, 64, 128]),
    (128, 128, 128, [0]),
    (6000, 256, 256, list(range(0, 5633, 256)) + [5744]),
])
def test_axis_starts_cover_every_pixel(length, crop, stride, starts):
    assert axis_starts(length, crop, stride) == starts
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + crop] = True
    assert covered.all()


def test_crop_windows_count_for_a_full_potsdam_tile():
    assert len(crop_windows(6000, 6000, 256)) == 24 * 24
    assert len(crop_windows(2500, 2000, 512, 256)) == 9 * 7
    with pytest.raises(ValueError):
        axis_starts(100, 128, 128)


def test_prepared_potsdam_counts_and_manifest(prepared_potsdam, synth_potsdam_raw):
    m = read_manifest(prepared_potsdam)
    assert m["splits"] == {"train": {"tiles": 4, "crops": 16}, "val": {"tiles": 1, "crops": 4},
                           "test": {"tiles": 1, "crops": 4}}
    assert (m["dataset"], m["crop"], m["stride"], m["bands"], m["eroded"]) == ("potsdam", 128, 128, "rgb", False)
    assert (m["band_count"], m["dtype"], m["ignore_index"], m["num_classes"]) == (3, "uint8", 255, 6)
    assert m["palette"][1] == [0, 0, 255] and m["classes"][4] == "car"
    assert m["layout"] == "download" and m["split_policy"]["unlisted_in_train"] == []
    assert m["georeferenced"] and m["crs"] == "EPSG:32633"
    for split, info in m["splits"].items():
        assert sum(m["class_pixels"][split].values()) == info["crops"] * 128 * 128
        for stem in m["crops"][split]:
            assert (prepared_potsdam / split / "images" / f"{stem}.tif").is_file()
            assert (prepared_potsdam / split / "labels" / f"{stem}.tif").is_file()
    for source in m["sources"]:
        path = synth_potsdam_raw.root / source["image"]["path"]
        assert source["image"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not list(prepared_potsdam.rglob("*.part*"))


def test_crops_equal_the_generator_ground_truth_and_source(prepared_potsdam, synth_potsdam_raw):
    m = read_manifest(prepared_potsdam)
    by_key = {t.key("rgb"): t for t in synth_potsdam_raw.tiles}
    for split, stems in m["crops"].items():
        for stem in stems:
            y, x = offsets(stem)
            tile = by_key[stem.rsplit("_", 2)[0]]
            assert tile.split == split
            label = read(prepared_potsdam / split / "labels" / f"{stem}.tif")
            assert label.shape == (1, 128, 128) and label.dtype == np.uint8
            np.testing.assert_array_equal(label[0], tile.truth[y:y + 128, x:x + 128])
            with rasterio.open(tile.images["rgb"]) as src, \
                    rasterio.open(prepared_potsdam / split / "images" / f"{stem}.tif") as crop:
                window = Window(x, y, 128, 128)
                np.testing.assert_array_equal(crop.read(), src.read(window=window))
                t = src.transform  # north-up: the crop's corner is the source pixel (y, x), same pixel size
                assert crop.crs == src.crs and crop.res == src.res
                assert (crop.transform.c, crop.transform.f) == pytest.approx((t.c + x * t.a, t.f + y * t.e))


def test_eroded_vaihingen_maps_black_to_ignore_with_the_edge_rule(synth_vaihingen_raw, tmp_path):
    m = prepare("vaihingen", synth_vaihingen_raw.root, tmp_path / "v", crop=128, stride=100, eroded=True,
                progress=False)
    # 250 x 200 tiles: rows 0, 100, 122 and columns 0, 72
    assert m["splits"] == {"train": {"tiles": 2, "crops": 12}, "val": {"tiles": 1, "crops": 6},
                           "test": {"tiles": 1, "crops": 6}}
    assert m["eroded"] and m["bands"] == "irrg" and m["crs"] == "EPSG:32632"
    tile = synth_vaihingen_raw.tiles[0]
    stems = [s for s in m["crops"]["train"] if s.startswith(tile.key("irrg") + "_")]
    assert sorted(offsets(s) for s in stems) == [(r, c) for r in (0, 100, 122) for c in (0, 72)]
    covered = np.zeros(tile.truth.shape, bool)
    for stem in stems:
        y, x = offsets(stem)
        label = read(tmp_path / "v" / "train" / "labels" / f"{stem}.tif")[0]
        np.testing.assert_array_equal(label, tile.truth_eroded[y:y + 128, x:x + 128])
        covered[y:y + 128, x:x + 128] = True
    assert covered.all()
    ignored = sum(m["class_pixels"][s]["ignored"] for s in m["splits"])
    assert ignored > 0 and (tile.truth_eroded == 255).any() and not (tile.truth == 255).any()


def test_loveda_download_layout_maps_nodata_and_shifts_values(synth_loveda_raw, tmp_path):
    m = prepare("loveda", synth_loveda_raw.root, tmp_path / "l", crop=128, progress=False)
    assert m["layout"] == "split-folders"
    assert m["splits"] == {"train": {"tiles": 3, "crops": 12}, "val": {"tiles": 1, "crops": 4}}
    assert m["georeferenced"] is False and m["band_count"] == 3
    for tile in synth_loveda_raw.tiles:
        key = tile.key("rgb")
        assert key == f"{tile.scene}_{tile.tile_id}"
        for y, x in crop_windows(256, 256, 128):
            label = read(tmp_path / "l" / tile.split / "labels" / f"{key}_{y:05d}_{x:05d}.tif")[0]
            np.testing.assert_array_equal(label, tile.truth[y:y + 128, x:x + 128])
    assert m["class_pixels"]["train"]["ignored"] > 0  # tiles 0 and 2 have a no-data margin
    assert (synth_loveda_raw.tiles[0].truth.max(), synth_loveda_raw.tiles[1].truth.max()) == (255, 6)


def test_loveda_presplit_layout_gives_the_same_crops(synth_loveda_raw, tmp_path):
    raw = tmp_path / "presplit"
    for tile in synth_loveda_raw.tiles:
        for src, kind in ((tile.images["rgb"], "images"), (tile.label, "labels")):
            (raw / tile.split / kind).mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, raw / tile.split / kind / src.name)
    m = prepare("loveda", raw, tmp_path / "out", crop=128, progress=False)
    ref = prepare("loveda", synth_loveda_raw.root, tmp_path / "ref", crop=128, progress=False)
    assert m["splits"] == ref["splits"] and m["class_pixels"] == ref["class_pixels"]
    assert m["crops"]["val"] == [f"1_{y:05d}_{x:05d}" for y, x in crop_windows(256, 256, 128)]


def test_isprs_presplit_layout_keeps_its_folders(synth_potsdam_raw, tmp_path):
    raw = tmp_path / "raw"
    for tile in synth_potsdam_raw.tiles[:3]:
        split = "val" if tile.split == "test" else tile.split  # pre-split layout: train/val only
        for src, folder in ((tile.images["rgb"], "RGB"), (tile.label, "Label")):
            (raw / folder / split).mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, raw / folder / split / src.name)
    m = prepare("potsdam", raw, tmp_path / "out", crop=128, progress=False)
    assert m["layout"] == "presplit"
    assert m["splits"] == {"train": {"tiles": 1, "crops": 4}, "val": {"tiles": 2, "crops": 8}}


def test_rgbir_bands_keep_four_bands(synth_potsdam_raw, tmp_path):
    raw = copy_tiles(synth_potsdam_raw, tmp_path / "raw", 1, bands="rgbir")
    m = prepare("potsdam", raw, tmp_path / "out", crop=128, bands="rgbir", progress=False)
    assert m["band_count"] == 4 and m["band_names"] == ["red", "green", "blue", "nir"]
    stem = m["crops"]["train"][0]
    assert read(tmp_path / "out" / "train" / "images" / f"{stem}.tif").shape == (4, 128, 128)


def test_unlisted_tile_goes_to_train_with_a_warning(synth_potsdam_raw, tmp_path):
    raw = copy_tiles(synth_potsdam_raw, tmp_path / "raw", 1)
    for path in list(raw.rglob("*2_10*")):
        path.rename(path.with_name(path.name.replace("2_10", "9_9")))
    with pytest.warns(PrepareWarning, match="9_9"):
        m = prepare("potsdam", raw, tmp_path / "out", crop=128, progress=False)
    assert m["split_policy"]["unlisted_in_train"] == ["9_9"] and m["splits"]["train"]["tiles"] == 1
    assert any("9_9" in note for note in m["notes"])


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_second_run_is_a_no_op_and_a_changed_tile_is_redone(synth_potsdam_raw, tmp_path):
    raw = copy_tiles(synth_potsdam_raw, tmp_path / "raw", 3)
    out = tmp_path / "out"
    first = prepare("potsdam", raw, out, crop=128, workers=2, progress=False)
    before = _mtimes(out)
    assert prepare("potsdam", raw, out, crop=128, progress=False) == first
    assert _mtimes(out) == before  # nothing rewritten, manifest included

    label = raw / synth_potsdam_raw.tiles[0].label.relative_to(synth_potsdam_raw.root)
    with rasterio.open(label, "r+") as dst:  # paint a building into the first tile's top-left
        rgb = dst.read(window=Window(0, 0, 8, 8))
        rgb[:] = np.array([0, 0, 255], np.uint8)[:, None, None]
        dst.write(rgb, window=Window(0, 0, 8, 8))
    second = prepare("potsdam", raw, out, crop=128, progress=False)
    after = _mtimes(out)
    redone = {k for k in after if after[k] != before.get(k)}
    key = synth_potsdam_raw.tiles[0].key("rgb")
    assert redone and all(key in k or k == "manifest.json" for k in redone)
    assert second["sources"][0]["label"]["sha256"] != first["sources"][0]["label"]["sha256"]


def test_workers_give_the_same_result_as_in_process(synth_potsdam_raw, prepared_potsdam, tmp_path):
    m = prepare("potsdam", synth_potsdam_raw.root, tmp_path / "out", crop=128, workers=2, progress=False)
    ref = read_manifest(prepared_potsdam)
    assert json.dumps(m, sort_keys=True) == json.dumps(ref, sort_keys=True)


def test_other_settings_into_the_same_folder_are_refused(prepared_potsdam, synth_potsdam_raw):
    with pytest.raises(CmdbError, match="crop 128 \\(now 64\\)"):
        prepare("potsdam", synth_potsdam_raw.root, prepared_potsdam, crop=64, progress=False)


def test_clean_layout_has_no_warnings(synth_vaihingen_raw, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrepareWarning)
        prepare("vaihingen", synth_vaihingen_raw.root, tmp_path / "o", crop=128, progress=False)


def test_uint16_imagery_keeps_its_dtype(synth_potsdam_raw, tmp_path):
    raw = copy_tiles(synth_potsdam_raw, tmp_path / "raw", 1)
    image = raw / synth_potsdam_raw.tiles[0].images["rgb"].relative_to(synth_potsdam_raw.root)
    with rasterio.open(image) as src:
        profile, pixels = src.profile, src.read().astype(np.uint16) * 40
    with rasterio.open(image, "w", **{**profile, "dtype": "uint16"}) as dst:
        dst.write(pixels)
    m = prepare("potsdam", raw, tmp_path / "out", crop=128, progress=False)
    assert m["dtype"] == "uint16"
    crop = read(tmp_path / "out" / "train" / "images" / f"{m['crops']['train'][-1]}.tif")
    np.testing.assert_array_equal(crop, pixels[:, 128:, 128:])
