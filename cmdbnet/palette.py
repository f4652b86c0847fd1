"""Class palettes as colour lookup tables: the one place class indices become colours."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def palette_lut(palette: Sequence[Sequence[int]], ignore_index: int | None = 255, alpha: bool = False) -> np.ndarray:
    """(256, 3) or, with ``alpha``, (256, 4) uint8 table: class k -> its colour, anything else black.

    Index 255 (the ignore label and the masks' nodata) and every index past the palette stay
    black, with alpha 0, so ignored pixels never look like a class.
    """
    lut = np.zeros((256, 4 if alpha else 3), dtype=np.uint8)
    k = len(palette)
    lut[:k, :3] = np.asarray(palette, dtype=np.uint8).reshape(k, 3)
    if alpha:
        lut[:k, 3] = 255
    if ignore_index is not None and 0 <= ignore_index < 256:
        lut[ignore_index] = 0
    return lut


def colorize(index: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int = 255) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8; ignored/nodata pixels black."""
    return palette_lut(palette, ignore_index)[np.clip(index, 0, 255).astype(np.uint8)]
