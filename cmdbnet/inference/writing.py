"""Predict one raster, or one band of window rows of it, into its products; assemble bands.

Why a module of its own: ``files.predict`` decides what runs where (ranks, resume, GIS
outputs); this module is what happens to one file. Products are written under temporary
names and renamed only when the whole file succeeded (``utils.atomic_path``), so a failure,
a full disk or a killed rank never leaves a half-written product under a final name.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.windows import Window
from rich.progress import TimeElapsedColumn

from cmdbnet.errors import CmdbError
from cmdbnet.inference.gis import cog_stage
from cmdbnet.inference.rasters import InputInfo, ModelMeta, ProductWriter, gdal_reason, open_raster, quiet_georef
from cmdbnet.inference.resume import blocks_intact
from cmdbnet.inference.window import Strip, StripPredictor, emitted_rows
from cmdbnet.progress import progress_bar
from cmdbnet.utils import atomic_path, quiet_libtiff


def gdal_options() -> dict[str, Any]:
    """GDAL's block cache defaults to 5% of RAM; strips need a few rows of blocks, so cap it.

    Without the cap the cache keeps every block read or written (about 150 MB for a
    6000 x 6000 RGB tile and its mask; more for larger rasters), growing with the raster,
    which is what streaming is meant to avoid. A GDAL_CACHEMAX set by the user wins.
    """
    opts: dict[str, Any] = {"GDAL_TIFF_INTERNAL_MASK": True}
    if "GDAL_CACHEMAX" not in os.environ:
        opts["GDAL_CACHEMAX"] = 64 * 2**20
    return opts


class Progress:
    """Rich progress over all windows of all files, with Mpx/s; silent when disabled."""

    def __init__(self, enabled: bool, total: int):
        self.bar = None
        if enabled and total:
            self.bar = progress_bar("{task.description}", "windows  {task.fields[rate]}", TimeElapsedColumn())
            self.task = self.bar.add_task("predict", total=total, rate="")

    def __enter__(self) -> Progress:
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar:
            self.bar.stop()

    def file(self, name: str) -> None:
        if self.bar:
            self.bar.update(self.task, description=name)

    def advance(self, n: int, mpx: float, seconds: float) -> None:
        """``n`` more windows; ``mpx`` megapixels of the current file done in ``seconds``."""
        if self.bar:
            rate = f"{mpx / seconds:.2f} Mpx/s" if seconds > 0 else ""
            self.bar.update(self.task, advance=n, rate=rate)



@contextlib.contextmanager
def verified(paths: dict[str, Path]):
    """On success, check every written file is whole (``resume.blocks_intact``) or fail."""
    yield
    for p in paths.values():
        if not blocks_intact(p):
            raise CmdbError(f"cannot write output in {p.parent}: the file is incomplete after writing "
                            "(disk full or quota?); nothing was kept under a final name")


@contextlib.contextmanager
def _products(stack: contextlib.ExitStack, src, info: InputInfo, meta: ModelMeta, plan: dict[str, Path],
              tags: dict[str, str], cog: bool):
    """A ProductWriter on temporary files that become ``plan`` (as COGs with ``cog``) on success."""
    tmp = {name: stack.enter_context(atomic_path(path)) for name, path in plan.items()}
    paths = stack.enter_context(cog_stage(tmp)) if cog else tmp
    stack.enter_context(verified(paths))
    writer = ProductWriter(src, info, meta, paths, tags)
    stack.callback(writer.close)  # closes before the COG copies and renames above run
    yield writer


def predict_file(predictor: StripPredictor, info: InputInfo, plan: dict[str, Path], meta: ModelMeta,
                 tags: dict[str, str], bar: Progress, cog: bool = False,
                 band: tuple[int, int, int, int] | None = None) -> dict[str, Any]:
    """Predict ``info`` into ``plan``; returns its summary with raw ``class_counts``.

    ``band=(i0, i1, r0, r1)``: only window rows ``[i0, i1)``, which finish image rows
    ``[r0, r1)``; ``plan`` then names part files of ``r1 - r0`` rows (never COGs).
    """
    t0 = time.perf_counter()
    counts = np.zeros(256, np.int64)
    rows = band[:2] if band else None
    base = band[2] if band else 0
    out_info = replace(info, height=band[3] - band[2]) if band else info
    n_windows = predictor.count_windows(info.height, info.width, rows)
    done = [0]
    quiet_libtiff()  # a full disk: our one error line, not libtiff's raw one before it
    with contextlib.ExitStack() as stack:
        stack.enter_context(rasterio.Env(**gdal_options()))
        src = stack.enter_context(open_raster(info.path))
        writer = stack.enter_context(_products(stack, src, out_info, meta, plan, tags, cog and not band))

        def read(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
            r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
            try:
                with quiet_georef():
                    block = src.read(list(info.indexes), window=Window(c0, r0, c1 - c0, r1 - r0))
            except RasterioError as exc:
                raise CmdbError(f"cannot read {info.path} rows {r0}-{r1}: {gdal_reason(exc)}") from None
            return block[:, (rows - r0)[:, None], (cols - c0)[None, :]]

        def emit(strip: Strip) -> None:
            h = strip.index.shape[0]
            valid = None
            if info.has_mask:
                with quiet_georef():
                    valid = src.dataset_mask(window=Window(0, strip.row0, info.width, h)) > 0
            writer.write_strip(strip.row0 - base, strip.index, valid, strip.probs, strip.boundary)
            idx = strip.index if valid is None else strip.index[valid]
            counts[:] += np.bincount(idx.ravel(), minlength=256)

        def on_batch(n: int) -> None:
            done[0] += n
            bar.advance(n, info.width * out_info.height * done[0] / n_windows / 1e6, time.perf_counter() - t0)

        predictor.run(read, info.height, info.width, emit, on_batch, window_rows=rows)
    return _summary(predictor, info, plan, meta, counts, n_windows, time.perf_counter() - t0, out_info.height)


def _summary(predictor: StripPredictor, info: InputInfo, plan: dict[str, Path], meta: ModelMeta,
             counts: np.ndarray, n_windows: int, seconds: float, height: int) -> dict[str, Any]:
    mpx = info.width * height / 1e6
    strip_shape = list(predictor.strip_shape or ())
    return {
        "input": str(info.path),
        "outputs": {name: str(path) for name, path in plan.items()},
        "width": info.width,
        "height": info.height,
        "bands": len(info.indexes),
        "georeferenced": info.georeferenced,
        "windows": n_windows,
        "seconds": round(seconds, 3),
        "mpx_per_s": round(mpx / seconds, 4) if seconds > 0 else None,
        "strip_shape": strip_shape,
        "accumulator_bytes": int(np.prod(strip_shape)) * 4 if strip_shape else 0,
        "class_counts": [int(c) for c in counts[:len(meta.classes)]],
    }


def finish_summary(s: dict[str, Any], classes: tuple[str, ...]) -> dict[str, Any]:
    """Class fractions and nodata pixels from the raw counts (summed over bands if split)."""
    counts = s.pop("class_counts")
    valid = sum(counts)
    s["nodata_pixels"] = int(s["width"] * s["height"] - valid)
    s["class_fractions"] = {c: round(n / valid, 6) if valid else 0.0 for c, n in zip(classes, counts)}
    return s


def merge_band_summaries(parts: list[dict[str, Any]], plan: dict[str, Path]) -> dict[str, Any]:
    """One file's summary from its bands' summaries (windows, time and counts added up)."""
    s = dict(parts[0])
    s["outputs"] = {name: str(p) for name, p in plan.items()}
    s["windows"] = sum(p["windows"] for p in parts)
    s["seconds"] = round(sum(p["seconds"] for p in parts), 3)
    s["mpx_per_s"] = round(s["width"] * s["height"] / 1e6 / s["seconds"], 4) if s["seconds"] > 0 else None
    s["class_counts"] = [sum(c) for c in zip(*(p["class_counts"] for p in parts))]
    s["bands_split"] = len(parts)
    s["ranks"] = sorted({p.get("rank", 0) for p in parts})
    return s


def assemble(predictor: StripPredictor, info: InputInfo, plan: dict[str, Path], meta: ModelMeta,
             tags: dict[str, str], parts: list[tuple[int, int, dict[str, Path]]], cog: bool) -> None:
    """Copy band parts ``(r0, r1, paths)`` into the final products, in a whole run's strips."""
    gy, _ = predictor.grids(info.height, info.width)
    quiet_libtiff()  # a full disk: our one error line, not libtiff's raw one before it
    with contextlib.ExitStack() as stack:
        stack.enter_context(rasterio.Env(**gdal_options()))
        src = stack.enter_context(open_raster(info.path))
        opened = [(r0, r1, {n: stack.enter_context(open_raster(p)) for n, p in paths.items()})
                  for r0, r1, paths in parts]
        writer = stack.enter_context(_products(stack, src, info, meta, plan, tags, cog))
        for a, b in emitted_rows(gy):
            if b <= a:
                continue
            r0, _, part = next(o for o in opened if o[0] <= a < o[1])
            for name, ds in part.items():
                writer.copy_rows(name, ds, a - r0, a, b - a)
    for _, _, paths in parts:
        for p in paths.values():
            with contextlib.suppress(OSError):
                p.unlink()
