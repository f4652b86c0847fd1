"""Segment whole rasters of any size: the engine behind ``cmdb predict`` (``cmdbnet.predict``).

Why streamed: a Potsdam tile is 6000 x 6000 and mosaics are larger; holding its K-class
probabilities in memory (6 x 36 Mpx x 4 B = 864 MB, plus weights) is what makes peers'
predict scripts fall over. Here windows are read with rasterio, predicted in batches,
blended in strips (``sliding.StripPredictor``) and written with rasterio windows, so
memory follows the strip (K x tile x width), not the raster.

Everything about the classes, palette, bands and normalisation comes from the checkpoint.
Every check that can fail (checkpoint, inputs, output paths) runs before the first window
is predicted, and outputs are written under temporary names and renamed only when the
whole file succeeded: a failure never leaves a half-written mask that looks finished.

``forward_tta`` and ``predict_array`` (re-exported here) are the in-memory entry points
for ``cmdb evaluate``; they share the window and blend code with the raster path.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.errors import RasterioError
from rasterio.windows import Window

from cmdbnet.checkpoint import load_model, resolve_checkpoint
from cmdbnet.errors import CmdbError
from cmdbnet.inference.compiled import compile_predictor
from cmdbnet.inference.rasters import (
    ModelMeta,
    ProductWriter,
    check_input,
    expand_inputs,
    gdal_reason,
    open_raster,
    plan_outputs,
    quiet_georef,
)
from cmdbnet.inference.window import Strip, StripPredictor, forward_tta, predict_array
from cmdbnet.runtime import pick_device
from cmdbnet.settings import PredictSettings
from cmdbnet.utils import atomic_path

__all__ = ["predict", "forward_tta", "predict_array", "pick_device", "load_predictor_model"]

def load_predictor_model(checkpoint: str | os.PathLike, device: torch.device):
    """Network, metadata and its output layout (classes K, boundary head) from a checkpoint.

    A probe forward on a small input checks that the network's K matches the class list
    stored beside it, so a mismatched checkpoint fails here and not after an hour of work.
    """
    path = resolve_checkpoint(checkpoint)
    try:
        model, ckpt = load_model(path, device)
    except CmdbError:
        raise
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CmdbError(f"{path}: cannot rebuild the network from this checkpoint ({first[:200]})") from None
    meta = ModelMeta.from_checkpoint(ckpt, path)
    probe = torch.zeros((1, meta.band_count, 64, 64), device=device)
    try:
        probs, bnd = forward_tta(model, probe, "none")
    except RuntimeError as exc:
        raise CmdbError(f"{path}: the network does not run on {meta.band_count}-band input "
                        f"({str(exc).splitlines()[0][:160]})") from None
    if probs.shape[1] != len(meta.classes):
        raise CmdbError(f"{path}: the network predicts {probs.shape[1]} classes but the checkpoint "
                        f"names {len(meta.classes)}")
    return model, ckpt, meta, bnd is not None

def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


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


class _Progress:
    """Rich progress over all windows of all files, with Mpx/s; silent when disabled."""

    def __init__(self, enabled: bool, total: int):
        self.bar = None
        if enabled and total:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("windows  {task.fields[rate]}"), TimeElapsedColumn(),
                                TimeRemainingColumn(), console=Console(stderr=True), transient=False)
            self.task = self.bar.add_task("predict", total=total, rate="")

    def __enter__(self) -> _Progress:
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

def predict(inputs: str | os.PathLike | Iterable[str | os.PathLike], out: str | os.PathLike,
            checkpoint: str | os.PathLike, settings: PredictSettings | None = None,
            progress: bool = True) -> list[dict[str, Any]]:
    """Segment every input raster into GeoTIFF products; returns one summary per file.

    ``inputs``: files, folders or glob patterns. ``out``: a .tif file for a single input,
    else a folder (``<stem>_mask.tif``, ``_color``, ``_probs``, ``_boundary``).
    ``checkpoint``: a checkpoint file or a run folder (best.pt, else last.pt).
    """
    s = settings or PredictSettings()
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    files = expand_inputs(items)
    plans = plan_outputs(files, out, s)
    device = pick_device(s.device)
    ckpt_path = resolve_checkpoint(checkpoint)
    model, ckpt, meta, has_boundary = load_predictor_model(ckpt_path, device)
    if s.boundary and not has_boundary:
        variant = (ckpt.get("settings") or {}).get("model", {}).get("variant", "?")
        raise CmdbError(f"{ckpt_path}: this network (variant {variant}) has no boundary head; drop --boundary")
    infos = [check_input(f, meta) for f in files]
    predictor = StripPredictor(model, meta.mean, meta.std, s.tile, s.overlap, s.tta, s.batch,
                               device, s.amp, boundary=s.boundary, probs=s.probs)
    total = sum(predictor.count_windows(i.height, i.width) for i in infos)
    compiled = compile_predictor(predictor, total, meta.band_count, s.compile)
    summaries = []
    with _Progress(progress, total) as bar:
        for info, plan in zip(infos, plans):
            bar.file(info.path.name)
            summary = _predict_file(predictor, info, plan, meta, ckpt_path, bar)
            summary.update(device=str(device), tile=s.tile, overlap=s.overlap, tta=s.tta,
                           batch=s.batch, amp=s.amp, checkpoint=str(ckpt_path), **compiled)
            summaries.append(summary)
    return summaries


def _predict_file(predictor: StripPredictor, info, plan: dict[str, Path], meta: ModelMeta,
                  ckpt_path: Path, bar: _Progress) -> dict[str, Any]:
    t0 = time.perf_counter()
    k = len(meta.classes)
    counts = np.zeros(256, np.int64)
    n_windows = predictor.count_windows(info.height, info.width)
    done = [0]
    with contextlib.ExitStack() as stack:
        stack.enter_context(rasterio.Env(**gdal_options()))
        src = stack.enter_context(open_raster(info.path))
        tmp = {name: stack.enter_context(atomic_path(path)) for name, path in plan.items()}
        for t in tmp.values():  # mkstemp makes 0600 files; masks are for sharing, follow the umask
            os.chmod(t, _file_mode())
        writer = ProductWriter(src, info, meta, tmp, {"source": info.path.name,
                                                      "checkpoint": ckpt_path.name,
                                                      "software": "cmdbnet"})
        stack.callback(writer.close)  # closes before the renames above run

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
            writer.write_strip(strip.row0, strip.index, valid, strip.probs, strip.boundary)
            idx = strip.index if valid is None else strip.index[valid]
            counts[:] += np.bincount(idx.ravel(), minlength=256)

        def on_batch(n: int) -> None:
            done[0] += n
            bar.advance(n, info.width * info.height * done[0] / n_windows / 1e6, time.perf_counter() - t0)

        predictor.run(read, info.height, info.width, emit, on_batch)
    seconds = time.perf_counter() - t0
    mpx = info.width * info.height / 1e6
    valid_px = int(counts[:k].sum())
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
        "nodata_pixels": int(info.width * info.height - valid_px),
        "class_fractions": {c: round(float(counts[i]) / valid_px, 6) if valid_px else 0.0
                            for i, c in enumerate(meta.classes)},
    }
