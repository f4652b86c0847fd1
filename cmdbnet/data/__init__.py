"""Data layer: dataset specs, raw readers, ``prepare``, synthetic scenes, the torch Dataset.

Names are imported lazily so that ``cmdb prepare`` and ``cmdb synth`` start without
importing torch or albumentations (only the Dataset and transforms need them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DatasetSpec": "registry", "BandChoice": "registry", "DATASETS": "registry", "get_spec": "registry",
    "IGNORE_INDEX": "registry",
    "RawTile": "raw", "RawScan": "raw", "find_tiles": "raw", "LabelDecoder": "raw",
    "prepare": "tiling", "crop_windows": "tiling", "axis_starts": "tiling", "PrepareWarning": "tiling",
    "synth": "synthetic", "render_scene": "synthetic", "tile_plan": "synthetic", "SynthScenes": "synthetic",
    "SynthTile": "synthetic",
    "read_manifest": "manifest", "PreparedDataset": "dataset",
    "train_transform": "transforms", "eval_transform": "transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from .dataset import PreparedDataset
    from .manifest import read_manifest
    from .raw import LabelDecoder, RawScan, RawTile, find_tiles
    from .registry import DATASETS, IGNORE_INDEX, BandChoice, DatasetSpec, get_spec
    from .synthetic import SynthScenes, SynthTile, render_scene, synth, tile_plan
    from .tiling import PrepareWarning, axis_starts, crop_windows, prepare
    from .transforms import eval_transform, train_transform
