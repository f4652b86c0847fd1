"""Synthetic scenes: raw layouts and formats, ground truth, reproducibility, learnability."""

from __future__ import annotations

import time

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from typer.testing import CliRunner

from cmdbnet.cli import app
from cmdbnet.data import get_spec, render_scene, synth, tile_plan
from cmdbnet.data.synthetic import boundary_band
from cmdbnet.errors import CmdbError


@pytest.mark.parametrize("name", ["potsdam", "vaihingen"])
def test_three_tiles_fill_train_val_and_test(name):
    spec = get_spec(name)
    plan = tile_plan(spec, 3)
    assert [split for _, split, _ in plan] == ["train", "val", "test"]
    assert plan[1][0] == spec.val_tiles[0] and plan[2][0] == spec.official_test[0]
    ids = [t for t, _, _ in tile_plan(spec, len(spec.official_train) + len(spec.official_test))]
    assert len(set(ids)) == len(ids)
    with pytest.raises(CmdbError, match="official tile ids"):
        tile_plan(spec, len(ids) + 1)


def test_loveda_plan_puts_every_third_tile_in_val():
    plan = tile_plan(get_spec("loveda"), 6)
    assert [s for _, s, _ in plan] == ["train", "val", "train", "train", "val", "train"]
    assert [scene for *_, scene in plan][:2] == ["Urban", "Rural"]


def test_potsdam_download_layout_and_georeferencing(synth_potsdam_raw):
    spec = get_spec("potsdam")
    root = synth_potsdam_raw.root
    assert sorted(p.name for p in root.iterdir()) == ["2_Ortho_RGB", "3_Ortho_IRRG", "4_Ortho_RGBIR",
                                                      "5_Labels_all", "5_Labels_all_noBoundary"]
    tile = synth_potsdam_raw.tiles[0]
    assert tile.images["rgbir"] == root / "4_Ortho_RGBIR" / "top_potsdam_2_10_RGBIR.tif"
    assert tile.eroded_label == root / "5_Labels_all_noBoundary" / "top_potsdam_2_10_label_noBoundary.tif"
    with rasterio.open(tile.images["rgbir"]) as src:
        assert (src.count, src.dtypes[0], src.shape) == (4, "uint8", (256, 256))
        assert src.crs.to_epsg() == spec.crs_epsg == 32633 and src.res == (0.05, 0.05)
        rgbir = src.read()
    with rasterio.open(tile.images["irrg"]) as src:
        np.testing.assert_array_equal(src.read(), rgbir[[3, 0, 1]])  # IRRG = nir, red, green
    with rasterio.open(tile.label) as src:
        colours = src.read()
    np.testing.assert_array_equal(np.moveaxis(colours, 0, -1), np.array(spec.palette, np.uint8)[tile.truth])


def test_eroded_labels_paint_boundaries_black(synth_vaihingen_raw):
    tile = synth_vaihingen_raw.tiles[0]
    with rasterio.open(tile.eroded_label) as src:
        assert src.res == (0.09, 0.09) and src.crs.to_epsg() == 32632
        colours = np.moveaxis(src.read(), 0, -1)
    black = (colours == 0).all(-1)
    np.testing.assert_array_equal(black, boundary_band(tile.truth))
    np.testing.assert_array_equal(black, tile.truth_eroded == 255)
    assert 0.02 < black.mean() < 0.4 and tile.truth.shape == (250, 200)


def test_loveda_layout_is_png_with_index_masks(synth_loveda_raw):
    root = synth_loveda_raw.root
    tile = synth_loveda_raw.tiles[1]
    assert tile.images["rgb"] == root / "Val" / "Rural" / "images_png" / "1.png"
    assert tile.label == root / "Val" / "Rural" / "masks_png" / "1.png"
    mask = np.array(Image.open(synth_loveda_raw.tiles[0].label))
    truth = synth_loveda_raw.tiles[0].truth
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= set(range(8))
    np.testing.assert_array_equal(mask == 0, truth == 255)  # no-data margin
    np.testing.assert_array_equal(mask[truth != 255], truth[truth != 255] + 1)
    assert Image.open(tile.images["rgb"]).mode == "RGB"


def test_every_class_appears_and_scenes_are_reproducible(synth_potsdam_raw, tmp_path):
    counts = np.bincount(np.concatenate([t.truth.ravel() for t in synth_potsdam_raw.tiles]), minlength=6)
    assert (counts[:6] > 0).all() and counts[6:].sum() == 0
    assert counts.max() / counts.sum() < 0.7  # no class swamps the rest
    again = synth("potsdam", tmp_path / "again", tiles=2, size=256, seed=0)
    for a, b in zip(again.tiles, synth_potsdam_raw.tiles):
        np.testing.assert_array_equal(a.truth, b.truth)
        assert a.images["rgb"].read_bytes() == b.images["rgb"].read_bytes()
    other = synth("potsdam", tmp_path / "other", tiles=1, size=256, seed=1)
    assert not np.array_equal(other.tiles[0].truth, again.tiles[0].truth)


def test_refuses_a_non_empty_folder(synth_potsdam_raw):
    with pytest.raises(CmdbError, match="new or empty folder"):
        synth("potsdam", synth_potsdam_raw.root, tiles=1, size=64)


def test_cli_synth_then_prepare(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["synth", "vaihingen", "--out", str(tmp_path / "raw"), "--tiles", "3",
                                 "--size", "128", "--seed", "4", "--json"])
    assert result.exit_code == 0, result.output
    import json

    info = json.loads(result.stdout)
    assert [t["split"] for t in info["tiles"]] == ["train", "val", "test"]
    assert info["tiles"][0]["size"] == [160, 128]
    result = runner.invoke(app, ["prepare", "vaihingen", "-r", str(tmp_path / "raw"), "-o", str(tmp_path / "p"),
                                 "--crop", "64", "--eroded", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["splits"]["val"] == {"tiles": 1, "crops": 6}


@pytest.mark.slow
def test_a_small_cnn_learns_held_out_scenes():
    """Learnable, not noise: a 3-layer CNN trained for seconds on CPU reaches mIoU >= 0.6."""
    spec = get_spec("potsdam")
    rng = np.random.default_rng(0)
    scenes = [render_scene(spec.classes, 192, 192, rng) for _ in range(6)]
    x = torch.tensor(np.stack([s[1][:3] for s in scenes]), dtype=torch.float32) / 255
    y = torch.tensor(np.stack([s[0] for s in scenes]), dtype=torch.long)
    torch.manual_seed(0)

    def block(i, o, d):
        return torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, padding=d, dilation=d), torch.nn.BatchNorm2d(o),
                                   torch.nn.ReLU())

    net = torch.nn.Sequential(block(3, 16, 1), block(16, 16, 2), block(16, 16, 4), torch.nn.Conv2d(16, 6, 1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threads only add contention on a shared CPU
    opt = torch.optim.Adam(net.parameters(), 5e-3)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(150):
        idx = torch.randint(0, 4, (8,), generator=g)
        r, c = torch.randint(0, 192 - 64, (2,), generator=g).tolist()
        loss = torch.nn.functional.cross_entropy(net(x[idx, :, r:r + 64, c:c + 64]), y[idx, r:r + 64, c:c + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    net.eval()
    with torch.no_grad():
        pred, truth = net(x[4:]).argmax(1), y[4:]
    ious = [((pred == k) & (truth == k)).sum().item() / ((pred == k) | (truth == k)).sum().item()
            for k in range(6) if (truth == k).any()]
    print(f"held-out mIoU {np.mean(ious):.3f} after {time.perf_counter() - start:.1f} s of training")
    assert np.mean(ious) >= 0.6
