"""Polygon labels (GeoPackage, Shapefile, GeoJSON, FlatGeobuf...) rasterised on each image's grid.

Why here and not a pre-processing step: users' labels are usually a QGIS layer in some other
CRS than the imagery; burning it by hand per image (``gdal_rasterize``) is where pixel grids,
CRSs and class codes go wrong. The layer is read once through pyogrio (GDAL/OGR), its class
field mapped through the dataset YAML, invalid geometries repaired (``shapely.make_valid``,
counted in the notes), reprojected to each image's CRS, and each image keeps only the
polygons over it (an image with none is left out). Crops are burnt window by window with
``rasterio.features.rasterize``: a pixel takes the class of the polygon covering its centre;
where polygons overlap the class listed first in ``priority`` wins (it is burnt last).
Needs the ``gis`` extra (pyogrio, shapely).
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import rasterio.features
import rasterio.warp
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import CRSError

from cmdbnet.data.raw import RawTile, open_raster
from cmdbnet.data.registry import DatasetSpec, VectorLabels
from cmdbnet.errors import CmdbError

GIS_HINT = "vector labels need the gis extra: pip install 'cmdbnet[gis]' (pyogrio and shapely)"


def require_gis() -> None:
    missing = [m for m in ("pyogrio", "shapely") if importlib.util.find_spec(m) is None]
    if missing:
        raise CmdbError(f"{GIS_HINT}; missing: {', '.join(missing)}")


@dataclass
class Layer:
    """The polygons of a label layer with their class indices, in the layer's CRS."""

    path: Path
    crs: str | None
    geoms: np.ndarray  # shapely geometries
    classes: np.ndarray  # class index per geometry
    notes: list[str] = field(default_factory=list)
    _by_crs: dict = field(default_factory=dict)


def read_layer(v: VectorLabels, classes: tuple[str, ...]) -> Layer:
    """Read, map and repair every feature of the layer; one clear error for a bad field or value."""
    require_gis()
    import pyogrio
    import shapely

    path = Path(v.path)
    if not path.exists():
        raise CmdbError(f"vector labels not found: {path}")
    try:
        info = pyogrio.read_info(str(path), layer=v.layer)
        if v.field not in list(info["fields"]):
            raise CmdbError(f"{path}: class field {v.field!r} missing; the layer's fields: "
                            f"{', '.join(map(str, info['fields'])) or 'none'}")
        meta, _, wkb, data = pyogrio.raw.read(str(path), layer=v.layer, columns=[v.field])
    except CmdbError:
        raise
    except Exception as exc:  # pyogrio raises DataSourceError, DataLayerError, ... (all GDAL's words)
        raise CmdbError(f"cannot read vector labels {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    values = np.asarray([_text(x) for x in data[0]], dtype=object)
    keep = np.asarray([g is not None for g in wkb], bool)
    values, geoms = values[keep], shapely.from_wkb(np.asarray(wkb, dtype=object)[keep])
    unknown = sorted({x for x in values if x not in v.values}, key=str)
    if unknown:
        counts = {u: int((values == u).sum()) for u in unknown}
        first = max(counts, key=counts.get)
        raise CmdbError(f"{path}: {v.field} value {first!r} ({counts[first]} feature(s)) is not mapped to a class "
                        f"in the dataset YAML" + (f"; {len(unknown) - 1} other unmapped value(s)" if len(unknown) > 1
                                                  else "") + ": add it under the class's values")
    notes = []
    invalid = ~shapely.is_valid(geoms)
    if invalid.any():
        geoms[invalid] = [_polygonal(g) for g in shapely.make_valid(geoms[invalid])]
        notes.append(f"{path}: {int(invalid.sum())} invalid geometr(ies) repaired with make_valid")
    empty = shapely.is_empty(geoms)
    if empty.any():
        notes.append(f"{path}: {int(empty.sum())} empty geometr(ies) skipped")
    crs = meta.get("crs")
    idx = np.array([v.values[x] for x in values[~empty]], np.int64)
    return Layer(path, crs, geoms[~empty], idx, notes)


def read_layer_fields(path: Path, layer: str | None = None, most: int = 64) -> tuple[str, dict, list[str]]:
    """``(class field, {value: features}, every field)`` of a layer: the text field (else any field)
    with the fewest distinct values, for a starter dataset YAML."""
    require_gis()
    import pyogrio

    try:
        info = pyogrio.read_info(str(path), layer=layer)
        fields = [str(f) for f in info["fields"]]
        _, _, _, data = pyogrio.raw.read(str(path), layer=layer, read_geometry=False, columns=fields)
    except Exception as exc:  # pyogrio's errors carry GDAL's words
        raise CmdbError(f"cannot read vector labels {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    if not fields or info["features"] == 0:
        raise CmdbError(f"{path}: the layer has no " + ("fields" if not fields else "features"))
    best = None
    for name, values, dtype in zip(fields, data, info["dtypes"]):
        counts = Counter(_text(x) for x in values if x is not None)
        key = (str(dtype) != "object", len(counts))  # text fields first, then the fewest values
        if 0 < len(counts) <= most and (best is None or key < best[0]):
            best = (key, name, counts)
    if best is None:
        raise CmdbError(f"{path}: no field with 1 to {most} distinct values to take classes from "
                        f"(fields: {', '.join(fields)})")
    return best[1], dict(sorted(best[2].items())), fields


def _text(x) -> str:
    """Field values as the YAML writes them: 3.0 -> "3", bytes decoded."""
    if isinstance(x, bytes):
        x = x.decode("utf-8", "replace")
    if isinstance(x, (float, np.floating)) and float(x).is_integer():
        x = int(x)
    return str(x)


def _polygonal(g):
    """The polygon parts of a repaired geometry (make_valid may add lines and points)."""
    import shapely

    parts = [p for p in shapely.get_parts(g) if p.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def _in_crs(layer: Layer, crs: str | None, image: Path):
    """The layer's geometries in ``crs`` (cached per CRS)."""
    import shapely

    if crs is None or layer.crs is None or crs in layer._by_crs:
        if (crs is None) != (layer.crs is None):
            raise CmdbError(f"{image}: cannot place the polygons of {layer.path}: "
                            + ("the image has no CRS" if crs is None else "the layer has no CRS")
                            + " (assign one, e.g. with gdal_edit.py -a_srs or ogr2ogr -a_srs)")
        return layer._by_crs.get(crs, layer.geoms)
    try:
        src, dst = CRS.from_user_input(layer.crs), CRS.from_user_input(crs)
        if src == dst:
            out = layer.geoms
        else:
            def move(xy: np.ndarray) -> np.ndarray:
                xs, ys = rasterio.warp.transform(src, dst, xy[:, 0], xy[:, 1])
                return np.column_stack([xs, ys])

            out = shapely.transform(layer.geoms, move)
            if not np.isfinite(shapely.bounds(out)).all():
                raise ValueError("coordinates outside the target CRS's domain")
    except (CRSError, ValueError, RuntimeError) as exc:
        raise CmdbError(f"{image}: cannot transform {layer.path} from {layer.crs} to the image's CRS {crs}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'transform failed'}") from None
    layer._by_crs[crs] = out
    return out


def shapes_per_image(spec: DatasetSpec, tiles: list[RawTile]) -> tuple[dict[str, tuple], list[RawTile], list[str]]:
    """``({image path: ((wkb, class), ...) in burn order}, covered tiles, notes)``.

    Tiles are whole images here (before any block split). No polygon over any image is an error.
    """
    import shapely

    v = spec.vector
    assert v is not None
    layer = read_layer(v, spec.classes)
    if not len(layer.geoms):
        raise CmdbError(f"{layer.path}: the layer holds no features")
    rank = {c: i for i, c in enumerate(v.priority)}
    order_key = np.array([-rank.get(int(c), len(rank)) for c in layer.classes])  # lowest priority burnt first
    shapes, covered, uncovered = {}, [], []
    for tile in tiles:
        with open_raster(tile.image, "image") as img:
            crs = img.crs.to_string() if img.crs else None
            bounds = shapely.box(*img.bounds)
        geoms = _in_crs(layer, crs, tile.image)
        hit = np.flatnonzero(shapely.intersects(geoms, bounds))
        if not hit.size:
            uncovered.append(tile.image.name)
            continue
        hit = hit[np.argsort(order_key[hit], kind="stable")]
        shapes[str(tile.image)] = tuple(zip(shapely.to_wkb(geoms[hit]), layer.classes[hit].tolist()))
        covered.append(tile)
    if not covered:
        raise CmdbError(f"{layer.path}: no feature of the layer lies over any image in {spec.images_dir} "
                        f"(layer CRS {layer.crs}); check the CRS and the extent")
    notes = list(layer.notes)
    if uncovered:
        notes.append(f"image(s) without polygons of {layer.path.name}, left out: {', '.join(uncovered)}")
    return shapes, covered, notes


def burn(shapes: tuple, height: int, width: int, transform: Affine, fill: int) -> np.ndarray:
    """(height, width) uint8 class indices of a window whose top-left pixel has ``transform``."""
    import shapely

    if not shapes:
        return np.full((height, width), fill, np.uint8)
    pairs = ((shapely.from_wkb(w), c) for w, c in shapes)
    # GDAL burns in chunks of rows sized by its block cache, going over every polygon per chunk:
    # prepare's tiny cache (rasterio reads its GDAL_CACHEMAX=64 as bytes) makes that about ten
    # times slower; a cache the size of the output gives one chunk (the value is in bytes)
    with rasterio.Env(GDAL_CACHEMAX=max(64 << 20, height * width)):
        return rasterio.features.rasterize(pairs, out_shape=(height, width), transform=transform, fill=fill,
                                           dtype="uint8")
