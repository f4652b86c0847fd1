"""Outputs that GIS tools stream: Cloud-Optimised GeoTIFFs, a VRT mosaic, a polygon GeoPackage.

COG: products are written as tiled GeoTIFFs as always, then copied by GDAL's COG driver
(overviews with nearest resampling for class masks and colour renderings, average for
probabilities and boundaries), all before the atomic rename.

VRT: rasterio binds no ``GDALBuildVRT`` (that lives in GDAL's utilities, reached from Python
only through the ``osgeo`` bindings, which need a system GDAL matching rasterio's bundled
one and are not installed here), so the mosaic is written as GDAL's documented VRT XML
with ``xml.etree``: one ``ComplexSource`` per mask (nodata 255 never covers a neighbour),
the colour table copied from the first mask. GDAL (rasterio) opens it as one layer.
Masks in another CRS or pixel size than the first are left out, with a note.

Vector: ``rasterio.features.shapes`` traces each mask; polygons go to one GeoPackage layer
through pyogrio (GDAL/OGR, vectorised: one call per part from WKB arrays, no per-feature
Python objects, and geopandas' default engine). It is the optional extra ``cmdbnet[gis]``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import struct
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.features
import rasterio.shutil
from rasterio.errors import RasterioError

from cmdbnet.errors import CmdbError
from cmdbnet.inference.rasters import NODATA_INDEX, gdal_reason, quiet_georef
from cmdbnet.inference.resume import blocks_intact
from cmdbnet.utils import atomic_path, write_text_atomic

_OVERVIEW = {"mask": "NEAREST", "color": "NEAREST", "probs": "AVERAGE", "boundary": "AVERAGE"}
VECTOR_LAYER = "segments"


def to_cog(src: Path, dst: Path, product: str) -> None:
    """Copy a finished GeoTIFF product to a COG at ``dst`` (see module doc)."""
    opts: dict[str, Any] = dict(driver="COG", BLOCKSIZE=256, COMPRESS="DEFLATE", BIGTIFF="IF_SAFER",
                                OVERVIEW_RESAMPLING=_OVERVIEW.get(product, "NEAREST"))
    if product == "probs":
        opts["NBITS"] = 16
    try:
        with quiet_georef():
            rasterio.shutil.copy(src, dst, **opts)
    except (RasterioError, OSError) as exc:
        raise CmdbError(f"cannot write Cloud-Optimised GeoTIFF in {dst.parent}: {gdal_reason(exc)}") from None
    if not blocks_intact(dst):
        raise CmdbError(f"cannot write Cloud-Optimised GeoTIFF in {dst.parent}: the file is incomplete after "
                        "writing (disk full or quota?); nothing was kept under a final name")


@contextlib.contextmanager
def cog_stage(tmp_paths: dict[str, Path]) -> Iterator[dict[str, Path]]:
    """Intermediate GeoTIFF paths to write; on success each is copied as a COG to ``tmp_paths``."""
    inter = {name: p.with_name(p.name[: -len(p.suffix)] + ".gtiff.tif") for name, p in tmp_paths.items()}
    try:
        yield inter
        for name, p in inter.items():
            to_cog(p, tmp_paths[name], name)
    finally:
        for p in inter.values():
            with contextlib.suppress(OSError):
                p.unlink()


# ----------------------------------------------------------------------------- VRT
@dataclass(frozen=True)
class _Meta:
    """What the mosaic needs of one raster (read, then closed: thousands of tiles, few handles)."""

    path: Path
    crs: Any
    transform: Any
    width: int
    height: int
    count: int
    dtypes: tuple[str, ...]
    nodata: float | None

    @classmethod
    def read(cls, path: Path) -> _Meta:
        with quiet_georef(), rasterio.open(path) as s:
            return cls(path, s.crs, s.transform, s.width, s.height, s.count, tuple(s.dtypes), s.nodata)

    @property
    def left_top(self) -> tuple[float, float]:
        return self.transform.c, self.transform.f


def _colortable(band: ET.Element, path: Path) -> None:
    with contextlib.suppress(ValueError, RasterioError), quiet_georef(), rasterio.open(path) as src:
        cmap = src.colormap(1)
        ET.SubElement(band, "ColorInterp").text = "Palette"
        table = ET.SubElement(band, "ColorTable")
        for i in range(max(cmap) + 1):
            c = cmap.get(i, (0, 0, 0, 0))
            ET.SubElement(table, "Entry", c1=str(c[0]), c2=str(c[1]), c3=str(c[2]), c4=str(c[3]))


def write_vrt(paths: list[Path], out: Path) -> tuple[Path | None, list[str]]:
    """Mosaic ``paths`` (same CRS, pixel size, band layout) into the VRT ``out``; returns notes."""
    metas = [_Meta.read(p) for p in paths]
    ref = next((m for m in metas if m.crs is not None), None)
    if ref is None:  # PNG/JPEG inputs: nothing to place on a map
        return None, []
    notes: list[str] = []
    kept: list[_Meta] = []
    for m in metas:
        why = _mismatch(m, ref)
        if why:
            notes.append(f"VRT mosaic: {m.path.name} {why}; left out of {out.name} (its mask is written)")
        else:
            kept.append(m)
    write_text_atomic(out, _vrt_xml(kept, ref, out))
    return out, notes


def _mismatch(m: _Meta, ref: _Meta) -> str:
    """Why raster ``m`` cannot join a mosaic laid out like ``ref`` ("" when it can)."""
    if m.crs is None:
        return "has no CRS"
    if m.crs != ref.crs:
        return f"is in {m.crs.to_string()}, not {ref.crs.to_string()}"
    t, r = m.transform, ref.transform
    if not np.allclose([t.a, t.b, t.d, t.e], [r.a, r.b, r.d, r.e], rtol=1e-9):
        return "has another pixel size or rotation"
    if (m.count, m.dtypes) != (ref.count, ref.dtypes):
        return "has another band layout"
    return ""


def raster_crs(path: Path) -> str | None:
    """The CRS of a raster as WKT (None when it has none)."""
    with quiet_georef(), rasterio.open(path) as src:
        return src.crs.to_wkt() if src.crs else None


def _vrt_xml(kept: list[_Meta], ref: _Meta, out: Path) -> str:
    rx, ry = ref.transform.a, ref.transform.e
    x0 = min(m.left_top[0] for m in kept)
    y0 = max(m.left_top[1] for m in kept)
    x1 = max(m.left_top[0] + m.width * rx for m in kept)
    y1 = min(m.left_top[1] + m.height * ry for m in kept)
    root = ET.Element("VRTDataset", rasterXSize=str(round((x1 - x0) / rx)), rasterYSize=str(round((y1 - y0) / ry)))
    ET.SubElement(root, "SRS", dataAxisToSRSAxisMapping="1,2").text = ref.crs.to_wkt()
    ET.SubElement(root, "GeoTransform").text = ", ".join(repr(float(v)) for v in (x0, rx, 0.0, y0, 0.0, ry))
    for b in range(1, ref.count + 1):
        band = ET.SubElement(root, "VRTRasterBand", dataType=_gdal_type(ref.dtypes[b - 1]), band=str(b))
        if ref.nodata is not None:
            ET.SubElement(band, "NoDataValue").text = repr(float(ref.nodata))
        if ref.count == 1:
            _colortable(band, ref.path)
        for m in kept:
            src = ET.SubElement(band, "ComplexSource")
            ET.SubElement(src, "SourceFilename", relativeToVRT="1").text = os.path.relpath(m.path, out.parent)
            ET.SubElement(src, "SourceBand").text = str(b)
            ET.SubElement(src, "SrcRect", xOff="0", yOff="0", xSize=str(m.width), ySize=str(m.height))
            ET.SubElement(src, "DstRect", xOff=str(round((m.left_top[0] - x0) / rx)),
                          yOff=str(round((m.left_top[1] - y0) / ry)), xSize=str(m.width), ySize=str(m.height))
            if m.nodata is not None:
                ET.SubElement(src, "NODATA").text = repr(float(m.nodata))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def _gdal_type(dtype: str) -> str:
    return {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "float32": "Float32"}.get(dtype, "Byte")


# -------------------------------------------------------------------------- vector
def have_vector_library() -> bool:
    return importlib.util.find_spec("pyogrio") is not None


def check_vector(path: Path | None, wanted: list[str] | None, classes: tuple[str, ...]) -> list[int]:
    """Class ids to polygonise; fails early on a bad path, an unknown class or no pyogrio."""
    if path is None:
        if wanted:
            raise CmdbError("--vector-classes needs --vector FILE.gpkg")
        return []
    if path.suffix.lower() != ".gpkg":
        raise CmdbError(f"--vector {path}: the polygon file must be a GeoPackage (.gpkg)")
    if not have_vector_library():
        raise CmdbError("--vector needs pyogrio: pip install 'cmdbnet[gis]'")
    if not wanted:
        return list(range(len(classes)))
    lower = {c.lower(): i for i, c in enumerate(classes)}
    bad = [c for c in wanted if c.lower() not in lower]
    if bad:
        raise CmdbError(f"--vector-classes: unknown class {bad[0]!r}; this checkpoint has {', '.join(classes)}")
    return sorted({lower[c.lower()] for c in wanted})


def _ring_area(ring: list) -> float:
    xy = np.asarray(ring, dtype=np.float64)
    return 0.5 * float(np.dot(xy[:-1, 0], xy[1:, 1]) - np.dot(xy[1:, 0], xy[:-1, 1]))


def _wkb_polygon(rings: list) -> bytes:
    parts = [struct.pack("<BII", 1, 3, len(rings))]
    for ring in rings:
        xy = np.asarray(ring, dtype="<f8")
        parts.append(struct.pack("<I", len(xy)) + xy.tobytes())
    return b"".join(parts)


def polygonise(mask_path: Path, class_ids: list[int], classes: tuple[str, ...]) -> dict[str, Any]:
    """Polygons of the wanted classes of one mask: WKB, class, area (CRS units^2), source name."""
    out: dict[str, list] = {"wkb": [], "class": [], "class_id": [], "area": []}
    with quiet_georef(), rasterio.open(mask_path) as src:
        mask = src.read(1)
        crs = src.crs.to_wkt() if src.crs else None
        wanted = np.isin(mask, class_ids) & (mask != NODATA_INDEX)
        for geom, value in rasterio.features.shapes(mask, mask=wanted, transform=src.transform):
            rings = geom["coordinates"]
            area = abs(_ring_area(rings[0])) - sum(abs(_ring_area(r)) for r in rings[1:])
            out["wkb"].append(_wkb_polygon(rings))
            out["class"].append(classes[int(value)])
            out["class_id"].append(int(value))
            out["area"].append(area)
    out["source"] = [mask_path.name] * len(out["wkb"])
    return {"crs": crs, **out}


def write_polygons(path: Path, parts: list[dict[str, Any]], crs: str | None, append: bool = False) -> int:
    """Append polygon sets (from ``polygonise``) to the GeoPackage layer ``segments``."""
    import pyogrio.raw

    geometry = np.array([w for p in parts for w in p["wkb"]], dtype=object)
    fields = ["source", "class", "class_id", "area"]
    data = [np.array([v for p in parts for v in p["source"]], dtype=object),
            np.array([v for p in parts for v in p["class"]], dtype=object),
            np.array([v for p in parts for v in p["class_id"]], dtype=np.int32),
            np.array([v for p in parts for v in p["area"]], dtype=np.float64)]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "'crs' was not provided")  # PNG/JPEG inputs: pixel coordinates
            pyogrio.raw.write(str(path), geometry, data, fields, layer=VECTOR_LAYER, driver="GPKG",
                              geometry_type="Polygon", crs=crs, append=append)
    except Exception as exc:  # noqa: BLE001 - pyogrio's errors (DataSourceError, OSError, ...) share no base
        raise CmdbError(f"cannot write polygons to {path}: {str(exc).splitlines()[0][:200]}") from None
    return len(geometry)


def merge_polygon_parts(parts: list[Path], final: Path, crs: str | None) -> int:
    """One GeoPackage from the ranks' parts, written under a temporary name, then renamed."""
    import pyogrio.raw

    total = 0
    with atomic_path(final) as tmp:
        tmp.unlink()
        for part in parts:
            meta, _, geometry, data = pyogrio.raw.read(str(part), layer=VECTOR_LAYER)
            cols = dict(zip(meta["fields"], data))
            part_set = {"wkb": list(geometry), "source": list(cols["source"]), "class": list(cols["class"]),
                        "class_id": list(cols["class_id"]), "area": list(cols["area"])}
            total += write_polygons(tmp, [part_set], crs, append=tmp.exists())
        if not tmp.exists():
            write_polygons(tmp, [{"wkb": [], "source": [], "class": [], "class_id": [], "area": []}], crs)
    return total
