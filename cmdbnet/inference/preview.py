"""A PNG a person can look at: image | prediction | ground truth, with a class legend.

Why: a user judges a segmentation by eye before any number; QGIS is not always at hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cmdbnet.palette import colorize
from cmdbnet.utils import atomic_path


def to_rgb8(image: np.ndarray) -> np.ndarray:
    """(C, H, W) raster of any dtype -> (H, W, 3) uint8 for display (2-98% stretch if not uint8)."""
    img = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    if img.dtype != np.uint8:
        lo, hi = np.percentile(img, (2, 98))
        img = np.clip((img - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    return np.transpose(img, (1, 2, 0))


def save_preview(path: str | Path, image: np.ndarray, pred: np.ndarray, classes: Sequence[str],
                 palette: Sequence[Sequence[int]], truth: np.ndarray | None = None,
                 ignore_index: int = 255, max_side: int = 768) -> Path:
    """Write panels side by side with titles and a legend; large rasters are downsampled."""
    panels = [("image", to_rgb8(image)), ("prediction", colorize(pred, palette, ignore_index))]
    if truth is not None:
        panels.append(("ground truth", colorize(truth, palette, ignore_index)))
    h, w = pred.shape
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    font = ImageFont.load_default()
    title_h, pad = 18, 8
    legend_rows = (len(classes) + 2) // 3
    legend_h = legend_rows * 18 + pad
    canvas = Image.new("RGB", (len(panels) * (size[0] + pad) + pad, title_h + size[1] + legend_h + 2 * pad),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, arr) in enumerate(panels):
        x = pad + i * (size[0] + pad)
        draw.text((x, pad // 2), title, fill="black", font=font)
        canvas.paste(Image.fromarray(arr).resize(size, Image.NEAREST), (x, title_h))
    y0 = title_h + size[1] + pad
    col_w = max(1, canvas.width // 3)
    for i, (name, colour) in enumerate(zip(classes, palette)):
        x, y = pad + (i % 3) * col_w, y0 + (i // 3) * 18
        draw.rectangle([x, y + 2, x + 12, y + 14], fill=tuple(int(c) for c in colour), outline="black")
        draw.text((x + 18, y + 2), name, fill="black", font=font)  # as the class is named elsewhere
    with atomic_path(path, suffix=".png") as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)
