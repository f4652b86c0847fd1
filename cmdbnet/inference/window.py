"""Sliding-window prediction in strips: the one window/blend code path of cmdbnet.

Why one module: ``cmdb predict`` streams rasters of any size from disk, ``cmdb evaluate``
predicts in-memory tiles; both must give the same answer for the same pixels, so both
drive :class:`StripPredictor` and differ only in where pixels come from and where the
finished rows go.

How a raster is covered. Along each axis, windows of ``tile`` pixels step by
``stride = tile - overlap_px``. The grid starts ``overlap_px // 2`` pixels before the
image (and is centred when it overshoots), and pixels outside the image are mirrored
(reflection), so border pixels are never seen at the very edge of a window. An axis no
longer than ``tile`` gets one centred window. Softmax
probabilities of overlapping windows are blended with a separable linear-ramp weight
(1 in the window's interior, falling linearly over ``overlap_px`` to each edge): two
neighbours' ramps sum to a constant across their overlap, a cross-fade without seams, and
a window's confident interior is not down-weighted as a Gaussian would do.

Why strips: the grid is processed one row of windows at a time. The accumulator holds
``tile`` rows of the full (padded) width; after a window row, the ``stride`` rows that no
later window touches are normalised and handed to ``emit``, and the ``overlap_px`` rows
still shared with the next window row are carried over. Memory is therefore bounded by
``K x tile x width``, whatever the raster height. The blend weights are separable and the
grid is a product grid, so the sum of weights is an outer product of two 1-D vectors: no
weight accumulator is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

from cmdbnet.runtime import configure_cuda, inference_precision

TTA = Literal["none", "flip", "d4"]
RAMP_FLOOR = 1e-3  # keeps every covered pixel's weight positive


@dataclass(frozen=True)
class AxisGrid:
    """Window origins along one axis, in image pixel coordinates (the first is <= 0)."""

    size: int  # image pixels along the axis
    tile: int
    stride: int
    start: int
    count: int

    @property
    def span(self) -> int:
        """Pixels covered by the windows, padding included."""
        return (self.count - 1) * self.stride + self.tile

    def origins(self) -> list[int]:
        return [self.start + i * self.stride for i in range(self.count)]


def axis_grid(size: int, tile: int, overlap: float) -> AxisGrid:
    """Windows of ``tile`` pixels covering ``size`` pixels with fractional ``overlap``."""
    if size < 1 or tile < 1:
        raise ValueError("size and tile must be positive")
    ov = min(int(round(tile * overlap)), tile - 1)
    stride = tile - ov
    if size <= tile:  # one centred window sees the whole axis: no seams, no margin to buy
        return AxisGrid(size, tile, stride, -((tile - size) // 2), 1)
    pad = ov // 2
    need = size + 2 * pad
    count = 1 if need <= tile else math.ceil((need - tile) / stride) + 1
    span = (count - 1) * stride + tile
    start = -pad - (span - need) // 2
    return AxisGrid(size, tile, stride, start, count)


def ramp_weight(tile: int, stride: int) -> np.ndarray:
    """1-D blend weight of a window: 1 inside, a linear ramp over the overlap at both ends."""
    ov = tile - stride
    if ov <= 0:
        return np.ones(tile, np.float32)
    x = np.arange(tile, dtype=np.float64) + 0.5
    w = np.minimum(x, tile - x) / ov
    return np.clip(w, RAMP_FLOOR, 1.0).astype(np.float32)


def reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Map pixel coordinates outside ``[0, n)`` to mirrored ones (edge pixel not repeated)."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    m = np.mod(idx, period)
    return np.where(m >= n, period - m, m)


def _coverage(grid: AxisGrid, weight: np.ndarray) -> np.ndarray:
    """Sum of window weights over each image pixel of one axis, shape (size,)."""
    total = np.zeros(grid.span, np.float64)
    for i in range(grid.count):
        total[i * grid.stride:i * grid.stride + grid.tile] += weight
    return total[-grid.start:-grid.start + grid.size].astype(np.float32)


# ----------------------------------------------------------------------------- TTA
def _dihedral(mode: str) -> list[tuple[int, bool]]:
    """(quarter turns, horizontal flip) pairs; each is undone after the forward."""
    if mode == "none":
        return [(0, False)]
    if mode == "flip":  # identity, left-right, up-down (= 2 turns + left-right)
        return [(0, False), (0, True), (2, True)]
    if mode == "d4":
        return [(k, f) for k in range(4) for f in (False, True)]
    raise ValueError(f"unknown TTA mode {mode!r}; choose none, flip or d4")


def _apply(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, k, dims=(-2, -1)) if k else x


def _undo(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    if k:
        x = torch.rot90(x, -k, dims=(-2, -1))
    return x.flip(-1) if flip else x


def forward_tta(model: torch.nn.Module, x: torch.Tensor, mode: TTA = "none",
                amp: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Class and boundary probabilities of a normalised batch, averaged over TTA views.

    ``x`` (B, C, H, W) normalised float -> ``(probs (B, K, H, W), boundary (B, 1, H, W) or
    None)``, float32. ``flip`` averages 3 views (identity, left-right, up-down), ``d4`` the
    8 rotations/reflections. Probabilities, not logits, are averaged: views that disagree
    then pull towards uncertainty instead of letting one over-confident view win.
    ``boundary`` is None when the network has no boundary head. ``model`` may also be a runner
    that returns probabilities, ``{"probs", "boundary_probs"}`` (an exported ONNX model:
    ``onnx_runner.OnnxNetwork``); they are averaged the same way.
    """
    probs: Optional[torch.Tensor] = None
    bnd: Optional[torch.Tensor] = None
    views = _dihedral(mode)
    # inference_mode, not no_grad: no version counters or view tracking, measurably faster on
    # CPU; the outputs are inference tensors, which callers only read or add into their own.
    with torch.inference_mode(), inference_precision(amp, x.device).autocast(x.device):
        for k, flip in views:
            out = model(_apply(x, k, flip))
            seg, b = (out, None) if isinstance(out, torch.Tensor) else (out.get("seg"), out.get("boundary"))
            given = seg is None  # a runner that returns probabilities (an ONNX model: softmax in its graph)
            if given:
                seg, b = out["probs"], out.get("boundary_probs")
            seg = _undo(seg.float(), k, flip)
            if seg.shape[-2:] != x.shape[-2:]:
                seg = F.interpolate(seg, size=x.shape[-2:], mode="bilinear", align_corners=False)
            p = seg if given else seg.softmax(1)
            probs = p if probs is None else probs.add_(p)
            if b is not None:
                b = _undo(b.float(), k, flip)
                if b.shape[-2:] != x.shape[-2:]:
                    b = F.interpolate(b, size=x.shape[-2:], mode="bilinear", align_corners=False)
                b = b if given else b.sigmoid()
                bnd = b if bnd is None else bnd.add_(b)
        assert probs is not None
        n = float(len(views))
        return probs.div_(n), (bnd.div_(n) if bnd is not None else None)


# ----------------------------------------------------------------------------- strips
@dataclass
class Strip:
    """Finished rows ``[row0, row0 + h)`` of the image, full width.

    ``probs`` (K, h, W) float32 on the predictor's device (None unless asked for),
    ``boundary`` (h, W) float32 or None. ``index`` (h, W) uint8 numpy is the arg-max.
    """

    row0: int
    probs: Optional[torch.Tensor]
    boundary: Optional[torch.Tensor]
    index: np.ndarray


Reader = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (rows, cols) -> (C, len(rows), len(cols))


class StripPredictor:
    """Runs a network over a sliding-window grid, strip by strip (see module docstring)."""

    def __init__(self, model: torch.nn.Module, mean, std, tile: int | tuple[int, int] = 512,
                 overlap: float = 0.25, tta: TTA = "none", batch: int = 8,
                 device: str | torch.device = "cpu", amp: bool = False, boundary: bool = False,
                 probs: bool = True):
        self.model = model
        self.device = torch.device(device)
        configure_cuda(self.device)  # fixed window shape: cuDNN autotunes once
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        self.tile = (tile, tile) if isinstance(tile, int) else tuple(tile)
        self.overlap, self.tta, self.batch, self.amp = overlap, tta, batch, amp
        self.want_boundary = boundary
        self.want_probs = probs  # False: strips carry only the index (saves a (K, h, W) copy)
        self.strip_shape: tuple[int, int, int] | None = None  # (K, rows, cols) of the last run

    def grids(self, height: int, width: int) -> tuple[AxisGrid, AxisGrid]:
        return (axis_grid(height, self.tile[0], self.overlap), axis_grid(width, self.tile[1], self.overlap))

    def count_windows(self, height: int, width: int, window_rows: tuple[int, int] | None = None) -> int:
        gy, gx = self.grids(height, width)
        if window_rows is None:
            return gy.count * gx.count
        return (window_rows[1] - first_window_row(gy, window_rows[0])) * gx.count

    def run(self, read: Reader, height: int, width: int, emit: Callable[[Strip], None],
            on_batch: Callable[[int], None] | None = None,
            window_rows: tuple[int, int] | None = None) -> None:
        """Predict an image of ``height`` x ``width`` read through ``read``; ``emit`` gets strips.

        ``read(rows, cols)`` returns raw pixels (C, len(rows), len(cols)) for in-image row
        and column indices; ``on_batch(n)`` is told after each batch of ``n`` windows.
        ``window_rows=(i0, i1)`` emits only the rows that window rows i0..i1-1 finish
        (``emitted_rows``), the same values as a whole run gives them: the earlier window
        rows that still overlap them are run too, and their own rows are dropped.
        """
        gy, gx = self.grids(height, width)
        i0, i1 = window_rows if window_rows is not None else (0, gy.count)
        first = first_window_row(gy, i0)
        dev = self.device
        wy = torch.from_numpy(ramp_weight(gy.tile, gy.stride)).to(dev)
        wx = torch.from_numpy(ramp_weight(gx.tile, gx.stride)).to(dev)
        w2 = wy[:, None] * wx[None, :]
        cov_y = torch.from_numpy(_coverage(gy, wy.cpu().numpy())).to(dev)
        cov_x = torch.from_numpy(_coverage(gx, wx.cpu().numpy())).to(dev)
        cols = reflect_index(np.arange(gx.start, gx.start + gx.span), width)
        c0 = -gx.start
        acc = bacc = None
        next_row = 0  # first image row not yet emitted
        for i, y0 in enumerate(gy.origins()):
            if i < first or i >= i1:
                continue
            rows = reflect_index(np.arange(y0, y0 + gy.tile), height)
            strip = torch.from_numpy(np.ascontiguousarray(read(rows, cols)))
            strip = (strip.pin_memory() if dev.type == "cuda" else strip).to(dev, non_blocking=True)  # async only from pinned
            for j0 in range(0, gx.count, self.batch):
                js = range(j0, min(j0 + self.batch, gx.count))
                x = torch.stack([strip[:, :, j * gx.stride:j * gx.stride + gx.tile] for j in js])
                x = x.float().sub_(self.mean).div_(self.std)  # per batch: no float copy of the strip
                probs, bnd = forward_tta(self.model, x, self.tta, self.amp)
                if acc is None:
                    acc = torch.zeros((probs.shape[1], gy.tile, gx.span), device=dev)
                    self.strip_shape = tuple(acc.shape)
                    if self.want_boundary and bnd is not None:
                        bacc = torch.zeros((gy.tile, gx.span), device=dev)
                for n, j in enumerate(js):
                    sl = slice(j * gx.stride, j * gx.stride + gx.tile)
                    acc[:, :, sl].addcmul_(probs[n], w2)
                    if bacc is not None:
                        bacc[:, sl].addcmul_(bnd[n, 0], w2)
                if on_batch is not None:
                    on_batch(len(js))
            last = i == gy.count - 1
            done = y0 + (gy.tile if last else gy.stride)  # rows before this are final
            r0, r1 = max(next_row, y0), min(done, height)
            if r1 > r0:
                if i >= i0:  # rows finished by window rows before the band are not ours to emit
                    norm = cov_y[r0:r1, None] * cov_x[None, :]
                    emit(self._strip(acc, bacc, norm, r0, r1 - r0, r0 - y0, c0, width))
                next_row = r1
            if not last:  # carry the overlap rows to the next window row
                keep = gy.tile - gy.stride
                acc[:, :keep] = acc[:, gy.stride:].clone()
                acc[:, keep:] = 0
                if bacc is not None:
                    bacc[:keep] = bacc[gy.stride:].clone()
                    bacc[keep:] = 0

    def _strip(self, acc: torch.Tensor, bacc: torch.Tensor | None, norm: torch.Tensor, r0: int, h: int, a: int,
               c0: int, width: int) -> Strip:
        """Finished rows ``[r0, r0 + h)``, which sit at row ``a`` of the accumulators."""
        acc_rows = acc[:, a:a + h, c0:c0 + width]
        p = acc_rows / norm if self.want_probs else None
        bd = bacc[a:a + h, c0:c0 + width] / norm if bacc is not None else None
        # the weight sum is a positive per-pixel factor: arg-max of the sums is the arg-max of
        # the blended probabilities. max(0).indices, not argmax(0): the same answer, ~3x faster on CPU.
        index = acc_rows.max(0).indices.to(torch.uint8).cpu().numpy()
        return Strip(r0, p, bd, index)


def first_window_row(gy: AxisGrid, i0: int) -> int:
    """First window row whose windows reach the rows that window row ``i0`` finishes."""
    reach = -(-gy.tile // gy.stride) - 1  # earlier window rows overlapping window row i0
    return max(0, i0 - reach)


def emitted_rows(gy: AxisGrid) -> list[tuple[int, int]]:
    """Image rows ``[r0, r1)`` finished (and emitted) after each window row; may be empty."""
    out, prev = [], 0
    for i, y0 in enumerate(gy.origins()):
        done = y0 + (gy.tile if i == gy.count - 1 else gy.stride)
        r1 = max(prev, min(done, gy.size))
        out.append((prev, r1))
        prev = r1
    return out


def whole_tile(height: int, width: int, multiple: int = 32) -> tuple[int, int]:
    """Window size covering a whole image in one forward (sides rounded up to ``multiple``)."""
    return (-(-height // multiple) * multiple, -(-width // multiple) * multiple)


def predict_array(model: torch.nn.Module, image: np.ndarray, mean, std, tile: int | None = 512,
                  overlap: float = 0.25, tta: TTA = "none", batch: int = 8,
                  device: str | torch.device = "cpu", amp: bool = False,
                  output: Literal["index", "probs"] = "index") -> np.ndarray:
    """Predict an in-memory image with the same windows and blending as ``cmdb predict``.

    ``image`` (C, H, W) raw pixels (the scale ``mean``/``std`` were computed on). Returns
    the class-index mask (H, W) uint8, or with ``output="probs"`` the blended probabilities
    (K, H, W) float32. ``tile=None`` predicts the whole image as one window (reflection-
    padded to a multiple of 32), the setting for crops that fit in memory.
    """
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {image.shape}")
    _, h, w = image.shape
    t = whole_tile(h, w) if tile is None else tile
    ov = 0.0 if tile is None else overlap
    sp = StripPredictor(model, mean, std, t, ov, tta, batch, device, amp, probs=output == "probs")
    out = np.empty((h, w), np.uint8) if output == "index" else None
    parts: list[torch.Tensor] = []

    def read(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return image[:, rows[:, None], cols[None, :]]

    def emit(s: Strip) -> None:
        if out is not None:
            out[s.row0:s.row0 + s.index.shape[0]] = s.index
        else:
            parts.append(s.probs.cpu())

    sp.run(read, h, w, emit)
    return out if out is not None else torch.cat(parts, 1).numpy()
