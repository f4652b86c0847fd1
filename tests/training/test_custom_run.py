"""A user's 4-band uint16 binary dataset from YAML to polygons: prepare, train, evaluate, predict.

Only the dataset YAML and the prepared folder are given: classes, bands, statistics and the
band selection travel through the manifest and the checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from typer.testing import CliRunner

from cmdbnet.cli import app
from cmdbnet.models.cnn import _adapt_stem

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from custom_scene import image, transform, truth, write_raster, write_yaml  # noqa: E402

TINY = ("model:\n  backbone: resnet18\n  pretrained: 'off'\n  mamba_depths: [1, 1, 1, 1]\n"
        "  mamba_dims: [16, 32, 64, 128]\n  fusion_channels: 32\n  d_state: 4\n"
        "train:\n  batch: 2\n  accum: 1\n  amp: false\n  warmup_steps: 1\n  log_images: 0\n  device: cpu\n"
        "data:\n  workers: 0\n  crop: 64\n")


def test_four_band_uint16_binary_end_to_end(tmp_path):
    root = tmp_path / "raw"
    for i in range(3):
        t = truth(64, 64, seed=20 + i, classes=2)
        pixels = np.concatenate([image(t, 4, "uint16", i), np.full((1, 64, 64), 7, np.uint16)])  # 5th band unused
        tf = transform((500_000.0 + 100 * i, 5_800_000.0))
        write_raster(root / "images" / f"s{i}.tif", pixels, tf=tf)
        write_raster(root / "labels" / f"s{i}.tif", t * 255, tf=tf)
    yml = write_yaml(root / "roofs.yaml", {
        "name": "roofs", "images": "images", "labels": "labels", "bands": ["b", "g", "r", "nir", "flag"],
        "classes": [{"name": "background", "value": 0}, {"name": "roof", "value": 255, "color": [250, 0, 0]}],
        "split": {"val": ["s1"], "test": ["s2"]}})
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    prep, run = tmp_path / "prep", tmp_path / "run"
    cli = CliRunner()
    r = cli.invoke(app, ["prepare", str(yml), "--out", str(prep), "--crop", "64", "--bands", "1,2,3,4", "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert (m["band_count"], m["dtype"], m["band_names"], m["classes"]) == (4, "uint16", ["b", "g", "r", "nir"],
                                                                             ["background", "roof"])
    r = cli.invoke(app, ["train", "-c", str(cfg), "--data", str(prep), "--out", str(run), "--max-steps", "2"])
    assert r.exit_code == 0, r.output
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["dataset"]["band_indexes"] == [1, 2, 3, 4] and ckpt["dataset"]["mean"] == m["mean"]
    assert ckpt["settings"]["model"]["in_channels"] == 4 and ckpt["settings"]["model"]["num_classes"] == 2
    r = cli.invoke(app, ["evaluate", str(run), "--data", str(prep), "--split", "test", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    scores = json.loads(r.stdout)
    assert scores["positive_class"]["class"] == "roof"
    assert scores["positive_class"]["iou"] == pytest.approx(scores["per_class"]["roof"]["iou"])
    # the raw 5-band scene: the checkpoint picks bands 1-4 itself
    pyogrio = pytest.importorskip("pyogrio")
    r = cli.invoke(app, ["predict", str(root / "images" / "s2.tif"), "-o", str(tmp_path / "mask.tif"), "-k", str(run),
                         "--device", "cpu", "--tile", "64", "--vector", str(tmp_path / "roofs.gpkg")])
    assert r.exit_code == 0, r.output
    with rasterio.open(tmp_path / "mask.tif") as src:
        assert src.read(1).max() <= 1 and src.crs.to_string() == "EPSG:32633"
        assert tuple(src.colormap(1)[1][:3]) == (250, 0, 0)
    info = pyogrio.read_info(str(tmp_path / "roofs.gpkg"))
    assert info["crs"] == "EPSG:32633"


@pytest.mark.parametrize("bands", [1, 2, 4, 6])
def test_stem_weights_keep_rgb_and_grey_response(bands):
    w = torch.randn(64, 3, 7, 7)
    adapted = _adapt_stem(w, bands)
    assert adapted.shape == (64, bands, 7, 7)
    grey = torch.ones(1, 3, 7, 7)
    torch.testing.assert_close((adapted * grey[:, :1].expand(1, bands, 7, 7)).sum((1, 2, 3)),
                               (w * grey).sum((1, 2, 3)))
    if bands > 3:
        torch.testing.assert_close(adapted[:, :3], w * 3 / bands)
        torch.testing.assert_close(adapted[:, 3], w.mean(1) * 3 / bands)
