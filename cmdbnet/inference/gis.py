"""Outputs that GIS tools stream: Cloud-Optimised GeoTIFFs and a VRT mosaic (polygons: ``vector``).

COG: products are written as tiled GeoTIFFs as always, then copied by GDAL's COG driver
(overviews with nearest resampling for class masks and colour renderings, average for
probabilities and boundaries), all before the atomic rename.

VRT: rasterio binds no ``GDALBuildVRT`` (that lives in GDAL's utilities, reached from Python
only through the ``osgeo`` bindings, which need a system GDAL matching rasterio's bundled
one and are not installed here), so the mosaic is written as GDAL's documented VRT XML
with ``xml.etree``: one ``ComplexSource`` per mask (nodata 255 never covers a neighbour),
the colour table copied from the first mask, class names as GDAL category names, and an
``OverviewList`` when the masks have overviews (COGs), as gdalbuildvrt writes, so a reader
zoomed out reads the masks' overviews. Sources are placed on the first mask's pixel grid,
so a rotated or south-up grid keeps its geotransform. The mosaic holds the masks in the
most common CRS (``reference_crs``, the GeoPackage's rule too) on one grid; the others
are left out, with a note.
"""

from __future__ import annotations

import contextlib
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.transform import Affine

from cmdbnet.errors import CmdbError
from cmdbnet.inference.rasters import gdal_reason, quiet_georef
from cmdbnet.inference.resume import blocks_intact
from cmdbnet.utils import write_text_atomic

_OVERVIEW = {"mask": "NEAREST", "color": "NEAREST", "probs": "AVERAGE", "boundary": "AVERAGE"}


def to_cog(src: Path, dst: Path, product: str) -> None:
    """Copy a finished GeoTIFF product to a COG at ``dst`` (see module doc)."""
    opts: dict[str, Any] = dict(driver="COG", BLOCKSIZE=256, COMPRESS="DEFLATE", BIGTIFF="IF_SAFER",
                                OVERVIEW_RESAMPLING=_OVERVIEW.get(product, "NEAREST"))
    if product == "probs":
        opts.update(NBITS=16, PREDICTOR="FLOATING_POINT")
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
    transform: Affine
    width: int
    height: int
    count: int
    dtypes: tuple[str, ...]
    nodata: float | None
    overviews: tuple[int, ...]

    @classmethod
    def read(cls, path: Path) -> _Meta:
        with quiet_georef(), rasterio.open(path) as s:
            return cls(path, s.crs, s.transform, s.width, s.height, s.count, tuple(s.dtypes), s.nodata,
                       tuple(s.overviews(1)))


def reference_crs(paths: list[Path]) -> Any | None:
    """The CRS most rasters share (a tie: the first raster's); None when none has a CRS.

    One rule for the mosaic and the GeoPackage: rasters in another CRS, or in none while
    others have one, are left out of both (their masks are still written).
    """
    groups: list[list[Any]] = []
    for p in paths:
        with quiet_georef(), rasterio.open(p) as src:
            crs = src.crs
        if crs is None:
            continue
        group = next((g for g in groups if g[0] == crs), None)
        if group:
            group[1] += 1
        else:
            groups.append([crs, 1])
    return max(groups, key=lambda g: g[1])[0] if groups else None


def same_crs(wkt: str | None, ref: Any | None) -> bool:
    """Whether a raster's CRS (WKT or None) is ``reference_crs``'s."""
    if wkt is None or ref is None:
        return wkt is None and ref is None
    return CRS.from_wkt(wkt) == ref


def _colortable(band: ET.Element, path: Path) -> None:
    with contextlib.suppress(ValueError, RasterioError), quiet_georef(), rasterio.open(path) as src:
        cmap = src.colormap(1)
        ET.SubElement(band, "ColorInterp").text = "Palette"
        table = ET.SubElement(band, "ColorTable")
        for i in range(max(cmap) + 1):
            c = cmap.get(i, (0, 0, 0, 0))
            ET.SubElement(table, "Entry", c1=str(c[0]), c2=str(c[1]), c3=str(c[2]), c4=str(c[3]))


def write_vrt(paths: list[Path], out: Path, categories: tuple[str, ...] = ()) -> tuple[Path | None, list[str]]:
    """Mosaic ``paths`` in the most common CRS into the VRT ``out``; returns notes on the rest.

    ``categories``: class names of a one-band class mask (GDAL category names).
    """
    metas = [_Meta.read(p) for p in paths]
    crs = reference_crs(paths)
    if crs is None:  # PNG/JPEG inputs: nothing to place on a map
        return None, []
    ref = next(m for m in metas if m.crs == crs)
    notes: list[str] = []
    kept: list[_Meta] = []
    for m in metas:
        why = _mismatch(m, ref)
        if why:
            notes.append(f"VRT mosaic: {m.path.name} {why}; left out of {out.name} (its mask is written; the "
                         "mosaic holds the CRS most masks share)")
        else:
            kept.append(m)
    write_text_atomic(out, _vrt_xml(kept, ref, out, categories))
    return out, notes


def _mismatch(m: _Meta, ref: _Meta) -> str:
    """Why raster ``m`` cannot join a mosaic laid out like ``ref`` ("" when it can)."""
    if m.crs is None:
        return f"has no CRS (most rasters are in {ref.crs.to_string()})"
    if m.crs != ref.crs:
        return f"is in {m.crs.to_string()}, not {ref.crs.to_string()}"
    t, r = m.transform, ref.transform
    if not np.allclose([t.a, t.b, t.d, t.e], [r.a, r.b, r.d, r.e], rtol=1e-9):
        return "has another pixel size or rotation (a VRT mosaic holds one grid)"
    if (m.count, m.dtypes) != (ref.count, ref.dtypes):
        return "has another band layout"
    return ""


def _vrt_xml(kept: list[_Meta], ref: _Meta, out: Path, categories: tuple[str, ...] = ()) -> str:
    """Placement on ``ref``'s pixel grid, so rotated and south-up grids keep their geotransform."""
    to_grid = ~ref.transform
    offsets = [tuple(round(v) for v in to_grid * (m.transform.c, m.transform.f)) for m in kept]
    c0, r0 = min(o[0] for o in offsets), min(o[1] for o in offsets)
    c1 = max(o[0] + m.width for o, m in zip(offsets, kept))
    r1 = max(o[1] + m.height for o, m in zip(offsets, kept))
    g = ref.transform * Affine.translation(c0, r0)
    root = ET.Element("VRTDataset", rasterXSize=str(c1 - c0), rasterYSize=str(r1 - r0))
    ET.SubElement(root, "SRS", dataAxisToSRSAxisMapping="1,2").text = ref.crs.to_wkt()
    ET.SubElement(root, "GeoTransform").text = ", ".join(repr(float(v)) for v in (g.c, g.a, g.b, g.f, g.d, g.e))
    for b in range(1, ref.count + 1):
        band = ET.SubElement(root, "VRTRasterBand", dataType=_gdal_type(ref.dtypes[b - 1]), band=str(b))
        if ref.nodata is not None:
            ET.SubElement(band, "NoDataValue").text = repr(float(ref.nodata))
        if ref.count == 1:
            _colortable(band, ref.path)
            if categories:
                names = ET.SubElement(band, "CategoryNames")
                for name in categories:
                    ET.SubElement(names, "Category").text = name
        for m, (col, row) in zip(kept, offsets):
            src = ET.SubElement(band, "ComplexSource")
            ET.SubElement(src, "SourceFilename", relativeToVRT="1").text = os.path.relpath(m.path, out.parent)
            ET.SubElement(src, "SourceBand").text = str(b)
            ET.SubElement(src, "SrcRect", xOff="0", yOff="0", xSize=str(m.width), ySize=str(m.height))
            ET.SubElement(src, "DstRect", xOff=str(col - c0), yOff=str(row - r0),
                          xSize=str(m.width), ySize=str(m.height))
            if m.nodata is not None:
                ET.SubElement(src, "NODATA").text = repr(float(m.nodata))
    factors = sorted({f for m in kept for f in m.overviews})
    if factors:  # as gdalbuildvrt: readers zoomed out use the sources' overviews
        ET.SubElement(root, "OverviewList", resampling="nearest").text = " ".join(map(str, factors))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def _gdal_type(dtype: str) -> str:
    return {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "float32": "Float32"}.get(dtype, "Byte")
