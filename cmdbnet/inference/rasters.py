"""Raster input checks and output products of ``cmdb predict``.

Why a module of its own: what an input must look like (bands, dtype, georeferencing,
nodata) and how outputs are laid out (names, GeoTIFF profiles, colour map, tags) are
decisions a user sees; they are kept apart from the windowing maths in ``sliding.py``.

Products, all tiled (256 x 256) deflate GeoTIFFs with the input's CRS, transform and size:

``mask``      uint8 class index, palette colour map (QGIS shows it coloured), nodata 255
``color``     RGBA uint8 rendering with the dataset palette; alpha 0 on nodata
``probs``     K bands of half floats (stored as GDAL Float32 with NBITS=16, read back as
              float32, floating-point predictor), one band per class, described by class
              name; NaN on nodata
``boundary``  uint8 boundary probability scaled to 0..255, with GDAL scale 1/255 (unscaled
              value = probability); nodata pixels are 0 and flagged in an internal mask band
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from cmdbnet.errors import CmdbError
from cmdbnet.palette import palette_lut
from cmdbnet.settings import PredictSettings
from cmdbnet.utils import broken_link

NODATA_INDEX = 255
RASTER_EXTS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".jp2", ".img", ".vrt", ".bmp", ".gif", ".webp")
OUTPUT_EXTS = (".tif", ".tiff")


@contextlib.contextmanager
def quiet_georef() -> Iterator[None]:
    """Silence rasterio's NotGeoreferencedWarning: PNG/JPEG inputs have no georeferencing by design."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


@dataclass(frozen=True)
class ModelMeta:
    """What a checkpoint says about its inputs and classes (the only source predict trusts)."""

    name: str
    classes: tuple[str, ...]
    palette: np.ndarray  # (K, 3) uint8
    band_count: int
    dtype: str | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    indexes: tuple[int, ...] = ()  # source bands fed to the network when trained on a selection (--bands 4,3,2)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], path: Path) -> ModelMeta:
        ds = ckpt.get("dataset") or {}
        try:
            classes = tuple(str(c) for c in ds["classes"])
            palette = np.asarray(ds["palette"], dtype=np.uint8).reshape(len(classes), 3)
            mean, std = tuple(float(v) for v in ds["mean"]), tuple(float(v) for v in ds["std"])
            bands = int(ds.get("band_count") or len(mean))
        except (KeyError, TypeError, ValueError) as exc:
            raise CmdbError(f"{path}: checkpoint's dataset block is incomplete or malformed ({exc})") from None
        if not (len(mean) == len(std) == bands):
            raise CmdbError(f"{path}: checkpoint has {bands} bands but {len(mean)} means and {len(std)} stds")
        return cls(str(ds.get("name", "unknown")), classes, palette, bands, ds.get("dtype"), mean, std,
                   tuple(int(i) for i in ds.get("band_indexes") or ()))


@dataclass(frozen=True)
class InputInfo:
    """An input raster checked against the checkpoint."""

    path: Path
    width: int
    height: int
    count: int
    indexes: tuple[int, ...]  # bands fed to the network
    georeferenced: bool
    has_mask: bool  # nodata value, internal mask or alpha band present


def expand_inputs(inputs: list[str | os.PathLike]) -> list[Path]:
    """Files, folders (their raster files, not recursive) and glob patterns -> unique files."""
    if not inputs:
        raise CmdbError("no input given")
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            listed = sorted(f for f in p.iterdir() if not f.name.startswith(".") and f.suffix.lower() in RASTER_EXTS)
            for why in filter(None, map(broken_link, listed)):
                warnings.warn(why, UserWarning, stacklevel=2)
            found = [f for f in listed if f.is_file()]
            if not found:
                raise CmdbError(f"no raster files ({', '.join(RASTER_EXTS[:4])}, ...) in folder {p}")
            files.extend(found)
        elif any(ch in str(item) for ch in "*?["):
            found = sorted(Path(f) for f in glob.glob(str(item)) if Path(f).is_file())
            if not found:
                raise CmdbError(f"no file matches {item}")
            files.extend(found)
        else:
            raise CmdbError(broken_link(p).removesuffix("; skipped") or f"input not found: {p}")
    unique: dict[str, Path] = {}
    for f in files:
        unique.setdefault(os.path.realpath(f), f)
    return list(unique.values())


def check_output_outside_inputs(inputs: list[str | os.PathLike], out: str | os.PathLike) -> None:
    """Refuse ``-o`` equal to or inside an input folder: its masks would be inputs of the next run."""
    target = Path(os.path.realpath(out))
    for item in inputs:
        if Path(item).is_dir():
            folder = Path(os.path.realpath(item))
            if target == folder or folder in target.parents:
                where = "is" if target == folder else "is inside"
                raise CmdbError(f"-o {out} {where} the input folder {item}: the masks would be read as inputs "
                                f"by the next run; write them to another folder")


def _base_stem(path: Path) -> str:
    stem = path.stem
    for sfx in ("_mask", "_color"):
        if stem.endswith(sfx) and len(stem) > len(sfx):
            return stem[: -len(sfx)]
    return stem


def wanted_products(s: PredictSettings) -> list[str]:
    out = []
    if s.format in ("index", "both"):
        out.append("mask")
    if s.format in ("color", "both"):
        out.append("color")
    if s.probs:
        out.append("probs")
    if s.boundary:
        out.append("boundary")
    return out


def plan_outputs(files: list[Path], out: str | os.PathLike, s: PredictSettings,
                 overwrite: bool = False) -> list[dict[str, Path]]:
    """Output path of every product of every input; refuses clashes before any work is done.

    One input and ``out`` ending in .tif/.tiff: the first product is ``out`` and the others
    go beside it as ``<stem>_color.tif`` etc. Otherwise ``out`` is a folder holding
    ``<input stem>_<product>.tif``.
    """
    out = Path(out)
    products = wanted_products(s)
    suffix = out.suffix.lower()
    as_file = not out.is_dir() and suffix in OUTPUT_EXTS
    if not out.is_dir() and suffix in RASTER_EXTS and suffix not in OUTPUT_EXTS:
        raise CmdbError(f"output {out} must be a GeoTIFF (.tif) or a folder")
    if as_file and len(files) > 1:
        raise CmdbError(f"{len(files)} inputs need an output folder, but -o {out} names a file")
    plans: list[dict[str, Path]] = []
    for f in files:
        if as_file:
            base = _base_stem(out)
            plan = {p: out.parent / f"{base}_{p}{out.suffix}" for p in products}
            plan[products[0]] = out
        else:
            plan = {p: out / f"{f.stem}_{p}.tif" for p in products}
        plans.append(plan)
    _check_plan(files, plans)
    foreign = [p for plan in plans for p in plan.values() if p.exists() and _foreign(p)]
    if foreign and not overwrite:
        raise CmdbError(f"output {foreign[0]} already exists and was not written by cmdb predict"
                        + (f" ({len(foreign)} such files)" if len(foreign) > 1 else "")
                        + "; choose another -o, or pass --overwrite to replace it")
    return plans


def _foreign(path: Path) -> bool:
    """A raster that is not a product of cmdb predict (no ``software`` tag of ours): a user's image.

    A file that does not open as a raster is not protected: it is what a truncated product of
    ours looks like, and a re-run redoes it.
    """
    try:
        with quiet_georef(), rasterio.open(path) as src:
            return src.tags().get("software") != "cmdbnet"
    except (RasterioError, OSError):
        return False


def _check_plan(files: list[Path], plans: list[dict[str, Path]]) -> None:
    inputs = {os.path.realpath(f): f for f in files}
    seen: dict[str, Path] = {}
    for f, plan in zip(files, plans):
        for path in plan.values():
            real = os.path.realpath(path)
            if real in inputs:
                raise CmdbError(f"output {path} would overwrite input {inputs[real]}; choose another -o")
            if real in seen:
                raise CmdbError(f"inputs {seen[real]} and {f} would both write {path}; "
                                "rename one or predict them into different folders")
            seen[real] = f
            if path.is_dir():
                raise CmdbError(f"output {path} is a folder")
            _check_writable(path.parent)


def _check_writable(folder: Path) -> None:
    """The nearest existing ancestor must be a writable folder (created later, on success only)."""
    p = folder
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if not p.is_dir():
        raise CmdbError(f"cannot write output under {folder}: {p} is not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise CmdbError(f"cannot write output in {folder}: permission denied on {p}")


def gdal_reason(exc: BaseException) -> str:
    """The first line of the innermost cause: GDAL's own words ("Read failed" hides them)."""
    seen = 0
    while (exc.__cause__ or exc.__context__) is not None and seen < 10:
        exc, seen = exc.__cause__ or exc.__context__, seen + 1  # type: ignore[assignment]
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def open_raster(path: Path):
    """Open with rasterio, turning any failure into one line."""
    try:
        with quiet_georef():
            return rasterio.open(path)
    except (RasterioError, OSError) as exc:
        raise CmdbError(f"cannot read raster {path}: {gdal_reason(exc)}") from None


def check_input(path: Path, meta: ModelMeta) -> InputInfo:
    """Open ``path`` and check it against the checkpoint (bands, dtype) before any work."""
    with open_raster(path) as src:
        n, want = src.count, meta.band_count
        interp = list(src.colorinterp)
        if meta.indexes and n >= max(meta.indexes) and n != want:
            indexes = meta.indexes  # the bands it was trained on, picked from the full image
        elif n == want:
            indexes = tuple(range(1, want + 1))
        elif n == want + 1 and interp and interp[-1] == ColorInterp.alpha:
            indexes = tuple(range(1, want + 1))  # last band is alpha: a mask, not data
        else:
            raise CmdbError(f"{path} has {n} band(s) but the checkpoint expects {want} "
                            f"({meta.name}); give a {want}-band image"
                            + (" (an extra band is accepted only when it is an alpha band)" if n == want + 1 else ""))
        dtypes = {src.dtypes[i - 1] for i in indexes}
        if meta.dtype and dtypes != {meta.dtype}:
            got = ", ".join(sorted(dtypes))
            raise CmdbError(f"{path} holds {got} pixels but the network was trained on {meta.dtype}; "
                            f"rescale it first (e.g. gdal_translate -ot Byte -scale {path.name} out.tif "
                            "for 16-bit imagery)")
        georef = src.crs is not None or not src.transform.is_identity or bool(src.gcps[0])
        has_mask = (src.nodata is not None or any(MaskFlags.all_valid not in fl for fl in src.mask_flag_enums))
        return InputInfo(path, src.width, src.height, n, indexes, georef, has_mask)


def _profile(src, info: InputInfo, count: int, dtype: str, **extra: Any) -> dict[str, Any]:
    prof: dict[str, Any] = dict(driver="GTiff", width=info.width, height=info.height, count=count,
                                dtype=dtype, tiled=True, blockxsize=256, blockysize=256,
                                compress="deflate", BIGTIFF="IF_SAFER")
    if info.georeferenced and not (src.gcps[0] and src.transform.is_identity):  # GCP-only: copied later
        prof.update(crs=src.crs, transform=src.transform)
    prof.update(extra)
    return prof


class ProductWriter:
    """Open products (temporary paths) for one input; ``write_strip`` streams finished rows."""

    def __init__(self, src, info: InputInfo, meta: ModelMeta, tmp_paths: dict[str, Path],
                 tags: dict[str, str]):
        self.meta, self.info, self.dst = meta, info, {}
        classes = json.dumps(list(meta.classes))
        common_tags = {**tags, "classes": classes, "dataset": meta.name}
        self.lut = palette_lut(meta.palette, None, alpha=True)
        self.paths = tmp_paths
        try:
            self._open_all(src, info, tmp_paths, common_tags)
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise

    def _open_all(self, src, info: InputInfo, tmp_paths: dict[str, Path], common_tags: dict[str, str]) -> None:
        meta, lut, k = self.meta, self.lut, len(self.meta.classes)
        profiles = {
            "mask": _profile(src, info, 1, "uint8", nodata=NODATA_INDEX, photometric="palette"),
            "color": _profile(src, info, 4, "uint8", photometric="RGB", alpha="YES"),
            "probs": _profile(src, info, k, "float32", nbits=16, nodata=float("nan"), predictor=3),
            "boundary": _profile(src, info, 1, "uint8"),
        }
        descriptions = {"mask": ("class index",), "color": ("red", "green", "blue", "alpha"),
                        "probs": meta.classes, "boundary": ("boundary probability x 255",)}
        with quiet_georef(), self._io("create"):
            for name, path in tmp_paths.items():
                d = self.dst[name] = rasterio.open(path, "w", **profiles[name])
                for b, desc in enumerate(descriptions[name], 1):
                    d.set_band_description(b, desc)
                if name == "mask":
                    d.write_colormap(1, {i: tuple(int(v) for v in lut[i]) for i in range(256)})
                    d.update_tags(1, **{f"class_{i}": c for i, c in enumerate(meta.classes)})
                elif name == "boundary":
                    d.scales, d.offsets = (1 / 255,), (0.0,)  # GDAL's unscaling: value * scale = probability
                d.update_tags(**common_tags, product=name)
                if src.gcps[0] and src.transform.is_identity:
                    d.gcps = src.gcps

    def write_strip(self, row0: int, index: np.ndarray, valid: np.ndarray | None,
                    probs, boundary) -> None:
        """Rows ``[row0, row0 + h)``: ``index`` (h, W) uint8, ``valid`` (h, W) bool or None,
        ``probs`` (K, h, W) and ``boundary`` (h, W) torch tensors (or None)."""
        with self._io("write"):
            self._write(row0, index, valid, probs, boundary)

    @contextlib.contextmanager
    def _io(self, what: str) -> Iterator[None]:
        """A GDAL failure while creating or writing (disk full, quota) is one line, not a traceback."""
        try:
            yield
        except (RasterioError, OSError) as exc:
            where = next(iter(self.paths.values())).parent
            raise CmdbError(f"cannot {what} output in {where}: {gdal_reason(exc)}") from None

    def copy_rows(self, name: str, part, part_row: int, row0: int, h: int) -> None:
        """Rows of an already written product (a band part) into product ``name``, mask included."""
        w = self.info.width
        src_win, win = Window(0, part_row, w, h), Window(0, row0, w, h)
        with self._io("write"):
            d = self.dst[name]
            d.write(part.read(window=src_win), window=win)
            if name == "boundary" and self.info.has_mask:
                d.write_mask(part.read_masks(1, window=src_win), window=win)

    def _write(self, row0: int, index: np.ndarray, valid: np.ndarray | None, probs, boundary) -> None:
        h, w = index.shape
        win = Window(0, row0, w, h)
        if valid is not None:
            index = np.where(valid, index, NODATA_INDEX).astype(np.uint8)
        if "mask" in self.dst:
            self.dst["mask"].write(index, 1, window=win)
        if "color" in self.dst:
            self.dst["color"].write(np.moveaxis(self.lut[index], -1, 0), window=win)
        if "probs" in self.dst:
            p = probs.cpu().numpy()
            if valid is not None:
                p = np.where(valid[None], p, np.nan)
            self.dst["probs"].write(p.astype(np.float32), window=win)
        if "boundary" in self.dst:
            b = np.rint(boundary.clamp(0, 1).mul(255).cpu().numpy()).astype(np.uint8)
            d = self.dst["boundary"]
            if valid is not None:
                d.write(np.where(valid, b, 0), 1, window=win)
                d.write_mask(np.where(valid, 255, 0).astype(np.uint8), window=win)
            else:
                d.write(b, 1, window=win)

    def close(self) -> None:
        """Close every product (flushes the last blocks); safe to call twice."""
        dst, self.dst = self.dst, {}
        with self._io("finish"):
            for d in dst.values():
                d.close()
