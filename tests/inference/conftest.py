"""Shared by the city-scale predict tests: generated georeferenced scenes and a tiny checkpoint."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from calibrated import save_calibrated_checkpoint  # noqa: E402 - tests/calibrated.py
from cmdbnet.settings import ModelSettings, Settings

GSD = 0.5
# name, rows, cols, seed, (col, row) of its north-west corner on a shared 0.5 m grid
LAYOUT = [("big", 320, 320, 1, (0, 0)), ("a", 128, 128, 2, (320, 0)), ("b", 96, 160, 3, (320, 128)),
          ("c", 128, 96, 4, (0, 320)), ("d", 160, 128, 5, (96, 320))]


def scene(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([60 * np.sin(rng.uniform(0.01, 0.05) * yy + rng.uniform(0.01, 0.05) * xx + c) for c in range(3)])
    img += 120 + rng.normal(0, 10, img.shape)
    for _ in range(h * w // 3000):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        img[:, y:y + 12, x:x + 12] += rng.uniform(-100, 100, (3, 1, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_tif(path: Path, h: int, w: int, seed: int, corner=(0, 0), crs="EPSG:32633") -> Path:
    transform = from_origin(368000.0 + corner[0] * GSD, 5808000.0 - corner[1] * GSD, GSD, GSD)
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8", crs=crs,
                       transform=transform, tiled=True, blockxsize=64, blockysize=64, compress="deflate") as d:
        d.write(scene(h, w, seed))
    return path


def make_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, h, w, seed, corner in LAYOUT:
        write_tif(folder / f"{name}.tif", h, w, seed, corner)
    return folder


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    settings = Settings(model=ModelSettings(backbone="resnet18", mamba_depths=[1, 1, 1, 1],
                                            mamba_dims=[16, 32, 64, 128], fusion_channels=32, pretrained="off",
                                            drop_path=0.0))
    crops = np.stack([scene(96, 96, seed=10 + i) for i in range(4)])
    return save_calibrated_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", settings, crops)




@pytest.fixture(scope="session")
def city() -> SimpleNamespace:
    """The generators above: ``layout``, ``scene``, ``write_tif``, ``make_folder``, ``gsd``."""
    return SimpleNamespace(layout=LAYOUT, scene=scene, write_tif=write_tif, make_folder=make_folder, gsd=GSD)
