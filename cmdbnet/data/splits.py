"""Splits of a user's dataset: whole images by name or fraction, or spatial blocks of each image.

Why blocks: the commonest dataset of all is one large orthophoto with one label layer, and a
random split of its crops puts neighbouring, nearly identical crops in train and test. Here
each image is cut into square blocks (or full-width stripes) of ``blocks`` pixels, the blocks
(not the crops) are drawn into splits, and each block becomes a tile of its own. A block
gives up half a crop along every side where a block of another split touches it (corners
included), so crops of two splits lie at least one crop apart and never overlap. What went
where is in the manifest (``sources[].window``) and drawn in ``split.png``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from cmdbnet.data.raw import RawTile, open_raster
from cmdbnet.data.registry import SplitPlan
from cmdbnet.errors import CmdbError
from cmdbnet.utils import atomic_path

SPLITS = ("train", "val", "test")
COLOURS = {"train": (31, 119, 180), "val": (255, 127, 14), "test": (44, 160, 44)}


def image_size(image: Path) -> tuple[int, int]:
    """(height, width) of a raster."""
    with open_raster(image, "image") as img:
        return img.height, img.width


def _draw(plan: SplitPlan, n: int, rng: np.random.Generator) -> list[str]:
    """The split of each of ``n`` items (images or blocks): a seeded shuffle cut by the fractions."""
    order = rng.permutation(n)
    counts = []
    for f in (plan.val, plan.test):
        counts.append(max(1, round(float(f) * n)) if isinstance(f, float) and f > 0 else 0)
    if sum(counts) >= n:
        raise CmdbError(f"split fractions val {plan.val}, test {plan.test} leave no training "
                        f"{'block' if plan.blocks else 'image'} out of {n}: lower them"
                        + ("" if plan.blocks else " or split one large image into blocks (split.blocks)"))
    out = ["train"] * n
    for i in order[:counts[0]]:
        out[i] = "val"
    for i in order[counts[0]:counts[0] + counts[1]]:
        out[i] = "test"
    return out


def assign_images(plan: SplitPlan | None, tiles: list[RawTile], source: str) -> list[RawTile]:
    """Whole images into splits: listed names (file stems) or seeded fractions; the rest is train."""
    if plan is None:
        return tiles
    lists = {s: names for s, names in (("val", plan.val), ("test", plan.test)) if isinstance(names, tuple)}
    if lists:
        known = {t.tile_id for t in tiles}
        for split, names in lists.items():
            bad = [n for n in names if n not in known]
            if bad:
                raise CmdbError(f"{source}: split.{split} names {bad[0]!r}, which is no image of the dataset "
                                f"(images: {', '.join(sorted(known)[:8])}{', ...' if len(known) > 8 else ''})")
        where = {n: s for s, names in lists.items() for n in names}
        return [replace(t, split=where.get(t.tile_id, "train")) for t in tiles]
    if plan.blocks:
        return tiles
    splits = _draw(plan, len(tiles), np.random.default_rng(plan.seed))
    return [replace(t, split=s) for t, s in zip(tiles, splits)]


def block_tiles(plan: SplitPlan, tiles: list[RawTile], sizes: list[tuple[int, int]], crop: int) -> list[RawTile]:
    """Every image cut into blocks drawn into splits; each kept block is a tile with a ``window``."""
    rng = np.random.default_rng(plan.seed)
    out = []
    for tile, (height, width) in zip(tiles, sizes):
        b = plan.blocks
        rows, cols = math.ceil(height / b), 1 if plan.stripes else math.ceil(width / b)
        grid = np.array(_draw(plan, rows * cols, rng), dtype=object).reshape(rows, cols)
        h = crop // 2 + crop % 2
        for r in range(rows):
            for c in range(cols):
                split = grid[r, c]
                y0, y1 = r * b, min((r + 1) * b, height)
                x0, x1 = (0, width) if plan.stripes else (c * b, min((c + 1) * b, width))

                other = grid != split
                lo_r, hi_r, lo_c, hi_c = max(r - 1, 0), min(r + 2, rows), max(c - 1, 0), min(c + 2, cols)
                y0 += h if r > 0 and other[r - 1, lo_c:hi_c].any() else 0
                y1 -= h if r < rows - 1 and other[r + 1, lo_c:hi_c].any() else 0
                x0 += h if c > 0 and other[lo_r:hi_r, c - 1].any() else 0
                x1 -= h if c < cols - 1 and other[lo_r:hi_r, c + 1].any() else 0
                if y1 - y0 < crop or x1 - x0 < crop:
                    continue  # too small once the gap is taken: part of the buffer
                out.append(replace(tile, key=f"{tile.key}_b{r:02d}{c:02d}", split=split,
                                   window=(y0, x0, y1 - y0, x1 - x0)))
    missing = [s for s, f in (("val", plan.val), ("test", plan.test)) if f and s not in {t.split for t in out}]
    if missing or not any(t.split == "train" for t in out):
        raise CmdbError(f"split.blocks {plan.blocks}: no block of at least one crop ({crop} px) is left for "
                        f"{', '.join(missing) or 'train'} once the gaps are taken: use smaller blocks or crops")
    return out


def draw_split(path: Path, tiles: list[RawTile], sizes: dict[Path, tuple[int, int]], side: int = 512) -> None:
    """``split.png``: each image in grey, its blocks coloured by split (train blue, val orange, test green)."""
    from PIL import Image, ImageDraw

    images = list(dict.fromkeys(t.image for t in tiles))
    scale = max(max(sizes[i]) for i in images) / side
    panels = []
    for image in images:
        h, w = sizes[image]
        panel = Image.new("RGB", (max(1, round(w / scale)), max(1, round(h / scale))), (200, 200, 200))
        draw = ImageDraw.Draw(panel)
        for t in (t for t in tiles if t.image == image and t.window):
            y, x, hh, ww = t.window
            draw.rectangle([x / scale, y / scale, (x + ww) / scale - 1, (y + hh) / scale - 1],
                           fill=COLOURS.get(t.split, (0, 0, 0)))
        panels.append(panel)
    canvas = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), max(p.height for p in panels)),
                       (255, 255, 255))
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + 4
    with atomic_path(path, suffix=".png") as tmp:
        canvas.save(tmp, format="PNG")
