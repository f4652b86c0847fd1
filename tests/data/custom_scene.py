"""Synthetic "own data" for the custom-dataset tests: images, label rasters, polygon layers, YAMLs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import rasterio
import rasterio.features
import rasterio.warp
import yaml
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning

CRS = "EPSG:32633"
COLOURS = [(0, 0, 0), (255, 0, 0), (0, 0, 255)]
NAMES = ["background", "building", "water"]


def truth(h: int, w: int, seed: int, classes: int = 3) -> np.ndarray:
    """(h, w) class indices: background with rectangles and discs of classes 1..classes-1."""
    rng = np.random.default_rng(seed)
    out = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(max(4, h * w // 4000)):
        c = int(rng.integers(1, classes))
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(6, max(8, min(h, w) // 6))
        if rng.random() < 0.5:
            out[max(cy - r, 0):cy + r, max(cx - r, 0):cx + r] = c
        else:
            out[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = c
    return out


def image(t: np.ndarray, bands: int, dtype: str, seed: int) -> np.ndarray:
    """(bands, h, w) pixels whose level depends on the class, plus noise."""
    rng = np.random.default_rng(seed + 100)
    scale = 1000 if dtype == "uint16" else 1 if dtype == "float32" else 40
    base = (t[None].astype(np.float32) + 1) * scale * (1 + np.arange(bands, dtype=np.float32)[:, None, None] / bands)
    return (base + rng.normal(0, scale / 4, base.shape)).clip(0, None).astype(dtype)


def transform(corner=(500_000.0, 5_800_000.0), px: float = 0.5) -> Affine:
    return Affine(px, 0, corner[0], 0, -px, corner[1])


def write_raster(path: Path, array: np.ndarray, crs: str | None = CRS, tf: Affine | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = array if array.ndim == 3 else array[None]
    geo = {"crs": crs, "transform": tf or transform()} if crs else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", height=array.shape[1], width=array.shape[2],
                           count=array.shape[0], dtype=array.dtype, **geo, **kw) as dst:
            dst.write(array)
    return path


def polygonise(t: np.ndarray, tf: Affine, src_crs: str, dst_crs: str, path: Path, field: str = "kind") -> Path:
    """Write the non-background regions of ``t`` as polygons in ``dst_crs`` (a GeoPackage layer)."""
    import pyogrio
    import shapely

    geoms, kinds = [], []
    for geom, value in rasterio.features.shapes(t, mask=t > 0, transform=tf):
        g = rasterio.warp.transform_geom(src_crs, dst_crs, geom) if dst_crs != src_crs else geom
        geoms.append(shapely.to_wkb(shapely.geometry.shape(g)))
        kinds.append(NAMES[int(value)])
    path.parent.mkdir(parents=True, exist_ok=True)
    pyogrio.raw.write(str(path), np.array(geoms, dtype=object), [np.array(kinds, dtype=object)], [field],
                  geometry_type="Polygon", crs=dst_crs, driver="GPKG", layer="labels")
    return path


def write_yaml(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def index_dataset(root: Path, n: int = 3, size: int = 128, bands: int = 3, dtype: str = "uint8",
                  split: dict | None = None) -> tuple[Path, list[np.ndarray]]:
    """Images + single-band labels with raw values 10/20/30 (and 0 = nodata) and their YAML."""
    truths = []
    for i in range(n):
        t = truth(size, size, seed=i)
        raw = np.choose(t, [10, 20, 30]).astype(np.uint8)
        raw[:, :4] = 0  # an unlabelled margin
        pixels = image(t, bands, dtype, i)
        t = t.copy()
        t[:, :4] = 255
        truths.append(t)
        write_raster(root / "images" / f"scene{i}.tif", pixels, tf=transform((500_000.0 + 1000 * i, 5_800_000.0)))
        write_raster(root / "labels" / f"scene{i}.tif", raw, tf=transform((500_000.0 + 1000 * i, 5_800_000.0)))
    doc = {"name": "mine", "images": "images", "labels": "labels",
           "classes": [{"name": n_, "value": v, "color": list(c)} for n_, v, c in zip(NAMES, (10, 20, 30), COLOURS)],
           "ignore": [0]}
    if split:
        doc["split"] = split
    return write_yaml(root / "dataset.yaml", doc), truths
