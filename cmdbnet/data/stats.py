"""Per-band mean and standard deviation of the training pixels, streamed while crops are cut.

Why streamed: a scene of several 6000 x 6000 16-bit bands does not fit in memory twice; each
strip adds its pixel count, sum and sum of squares per band (float64), and the totals of the
training tiles give mean and std at the end. NaN/inf pixels and each band's nodata value are
left out, so a nodata border does not drag the mean towards it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def band_sums(strip: np.ndarray, bad: np.ndarray | None, nodata: float | None = None) -> np.ndarray:
    """(3, C): pixel count, sum and sum of squares per band of a (C, H, W) strip's valid pixels."""
    x = strip.reshape(strip.shape[0], -1).astype(np.float64)
    if bad is not None:
        x = x[:, ~bad.ravel()]
    if nodata is None or np.isnan(nodata):
        return np.stack([np.full(x.shape[0], x.shape[1], np.float64), x.sum(1), (x * x).sum(1)])
    valid = x != nodata
    xv = np.where(valid, x, 0.0)
    return np.stack([valid.sum(1).astype(np.float64), xv.sum(1), (xv * xv).sum(1)])


def band_statistics(records: list[dict[str, Any]]) -> dict[str, list[float]] | None:
    """Per-band mean and std of the training tiles, or None when not computed."""
    parts = [np.asarray(r["band_sums"]) for r in records if r["split"] == "train" and r.get("band_sums")]
    if not parts:
        return None
    n, total, squares = np.sum(parts, axis=0)
    mean = total / np.maximum(n, 1)
    std = np.sqrt(np.maximum(squares / np.maximum(n, 1) - mean ** 2, 0.0))
    return {"mean": [round(float(m), 4) for m in mean], "std": [round(float(max(v, 1e-6)), 4) for v in std]}
