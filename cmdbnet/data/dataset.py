"""The torch Dataset over a prepared folder (``cmdb prepare`` output).

Why read the manifest and not glob the folders: the manifest is what ``prepare`` vouches
for (complete crops, their classes and ignore index); a stray or half-copied file in a
split folder is never picked up.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from cmdbnet.data.manifest import read_manifest
from cmdbnet.data.transforms import eval_transform
from cmdbnet.errors import CmdbError
from cmdbnet.settings import DataSettings

__all__ = ["PreparedDataset", "read_manifest"]

def _read_crop(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(C, H, W) image and (1, H, W) label of one crop.

    GDAL lists a file's folder on every open to look for side-car files; a split folder holds
    thousands of crops, so that listing is turned off (twice as fast in a 12,000-file folder).
    """
    out = []
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        for path in (image_path, label_path):
            try:
                with rasterio.open(path) as src:
                    out.append(src.read())
            except RasterioError as exc:
                reason = str(exc).splitlines()[0] if str(exc) else "unreadable"
                raise CmdbError(f"cannot read crop {path}: {reason}; re-run cmdb prepare") from None
    return out[0], out[1]


class PreparedDataset(torch.utils.data.Dataset):
    """Crops of one split: ``{"image": (C, H, W) float32 normalised, "label": (H, W) int64, "name"}``.

    ``transform`` is an albumentations pipeline (see ``transforms``) called as
    ``transform(image=(H, W, C) array, mask=(H, W) array)``; it must normalise. Without one,
    images are normalised with the default ``data.mean``/``data.std`` of the settings.
    """

    def __init__(self, root: str | os.PathLike, split: str, transform: Callable | None = None,
                 seed_workers: bool = True):
        """``seed_workers=False`` when the caller seeds the transform per sample itself
        (the trainer does, for exact resume), so this class must not reseed it."""
        self.root = Path(root)
        self.seed_workers = seed_workers
        self.manifest = read_manifest(self.root)
        self.split = split
        self.classes: list[str] = list(self.manifest["classes"])
        self.ignore_index: int = int(self.manifest["ignore_index"])
        stems = self.manifest["crops"].get(split) or []
        if not stems:
            have = ", ".join(f"{s} ({len(v)})" for s, v in self.manifest["crops"].items() if v) or "none"
            raise CmdbError(f"split {split!r} has no crops in {self.root}; splits with crops: {have}")
        self.stems: list[str] = sorted(stems)
        if transform is None:
            defaults = DataSettings()
            if len(defaults.mean) != int(self.manifest["band_count"]):
                raise CmdbError(f"{self.root} holds {self.manifest['band_count']}-band crops: pass a transform "
                                f"normalising with {self.manifest['band_count']} mean/std values (data.mean, data.std)")
            transform = eval_transform(defaults.mean, defaults.std)
        self.transform = transform
        self._seeded_for: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.stems)

    def _seed_worker(self) -> None:
        """Give each loader worker (and the main process) its own reproducible augmentation stream."""
        if not self.seed_workers:
            return
        info = torch.utils.data.get_worker_info()
        key = (os.getpid(), info.id if info is not None else -1)
        if key != self._seeded_for and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(torch.initial_seed() % 2**32)
            self._seeded_for = key

    def _check_label(self, label: np.ndarray, path: Path) -> None:
        """A label value that is no class and not the ignore index would crash the loss far from here."""
        k = len(self.classes)
        if label.size and int(label.max()) >= k:
            bad = np.unique(label[(label >= k) & (label != self.ignore_index)])
            if bad.size:
                raise CmdbError(f"{path}: label value {int(bad[0])} is not a class (0..{k - 1}) nor the ignore "
                                f"index {self.ignore_index}; re-run cmdb prepare")

    def __getitem__(self, i: int) -> dict[str, Any]:
        stem = self.stems[i]
        folder = self.root / self.split
        image, label = _read_crop(folder / "images" / f"{stem}.tif", folder / "labels" / f"{stem}.tif")
        self._check_label(label, folder / "labels" / f"{stem}.tif")
        image, label = np.moveaxis(image, 0, -1), label[0]  # (H, W, C) and (H, W) for albumentations
        self._seed_worker()
        out = self.transform(image=image, mask=label)
        image, label = out["image"], out["mask"]
        return {"image": torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0), dtype=np.float32)),
                "label": torch.from_numpy(np.ascontiguousarray(label).astype(np.int64)),
                "name": stem}
