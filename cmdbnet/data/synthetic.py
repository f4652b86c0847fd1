"""Procedural aerial-like scenes written in a dataset's own raw download layout.

Why: tests, demos and benchmarks need data that looks like the real downloads (same folder
names, file names, formats, georeferencing) and that a network can actually learn, without
shipping any licensed imagery. A scene is painted in layers (ground, fields, water, roads,
paved areas, buildings with shadows, trees, cars on roads, clutter); each class has its own
colour range, texture and shape, so a small CNN separates them in minutes.

Which layers appear depends on the spec's class names (``building``, ``tree`` ...), never
on the dataset's name. All randomness comes from one seeded ``numpy.random.Generator``.

Tile order (so that 3 tiles already fill every split): with official lists, the first
train tile that is not a validation tile, the first validation tile, the first test tile,
then the other train tiles, test tiles and validation tiles in registry order. Without
lists (LoveDA), every third tile (the 2nd, 5th ...) goes to Val, the others to Train;
scenes alternate Urban, Rural. LoveDA's Test folder (images only) is not written.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from cmdbnet.data.raw import official_split
from cmdbnet.data.registry import DatasetSpec, get_spec
from cmdbnet.errors import CmdbError
from cmdbnet.utils import atomic_path

# Colour ranges per class name: two (R, G, B, NIR) end points, mixed per object.
_LOOKS: dict[str, tuple[tuple[int, ...], tuple[int, ...], float, float]] = {
    # name: (colour a, colour b, fine-texture amplitude, coarse-texture amplitude)
    "impervious_surfaces": ((168, 166, 160, 110), (140, 140, 138, 95), 4.0, 6.0),
    "road": ((146, 146, 140, 90), (166, 166, 160, 100), 3.0, 4.0),
    "building": ((178, 86, 62, 80), (92, 94, 112, 70), 3.0, 3.0),
    "low_vegetation": ((128, 168, 82, 205), (160, 176, 98, 215), 3.0, 14.0),
    "background": ((160, 140, 156, 130), (132, 118, 136, 115), 10.0, 10.0),
    "tree": ((38, 84, 38, 185), (62, 104, 46, 200), 22.0, 6.0),
    "forest": ((34, 78, 36, 180), (56, 96, 44, 195), 22.0, 8.0),
    "car": ((205, 30, 40, 60), (30, 60, 205, 60), 2.0, 0.0),
    "clutter": ((150, 108, 76, 110), (112, 76, 126, 100), 18.0, 10.0),
    "water": ((34, 58, 96, 15), (52, 84, 116, 25), 2.0, 5.0),
    "barren": ((214, 188, 140, 150), (190, 160, 112, 135), 12.0, 8.0),
    "agriculture": ((150, 182, 88, 220), (196, 184, 108, 210), 4.0, 6.0),
}
_CHANNELS = ("red", "green", "blue", "nir")
# Layer -> class names that may play it, first present wins.
_ROLES = {
    "ground": ("low_vegetation", "background"), "field": ("agriculture",), "barren": ("barren",),
    "water": ("water",), "road": ("road", "impervious_surfaces"), "paved": ("impervious_surfaces",),
    "building": ("building",), "tree": ("tree", "forest"), "car": ("car",), "clutter": ("clutter",),
}


def _role(classes: tuple[str, ...], role: str) -> int | None:
    return next((classes.index(n) for n in _ROLES[role] if n in classes), None)


class _Canvas:
    """Class map plus per-pixel object tint and shading, painted layer by layer."""

    def __init__(self, height: int, width: int, rng: np.random.Generator):
        self.h, self.w, self.rng = height, width, rng
        self.cls = np.zeros((height, width), np.uint8)
        self.tint = np.zeros((height, width), np.float32)  # 0..1 between a class's two colours
        self.shade = np.ones((height, width), np.float32)

    def count(self, per_pixels: float) -> int:
        return max(1, int(self.rng.poisson(self.h * self.w / per_pixels)))

    def _grid(self, cy: float, cx: float, r: int):
        """(slices, dy, dx): the box of radius ``r`` around (cy, cx) clipped to the canvas, as offsets."""
        y0, y1 = max(int(cy) - r, 0), min(int(cy) + r + 1, self.h)
        x0, x1 = max(int(cx) - r, 0), min(int(cx) + r + 1, self.w)
        if y0 >= y1 or x0 >= x1:
            return None
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        return (slice(y0, y1), slice(x0, x1)), yy - cy, xx - cx

    def box(self, cy: float, cx: float, half_h: float, half_w: float, angle: float):
        """A rotated rectangle: (slices, mask, u, v) with u, v its own axes, over its bounding box."""
        got = self._grid(cy, cx, int(np.ceil(np.hypot(half_h, half_w))) + 1)
        if got is None:
            return None
        where, dy, dx = got
        c, s = np.cos(angle), np.sin(angle)
        u, v = dy * c + dx * s, -dy * s + dx * c
        return where, (np.abs(u) <= half_h) & (np.abs(v) <= half_w), u, v

    def blob(self, cy: float, cx: float, radius: float, wobble: float = 0.25):
        """A roundish blob with a wavy outline: (slices, mask)."""
        got = self._grid(cy, cx, int(radius * (1 + wobble)) + 1)
        if got is None:
            return None
        where, dy, dx = got
        k, phase = self.rng.integers(3, 7), self.rng.uniform(0, 2 * np.pi)
        edge = radius * (1 + wobble * np.sin(k * np.arctan2(dy, dx) + phase))
        return where, np.hypot(dy, dx) <= edge

    def paint(self, where, mask: np.ndarray, index: int, tint: float | None = None, allowed=None) -> np.ndarray:
        """Paint class ``index`` (one tint per object) where ``mask``, only over ``allowed`` classes."""
        if allowed is not None:
            mask = mask & np.isin(self.cls[where], allowed)
        self.cls[where][mask] = index
        self.tint[where][mask] = self.rng.uniform() if tint is None else tint
        return mask

    def shadow(self, where, mask: np.ndarray, dy: int, dx: int, factor: float, keep: tuple[int, ...]) -> None:
        """Darken the footprint moved down-right by (dy, dx) (sun from the upper left), except ``keep``."""
        ys, xs = where
        y0, x0 = ys.start + dy, xs.start + dx
        y1, x1 = min(ys.stop + dy, self.h), min(xs.stop + dx, self.w)
        if y0 >= y1 or x0 >= x1:
            return
        region = (slice(y0, y1), slice(x0, x1))
        moved = mask[:y1 - y0, :x1 - x0] & ~np.isin(self.cls[region], keep)
        self.shade[region][moved] *= factor


def _paint_scene(c: _Canvas, classes: tuple[str, ...]) -> None:  # long on purpose: the painting order reads top to bottom
    """Layers in painting order: ground, fields / barren land / water, roads, paved areas,
    buildings (gable shading, cast shadows), tree clusters (shadows), cars on road lanes,
    clutter. A layer whose class the dataset lacks is skipped."""
    rng, h, w = c.rng, c.h, c.w
    ground = _role(classes, "ground") or 0
    c.cls[:] = ground
    c.tint[:] = rng.uniform()
    for role, per, radius in (("field", 60_000, (30, 70)), ("barren", 90_000, (15, 40)), ("water", 150_000, (25, 60))):
        index = _role(classes, role)
        if index is None:
            continue
        for _ in range(c.count(per)):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            if role == "field":
                got = c.box(cy, cx, rng.uniform(*radius), rng.uniform(*radius), rng.uniform(0, np.pi))
                if got:
                    sl, mask, u, _ = got
                    mask = c.paint(sl, mask, index)
                    c.shade[sl][mask] *= (1 + 0.08 * np.sin(u * rng.uniform(0.6, 1.2)))[mask]  # furrows
            else:
                got = c.blob(cy, cx, rng.uniform(*radius))
                if got:
                    c.paint(*got, index)
    road_idx = _role(classes, "road")
    roads = np.zeros((h, w), bool)
    lanes: list[tuple[str, int, int]] = []
    if road_idx is not None:
        for axis, length in (("h", h), ("v", w)):
            for _ in range(max(1, int(rng.poisson(length / 200)))):
                pos, half = int(rng.uniform(0, length)), int(rng.integers(6, 12))
                sl = (slice(max(pos - half, 0), pos + half), slice(None)) if axis == "h" else \
                    (slice(None), slice(max(pos - half, 0), pos + half))
                c.cls[sl], c.tint[sl], roads[sl] = road_idx, rng.uniform(), True
                lanes.append((axis, pos, half))
    paved = _role(classes, "paved")
    if paved is not None:
        for _ in range(c.count(30_000)):
            got = c.box(rng.uniform(0, h), rng.uniform(0, w), rng.uniform(12, 40), rng.uniform(12, 40), 0.0)
            if got:
                c.paint(got[0], got[1], paved)
    building = _role(classes, "building")
    if building is not None:
        open_ground = [i for i in (ground, paved, _role(classes, "field"), _role(classes, "barren")) if i is not None]
        for _ in range(c.count(2_000)):
            hh, hw = rng.uniform(9, 32), rng.uniform(9, 32)
            got = c.box(rng.uniform(0, h), rng.uniform(0, w), hh, hw, rng.choice([0, np.pi / 2]) + rng.normal(0, 0.08))
            if not got:
                continue
            sl, mask, u, _ = got
            if roads[sl][mask].any() or not np.isin(c.cls[sl][mask], open_ground).all():
                continue  # keep buildings off roads, water and each other
            mask = c.paint(sl, mask, building)
            c.shade[sl][mask & (u > 0)] *= 0.82  # gable roof: one side in the sun, one not
            d = int(rng.integers(3, 7))
            c.shadow(sl, mask, d, d, 0.55, (building,))
    tree = _role(classes, "tree")
    if tree is not None:
        for _ in range(c.count(8_000)):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            for _ in range(int(rng.integers(1, 7))):
                got = c.blob(cy + rng.normal(0, 14), cx + rng.normal(0, 14), rng.uniform(5, 13))
                if got:
                    keep = [i for i in range(len(classes)) if i != building]
                    mask = c.paint(*got, tree, allowed=keep)
                    c.shadow(got[0], mask, 3, 3, 0.7, (tree,) if building is None else (tree, building))
    car = _role(classes, "car")
    if car is not None:
        for axis, pos, half in lanes:
            length = w if axis == "h" else h
            for _ in range(int(rng.poisson(length / 45))):
                along, across = rng.uniform(0, length), pos + rng.choice([-1, 1]) * half / 2
                cy, cx = (across, along) if axis == "h" else (along, across)
                angle = np.pi / 2 if axis == "h" else 0.0
                got = c.box(cy, cx, 5.5, 2.8, angle + rng.normal(0, 0.05))
                if got and roads[got[0]][got[1]].all() and (c.cls[got[0]][got[1]] == road_idx).all():
                    mask = c.paint(got[0], got[1], car, tint=float(rng.integers(0, 2)) * 0.9 + rng.uniform(0, 0.1))
                    c.shade[got[0]][mask & (np.abs(got[2]) < 1.5)] *= 0.6  # windscreen band
    clutter = _role(classes, "clutter")
    if clutter is not None:
        for _ in range(c.count(12_000)):
            got = c.blob(rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 10), 0.4)
            if got:
                c.paint(*got, clutter, allowed=[ground] + ([paved] if paved is not None else []))


def _noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Smooth noise of unit-ish amplitude with features about ``cell`` pixels across."""
    small = rng.standard_normal((h // cell + 2, w // cell + 2)).astype(np.float32)
    return ndimage.zoom(small, cell, order=1)[:h, :w]


def render_scene(classes: tuple[str, ...], height: int, width: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (class indices (H, W) uint8, reflectance (4, H, W) uint8 as red, green, blue, nir)."""
    canvas = _Canvas(height, width, rng)
    _paint_scene(canvas, classes)
    cls, tint = canvas.cls, canvas.tint
    looks = [_LOOKS.get(name, ((128, 128, 128, 128), (96, 96, 96, 96), 8.0, 8.0)) for name in classes]
    a = np.array([lk[0] for lk in looks], np.float32)  # (K, 4)
    b = np.array([lk[1] for lk in looks], np.float32)
    fine_amp = np.array([lk[2] for lk in looks], np.float32)[cls]
    coarse_amp = np.array([lk[3] for lk in looks], np.float32)[cls]
    texture = fine_amp * ndimage.gaussian_filter(rng.standard_normal((height, width), dtype=np.float32), 1.0) * 2.5
    texture += coarse_amp * _noise(rng, height, width, 24)
    light = canvas.shade * np.float32(rng.uniform(0.92, 1.08))
    out = np.empty((4, height, width), np.uint8)
    for ch in range(4):
        value = (b[:, ch] - a[:, ch])[cls]
        value *= tint
        value += a[:, ch][cls]
        value += texture
        value *= light
        value += rng.standard_normal((height, width), dtype=np.float32) * np.float32(2.0)
        np.clip(value, 0, 255, out=value)
        out[ch] = value
    return cls, out


def boundary_band(cls: np.ndarray, radius: int = 1) -> np.ndarray:
    """Pixels within ``radius`` of a class change: what ISPRS eroded labels paint black."""
    size = 2 * radius + 1
    return ndimage.maximum_filter(cls, size) != ndimage.minimum_filter(cls, size)


# ---------------------------------------------------------------- writing raw layouts

@dataclass
class SynthTile:
    """One generated tile: where its files are and its ground truth."""

    tile_id: str
    split: str
    scene: str  # "" or the scene folder (LoveDA Urban/Rural)
    images: dict[str, Path]  # band choice -> image file
    label: Path
    truth: np.ndarray  # (H, W) uint8 class indices, 255 = no-data
    eroded_label: Path | None = None
    truth_eroded: np.ndarray | None = None  # boundary band = 255

    def key(self, bands: str) -> str:
        """The tile key ``prepare`` gives this tile (prefix of its crop stems)."""
        stem = self.images[bands].stem
        return f"{self.scene}_{stem}" if self.scene else stem


@dataclass
class SynthScenes:
    dataset: str
    root: Path
    tiles: list[SynthTile] = field(default_factory=list)


def tile_plan(spec: DatasetSpec, n: int) -> list[tuple[str, str, str]]:
    """``(tile id, split, scene)`` of the first ``n`` synthetic tiles; order in the module doc."""
    if spec.official_train:
        train = [t for t in spec.official_train if t not in spec.val_tiles]
        val, test = list(spec.val_tiles), list(spec.official_test)
        order = train[:1] + val[:1] + test[:1] + train[1:] + test[1:] + val[1:]
        if n > len(order):
            raise CmdbError(f"{spec.title} has {len(order)} official tile ids; ask for at most that many tiles")
        return [(t, official_split(spec, t)[0], "") for t in order[:n]]
    scenes = spec.scene_folders or ("",)
    return [(str(i), "val" if i % 3 == 1 else "train", scenes[i % len(scenes)]) for i in range(n)]


def _write_image(path: Path, array: np.ndarray, georef: dict, bands: tuple[str, ...] = ()) -> None:
    """(C, H, W) uint8 as PNG (when the name says so) or GeoTIFF, atomically.

    ``bands`` names the image's bands; the GeoTIFF tags them so (a near-infrared band is
    never tagged alpha, which readers would take for a mask).
    """
    with atomic_path(path) as tmp, warnings.catch_warnings():
        if path.suffix.lower() == ".png":
            from PIL import Image

            Image.fromarray(array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)).save(tmp, format="PNG")
        else:
            import rasterio
            from rasterio.enums import ColorInterp
            from rasterio.errors import NotGeoreferencedWarning

            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            profile = {"driver": "GTiff", "height": array.shape[1], "width": array.shape[2],
                       "count": array.shape[0], "dtype": "uint8", **georef}
            if bands and tuple(bands) != ("red", "green", "blue"):
                profile["photometric"] = "MINISBLACK"
            with rasterio.open(tmp, "w", **profile) as dst:
                dst.write(array)
                if bands:
                    dst.colorinterp = [getattr(ColorInterp, b, ColorInterp.undefined) for b in bands]


def synth(dataset: str, out: str | os.PathLike, tiles: int = 6, size: int = 512, seed: int = 0) -> SynthScenes:
    """Write ``tiles`` synthetic scenes of ``dataset`` under ``out`` in its download layout.

    Every band choice of the spec is written (Potsdam: RGB, IRRG and RGBIR folders), plus the
    colour or index labels and, where the dataset has them, eroded labels. Tiles are
    ``size`` pixels on their short side; datasets with oblong tiles keep that aspect.
    """
    spec = get_spec(dataset)
    if tiles < 1 or size < 16:
        raise CmdbError(f"need at least 1 tile of at least 16 pixels (got {tiles} tiles of {size})")
    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise CmdbError(f"synthetic output must be a new or empty folder: {root}")
    rng = np.random.default_rng(seed)
    th, tw = spec.tile_size
    height, width = (round(size * th / tw), size) if th >= tw else (size, round(size * tw / th))
    result = SynthScenes(spec.name, root)
    for i, (tile_id, split, scene) in enumerate(tile_plan(spec, tiles)):
        truth, refl = render_scene(spec.classes, height, width, rng)
        if spec.nodata_values and i % 2 == 0:  # a no-data margin, as at LoveDA scene borders
            margin = int(rng.integers(width // 16, width // 6))
            truth[:, -margin:] = spec.ignore_index
            refl[:, :, -margin:] = 0
        georef = {}
        if spec.crs_epsg is not None:
            from affine import Affine
            from rasterio.crs import CRS

            px = spec.pixel_size_m  # north-up, origin at the top-left corner, tiles side by side
            georef = {"crs": CRS.from_epsg(spec.crs_epsg),
                      "transform": Affine(px, 0.0, 500_000.0 + i * width * px, 0.0, -px, 5_500_000.0)}
        base = root
        if spec.split_folders:
            base = root / spec.split_folders[split][0] / scene
        images = {}
        for band in spec.bands:
            path = base / band.download_folders[0] / spec.image_template.format(id=tile_id, tag=band.tag)
            _write_image(path, refl[[_CHANNELS.index(n) for n in band.band_names]], georef, band.band_names)
            images[band.name] = path
        label_path = base / spec.label_folders[0] / spec.label_templates[0].format(id=tile_id)
        tile = SynthTile(tile_id, split, scene, images, label_path, truth)
        if spec.label_kind == "color":
            palette = np.array(spec.palette, np.uint8)
            _write_image(label_path, np.moveaxis(palette[truth], -1, 0), georef)
            if spec.eroded_label_templates and spec.boundary_color is not None:
                edge = boundary_band(truth)
                colours = palette[truth]
                colours[edge] = spec.boundary_color
                tile.eroded_label = (base / spec.eroded_label_folders[0]
                                     / spec.eroded_label_templates[0].format(id=tile_id))
                _write_image(tile.eroded_label, np.moveaxis(colours, -1, 0), georef)
                tile.truth_eroded = np.where(edge, spec.ignore_index, truth).astype(np.uint8)
        else:
            raw = np.full(256, spec.nodata_values[0] if spec.nodata_values else 0, np.uint8)
            raw[:spec.num_classes] = spec.label_values
            _write_image(label_path, raw[truth][None], georef)
        result.tiles.append(tile)
    return result
