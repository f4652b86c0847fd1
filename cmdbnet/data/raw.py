"""Find image/label pairs in a raw dataset folder, in whichever layout it came in.

Why: users download the ISPRS and LoveDA data in their official layouts, peers expect a
hand-made pre-split layout, and a wrong guess usually surfaces hours later as an empty
training set. Here every layout is tried in a fixed order and, when none matches, the error
lists what was expected. Folder and file names come from the :class:`DatasetSpec` only.

Layouts, tried in this order:

* ``split-folders``: split first, as LoveDA ships (``Train|Val/{Urban,Rural}/{images_png,
  masks_png}``) or pre-split (``{train,val}/{images,labels}``); splits from folder names.
* ``presplit``: band folder first, the layout of the datasets' mirrors (``RGB/{train,val,test}`` and
  ``Label/{train,val,test}``); splits from folder names.
* ``download``: flat folders of tiles as the ISPRS download (``2_Ortho_RGB/`` and
  ``5_Labels_all/``, ``top/`` and ``gts_for_participants/``; the root itself is accepted
  too); splits from the official tile lists of the spec (see ``registry`` for the policy).
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from cmdbnet.data.registry import BandChoice, DatasetSpec
from cmdbnet.errors import CmdbError
from cmdbnet.utils import broken_link

PRESPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class RawTile:
    """One raw image and its label; ``key`` prefixes the stems of its crops."""

    key: str
    tile_id: str
    split: str
    image: Path
    label: Path
    listed: bool = True  # False: the id is in no official list (put in train)
    window: tuple[int, int, int, int] | None = None  # (row, col, height, width): a block of a larger image


@dataclass
class RawScan:
    """What was found under a raw folder, and how its splits were decided."""

    layout: str
    split_policy: str
    tiles: list[RawTile]
    notes: list[str] = field(default_factory=list)  # warnings for the user and the manifest


def official_split(spec: DatasetSpec, tile_id: str) -> tuple[str, bool]:
    """``(split, listed)`` of a tile of a download layout: val tiles, official train, test."""
    if tile_id in spec.val_tiles:
        return "val", True
    if tile_id in spec.official_train:
        return "train", True
    if tile_id in spec.official_test:
        return "test", True
    return "train", False


def _first_dir(base: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (base / name).is_dir():
            return base / name
    return None


def _label_names(spec: DatasetSpec, eroded: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(folders, templates) where labels are looked for; eroded labels may sit in either folder."""
    if eroded:
        if not spec.eroded_label_templates:
            raise CmdbError(f"{spec.title} has no eroded (noBoundary) labels; drop --eroded")
        return spec.eroded_label_folders + spec.label_folders, spec.eroded_label_templates
    return spec.label_folders, spec.label_templates


def _images_in(spec: DatasetSpec, band: BandChoice, folder: Path) -> list[tuple[str, Path]]:
    """``(tile id, path)`` of the images of ``band`` in ``folder``, sorted by name."""
    pattern = re.compile(spec.image_pattern)
    found = []
    for path in sorted(folder.iterdir()):
        m = pattern.match(path.name)
        if m and broken_link(path):
            warnings.warn(broken_link(path), UserWarning, stacklevel=2)
        if not m or not path.is_file():
            continue
        tag = m.groupdict().get("tag")
        if tag is not None and band.tag and tag != band.tag:
            continue
        found.append((m.group("id"), path))
    return found


def _pair(spec: DatasetSpec, images: list[tuple[str, Path]], label_dir: Path, templates: tuple[str, ...],
          eroded: bool, folders: tuple[str, ...] = ()) -> list[tuple[str, Path, Path]]:
    """Match each image to its label file; a missing label is an error naming both.

    ``folders``: when no label folder was found, the names looked for (named in the error).
    """
    pairs = []
    for tile_id, image in images:
        names = [t.format(id=tile_id) for t in templates]
        # an image is never its own label (Vaihingen labels share the image's name)
        label = next((label_dir / n for n in names
                      if (label_dir / n).is_file() and (label_dir / n).resolve() != image.resolve()), None)
        if label is None:
            hint = ""
            if not eroded and spec.eroded_label_templates:
                other = [label_dir / t.format(id=tile_id) for t in spec.eroded_label_templates]
                if any(p.is_file() for p in other):
                    hint = " (only an eroded noBoundary label is there: pass --eroded)"
            where = f"{names[0]} in a label folder ({', '.join(folders)})" if folders else label_dir / names[0]
            raise CmdbError(f"image without its label: {image} (expected {where}){hint}")
        pairs.append((tile_id, image, label))
    return pairs


def _scan_split_folders(spec, band, root, label_folders, templates, eroded) -> RawScan | None:
    tiles, notes, seen = [], [], set()
    for split, names in spec.split_folders.items():
        for name in names:
            split_dir = root / name
            if not split_dir.is_dir():
                continue
            inode = (split_dir.stat().st_dev, split_dir.stat().st_ino)
            if inode in seen:  # Train and train are one folder on case-insensitive file systems
                continue
            seen.add(inode)
            scenes = [(s, split_dir / s) for s in spec.scene_folders if (split_dir / s).is_dir()]
            for scene, container in scenes or [("", split_dir)]:
                image_dir = _first_dir(container, band.download_folders + spec.image_folders)
                if image_dir is None:
                    continue
                label_dir = _first_dir(container, label_folders)
                if label_dir is None:
                    notes.append(f"{container}: no label folder ({' or '.join(label_folders)}): skipped")
                    continue
                images = _images_in(spec, band, image_dir)
                for tile_id, image, label in _pair(spec, images, label_dir, templates, eroded):
                    key = f"{scene}_{image.stem}" if scene else image.stem
                    tiles.append(RawTile(key, tile_id, split, image, label))
    if not tiles and not notes:
        return None
    return RawScan("split-folders", "split folders of the raw layout (Train -> train, Val -> val)", tiles, notes)


def _scan_presplit(spec, band, root, label_folders, templates, eroded) -> RawScan | None:
    tiles, notes, seen = [], [], False
    image_names = band.download_folders + spec.image_folders
    for split in PRESPLIT_NAMES:
        image_dir = next((root / n / split for n in image_names if (root / n / split).is_dir()), None)
        if image_dir is None:
            continue
        seen = True
        label_dir = next((root / n / split for n in label_folders if (root / n / split).is_dir()), None)
        if label_dir is None:
            notes.append(f"{image_dir}: no label folder ({' or '.join(f'{n}/{split}' for n in label_folders)}): "
                         "skipped")
            continue
        for tile_id, image, label in _pair(spec, _images_in(spec, band, image_dir), label_dir, templates, eroded):
            tiles.append(RawTile(image.stem, tile_id, split, image, label))
    if not seen:
        return None
    return RawScan("presplit", "split folders of the raw layout (train, val, test as found)", tiles, notes)


def _scan_download(spec, band, root, label_folders, templates, eroded) -> RawScan | None:
    image_dir = _first_dir(root, band.download_folders + spec.image_folders) or root
    images = _images_in(spec, band, image_dir)
    if not images:
        return None
    label_dir = _first_dir(root, label_folders)
    tiles, unlisted = [], []
    for tile_id, image, label in _pair(spec, images, label_dir or root, templates, eroded,
                                       () if label_dir else label_folders):
        split, listed = official_split(spec, tile_id)
        tiles.append(RawTile(image.stem, tile_id, split, image, label, listed))
        if not listed:
            unlisted.append(tile_id)
    notes = []
    if unlisted:
        notes.append(f"tile id(s) in no official list, put in train: {', '.join(unlisted)}")
    policy = (f"official {spec.title} lists: train = official train minus val tiles "
              f"({', '.join(spec.val_tiles)}), val = those tiles, test = official test")
    return RawScan("download", policy, tiles, notes)


def _expected(spec: DatasetSpec, band: BandChoice, label_folders: tuple[str, ...]) -> str:
    images = band.download_folders + spec.image_folders
    if spec.split_folders:
        splits = "|".join(n for names in spec.split_folders.values() for n in names)
        scenes = f"[{'|'.join(spec.scene_folders)}/]" if spec.scene_folders else ""
        return f"{{{splits}}}/{scenes}{{{'|'.join(images)}, {'|'.join(label_folders)}}}/"
    return (f"{'|'.join(images)}/ and {'|'.join(label_folders)}/ (download layout, or the same with "
            f"train/val/test sub-folders)")


def find_tiles(spec: DatasetSpec, root: str | Path, bands: str | None = None, eroded: bool = False) -> RawScan:
    """Every image/label pair under ``root``, with its split; one clear error when none is found."""
    root = Path(root)
    if not root.exists():
        raise CmdbError(f"raw folder not found: {root}")
    if not root.is_dir():
        raise CmdbError(f"raw folder is not a folder: {root}")
    band = spec.band(bands)
    label_folders, templates = _label_names(spec, eroded)
    scanners = (_scan_split_folders,) if spec.split_folders else (_scan_presplit, _scan_download)
    for scanner in scanners:
        scan = scanner(spec, band, root, label_folders, templates, eroded)
        if scan is None:
            continue
        if not scan.tiles:
            raise CmdbError(f"no labelled {spec.title} images under {root}: " + "; ".join(scan.notes))
        keys = [t.key for t in scan.tiles]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise CmdbError(f"the same tile appears in more than one split under {root}: {', '.join(dupes)}")
        return scan
    example = spec.image_template.format(id=(spec.official_train or ("1",))[0], tag=band.tag)
    raise CmdbError(f"no {spec.title} {band.name.upper()} images found under {root}: expected "
                    f"{_expected(spec, band, label_folders)} with files named like {example}")


# ---------------------------------------------------------------- reading rasters

SUPPORTED_DTYPES = ("uint8", "uint16", "int16", "float32")
UNKNOWN = 254  # what the decoder gives a pixel outside the palette: neither a class (< 254) nor ignore


@dataclass(frozen=True)
class RasterInfo:
    """Header facts of a raw image, checked before any crop is written."""

    height: int
    width: int
    count: int
    dtype: str
    crs: str | None
    georeferenced: bool
    indexes: tuple[int, ...] | None = None  # source bands read (None: all)


def open_raster(path: Path, what: str = "image"):
    """``rasterio.open`` with one clear error for unreadable files; close it with ``with``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioError as exc:
        reason = (str(exc).strip().splitlines() or ["unreadable"])[0]
        raise CmdbError(f"cannot read {what} {path}: not a readable raster, corrupt or truncated? ({reason})") from None


def read_rows(ds, row: int, rows: int, what: str = "image", indexes: tuple[int, ...] | None = None,
              cols: tuple[int, int] | None = None) -> np.ndarray:
    """Rows ``row .. row+rows`` of every band (or ``indexes``) as (C, rows, W): the only way tiles
    are read; ``cols`` = (first column, width) of a block."""
    col, width = cols or (0, ds.width)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return ds.read(list(indexes) if indexes else None, window=Window(col, row, width, rows))
    except RasterioError as exc:
        cause = exc.__cause__ or exc.__context__ or exc  # rasterio wraps GDAL's own message
        reason = (str(cause).strip().splitlines() or ["read failed"])[0]
        raise CmdbError(f"cannot read {what} {ds.name} at rows {row}..{row + rows}: corrupt or truncated? "
                        f"({reason})") from None


def check_tile(spec: DatasetSpec, band: BandChoice, tile: RawTile) -> RasterInfo:
    """Header checks of an image and its label (bands, dtype, sizes), before anything is cut."""
    with open_raster(tile.image, "image") as img:
        height, width = tile.window[2:] if tile.window else (img.height, img.width)
        info = RasterInfo(height, width, len(band.indexes) or img.count, img.dtypes[0],
                          img.crs.to_string() if img.crs else None,
                          img.crs is not None or not img.transform.is_identity, band.indexes or None)
        if band.indexes and max(band.indexes) > img.count:
            raise CmdbError(f"{tile.image}: --bands {band.name}: band {max(band.indexes)} is out of range "
                            f"(the image has {img.count} band(s))")
        if band.count and not band.indexes and img.count != band.count:
            raise CmdbError(f"{tile.image}: {img.count} band(s), but {spec.title} {band.name.upper()} images have "
                            f"{band.count}")
        if len(set(img.dtypes)) != 1 or info.dtype not in SUPPORTED_DTYPES:
            raise CmdbError(f"{tile.image}: unsupported data type {'/'.join(sorted(set(img.dtypes)))}; "
                            f"supported: {', '.join(SUPPORTED_DTYPES)}")
    if spec.vector is not None:
        return info  # polygons: checked and rasterised on the image's grid by ``vector``
    want = 3 if spec.label_kind == "color" else 1
    dtypes = ("uint8",) if want == 3 or not spec.source else ("uint8", "uint16")
    with open_raster(tile.label, "label") as lab:
        if lab.count != want or lab.dtypes[0] not in dtypes:
            kind = "RGB colour" if want == 3 else "single-band index"
            raise CmdbError(f"{tile.label}: expected a {kind} label (uint8, {want} band(s)), "
                            f"got {lab.count} band(s) of {lab.dtypes[0]}")
        if (lab.height, lab.width) != (img.height, img.width):
            raise CmdbError(f"image/label size mismatch: {tile.image} is {img.width}x{img.height}, "
                            f"{tile.label} is {lab.width}x{lab.height}")
    return info


# ---------------------------------------------------------------- labels to class indices

def _lookup(spec: DatasetSpec, eroded: bool) -> np.ndarray:
    ignored = spec.ignore_colors + ((spec.boundary_color,) if eroded and spec.boundary_color else ())
    return _table(spec.label_kind, spec.palette, ignored, spec.label_values, spec.nodata_values, spec.ignore_index)


@functools.lru_cache(maxsize=8)
def _table(kind: str, palette: tuple, ignored: tuple, values: tuple, nodata: tuple, ignore_index: int) -> np.ndarray:
    """Raw label key -> class index; colour keys are RGB packed into 24 bits (a 16 MiB table)."""
    if kind == "color":
        lut = np.full(1 << 24, UNKNOWN, np.uint8)
        for index, (r, g, b) in enumerate(palette):
            lut[(r << 16) | (g << 8) | b] = index
        for r, g, b in ignored:
            lut[(r << 16) | (g << 8) | b] = ignore_index
    else:
        lut = np.full(1 << 16, UNKNOWN, np.uint8)  # uint8 and uint16 index labels
        lut[list(values)] = np.arange(len(values), dtype=np.uint8)
        lut[list(nodata)] = ignore_index
    lut.setflags(write=False)
    return lut


class LabelDecoder:
    """Raw label pixels -> uint8 class indices (ignore index for boundaries and no-data).

    Why a lookup table: one gather per pixel, whatever the palette size; a pixel outside the
    palette becomes ``UNKNOWN`` and the caller reports it, never maps it to some class.
    """

    def __init__(self, spec: DatasetSpec, eroded: bool):
        self.spec, self.eroded = spec, eroded
        self.lut = _lookup(spec, eroded)

    def keys(self, raw: np.ndarray) -> np.ndarray:
        """(C, H, W) raw label -> (H, W) lookup keys."""
        if self.spec.label_kind == "color":
            # RGB -> 0x00RRGGBB by laying the bytes out little-endian and viewing them as uint32:
            # several times faster than shifting three uint32 copies.
            packed = np.zeros(raw.shape[1:] + (4,), np.uint8)
            packed[..., 0], packed[..., 1], packed[..., 2] = raw[2], raw[1], raw[0]
            return packed.view("<u4")[..., 0]
        return raw[0]

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        return self.lut[self.keys(raw)]

    def describe(self, key: int) -> str:
        if self.spec.label_kind == "color":
            return f"colour ({key >> 16}, {(key >> 8) & 255}, {key & 255})"
        return f"value {key}"

    def off_palette_error(self, ds) -> CmdbError:
        """Count every off-palette value of a whole label file and name the most common one."""
        found: dict[int, int] = {}
        for row in range(0, ds.height, 512):
            keys = self.keys(read_rows(ds, row, min(512, ds.height - row), "label"))
            bad = keys[self.lut[keys] == UNKNOWN]
            for k, n in zip(*np.unique(bad, return_counts=True)):
                found[int(k)] = found.get(int(k), 0) + int(n)
        key, count = max(found.items(), key=lambda kv: kv[1])
        msg = f"{ds.name}: label {self.describe(key)} is not in the {self.spec.title} palette ({count} px)"
        if len(found) > 1:
            msg += f"; {len(found) - 1} other off-palette value(s), {sum(found.values()) - count} px"
        if self.spec.source:
            msg += f"; add it to the classes or the ignore list of {self.spec.source}"
        if not self.eroded and self.spec.boundary_color is not None:
            r, g, b = self.spec.boundary_color
            if (r << 16) | (g << 8) | b in found:
                msg += "; black marks eroded boundaries: pass --eroded for noBoundary labels"
        return CmdbError(msg)
