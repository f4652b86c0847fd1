"""``--vector``: the masks' polygons in one GeoPackage layer, ``segments``.

``rasterio.features.shapes`` traces each mask in pixel space; rings go to WKB with numpy
and to GDAL/OGR through pyogrio (one call per part from WKB arrays, no per-feature Python
objects). It is the optional extra ``cmdbnet[gis]``.

- ``area`` is the shoelace area in pixel units (exact: vertices are whole pixel corners)
  times the pixel's area, not the shoelace on map coordinates, which loses the digits of
  a small polygon to the size of UTM eastings and northings.
- A mask without any georeferencing is traced as QGIS draws it: pixel size (1, -1), so a
  polygon lies on its mask at y = -row.
- New files are GeoPackage 1.2 (GDAL 3.8+ would write 1.4, which GDAL 3.6-3.7 reject or
  only partly support).
- An existing GeoPackage keeps its other layers: the run works on a copy of it, replaces
  ``segments`` there and renames the copy over the file, so a failure leaves the user's file
  as it was. A file that is not a GeoPackage, or whose ``segments`` layer cmdb did not
  write, is refused.
"""

from __future__ import annotations

import importlib.util
import shutil
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.features
from rasterio.transform import Affine

from cmdbnet.errors import CmdbError
from cmdbnet.inference.rasters import NODATA_INDEX, quiet_georef
from cmdbnet.utils import atomic_path

VECTOR_LAYER = "segments"
FIELDS = ("source", "class", "class_id", "area")
GPKG_VERSION = "1.2"
QGIS_NO_GEOTRANSFORM = Affine(1.0, 0.0, 0.0, 0.0, -1.0, 0.0)


def have_vector_library() -> bool:
    return importlib.util.find_spec("pyogrio") is not None


def check_vector(path: Path | None, wanted: list[str] | None, classes: tuple[str, ...]) -> list[int]:
    """Class ids to polygonise; fails early on a bad path or file, an unknown class or no pyogrio."""
    if path is None:
        if wanted:
            raise CmdbError("--vector-classes needs --vector FILE.gpkg")
        return []
    if path.suffix.lower() != ".gpkg":
        raise CmdbError(f"--vector {path}: the polygon file must be a GeoPackage (.gpkg)")
    if not have_vector_library():
        raise CmdbError("--vector needs pyogrio: pip install 'cmdbnet[gis]'")
    if path.exists():
        _check_existing(path)
    if not wanted:
        return list(range(len(classes)))
    lower = {c.lower(): i for i, c in enumerate(classes)}
    bad = [c for c in wanted if c.lower() not in lower]
    if bad:
        raise CmdbError(f"--vector-classes: unknown class {bad[0]!r}; this checkpoint has {', '.join(classes)}")
    return sorted({lower[c.lower()] for c in wanted})


def _check_existing(path: Path) -> None:
    """An existing ``--vector`` file must be a GeoPackage whose ``segments`` layer (if any) is ours."""
    import pyogrio

    try:
        with open(path, "rb") as f:
            sqlite = f.read(16) == b"SQLite format 3\x00"
        layers = [str(name) for name, _ in pyogrio.list_layers(path)] if sqlite else None
    except Exception:  # noqa: BLE001 - OSError, pyogrio's DataSourceError: both mean "not readable as GPKG"
        layers = None
    if layers is None:
        raise CmdbError(f"--vector {path} exists and is not a GeoPackage; choose another file name")
    if VECTOR_LAYER in layers:
        fields = set(pyogrio.read_info(path, layer=VECTOR_LAYER)["fields"])
        if not set(FIELDS) <= fields:
            raise CmdbError(f"--vector {path} has a layer '{VECTOR_LAYER}' that cmdb did not write "
                            f"(no {', '.join(sorted(set(FIELDS) - fields))} fields); rename that layer "
                            "or choose another file")


def _ring_area(ring: np.ndarray) -> float:
    """Signed shoelace area of a closed ring, relative to its first vertex."""
    xy = ring - ring[0]
    return 0.5 * float(np.dot(xy[:-1, 0], xy[1:, 1]) - np.dot(xy[1:, 0], xy[:-1, 1]))


def _wkb_polygon(rings: list[np.ndarray]) -> bytes:
    parts = [struct.pack("<BII", 1, 3, len(rings))]
    for xy in rings:
        parts.append(struct.pack("<I", len(xy)) + np.ascontiguousarray(xy, dtype="<f8").tobytes())
    return b"".join(parts)


def mask_transform(src) -> Affine:
    """Where a mask's pixels lie on the map: its geotransform, or QGIS's (1, -1) without one."""
    if src.crs is None and src.transform.is_identity:
        return QGIS_NO_GEOTRANSFORM
    return src.transform


def polygonise(mask_path: Path, class_ids: list[int], classes: tuple[str, ...]) -> dict[str, Any]:
    """Polygons of the wanted classes of one mask: WKB, class, area (CRS units^2), source name."""
    out: dict[str, list] = {"wkb": [], "class": [], "class_id": [], "area": []}
    with quiet_georef(), rasterio.open(mask_path) as src:
        mask = src.read(1)
        crs = src.crs.to_wkt() if src.crs else None
        t = mask_transform(src)
        pixel_area = abs(t.a * t.e - t.b * t.d)
        to_map = np.array([[t.a, t.d], [t.b, t.e]])
        offset = np.array([t.c, t.f])
        wanted = np.isin(mask, class_ids) & (mask != NODATA_INDEX)
        for geom, value in rasterio.features.shapes(mask, mask=wanted):  # pixel space: exact corners
            rings = [np.asarray(r, dtype=np.float64) for r in geom["coordinates"]]
            area = abs(_ring_area(rings[0])) - sum(abs(_ring_area(r)) for r in rings[1:])
            out["wkb"].append(_wkb_polygon([r @ to_map + offset for r in rings]))
            out["class"].append(classes[int(value)])
            out["class_id"].append(int(value))
            out["area"].append(area * pixel_area)
    out["source"] = [mask_path.name] * len(out["wkb"])
    return {"crs": crs, **out}


def write_polygons(path: Path, parts: list[dict[str, Any]], crs: str | None, append: bool = False) -> int:
    """Write polygon sets (from ``polygonise``) to the layer ``segments`` (replaced unless ``append``)."""
    import pyogrio.raw

    geometry = np.array([w for p in parts for w in p["wkb"]], dtype=object)
    data = [np.array([v for p in parts for v in p["source"]], dtype=object),
            np.array([v for p in parts for v in p["class"]], dtype=object),
            np.array([v for p in parts for v in p["class_id"]], dtype=np.int32),
            np.array([v for p in parts for v in p["area"]], dtype=np.float64)]
    options = {} if path.exists() else {"dataset_options": {"VERSION": GPKG_VERSION}}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "'crs' was not provided")  # PNG/JPEG inputs: pixel coordinates
            pyogrio.raw.write(str(path), geometry, data, list(FIELDS), layer=VECTOR_LAYER, driver="GPKG",
                              geometry_type="Polygon", crs=crs, append=append, **options)
    except Exception as exc:  # noqa: BLE001 - pyogrio's errors (DataSourceError, OSError, ...) share no base
        raise CmdbError(f"cannot write polygons to {path}: {str(exc).splitlines()[0][:200]}") from None
    return len(geometry)


def merge_polygon_parts(parts: list[Path], final: Path, crs: str | None) -> int:
    """The ranks' parts into ``final``'s layer ``segments``, on a copy renamed over ``final``."""
    import pyogrio.raw

    total = 0
    with atomic_path(final) as tmp:
        tmp.unlink()
        if final.exists():  # the user's other layers travel with the copy
            try:
                shutil.copy2(final, tmp)  # its permissions too
            except OSError as exc:
                raise CmdbError(f"cannot copy {final} to update it: {exc.strerror or exc}") from None
        first = True
        for part in parts:
            meta, _, geometry, data = pyogrio.raw.read(str(part), layer=VECTOR_LAYER)
            cols = dict(zip(meta["fields"], data))
            part_set = {"wkb": list(geometry), **{f: list(cols[f]) for f in FIELDS}}
            total += write_polygons(tmp, [part_set], crs, append=not first)
            first = False
        if first:
            write_polygons(tmp, [{"wkb": [], **{f: [] for f in FIELDS}}], crs)
    return total
