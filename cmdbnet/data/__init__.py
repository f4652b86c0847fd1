"""Data layer: dataset specs, raw readers, ``prepare``, synthetic scenes, the torch Dataset.

Names are imported lazily so that ``cmdb prepare`` and ``cmdb synth`` start without
importing torch or albumentations (only the Dataset and transforms need them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DatasetSpec": "registry", "BandChoice": "registry", "DATASETS": "registry", "get_spec": "registry",
    "IGNORE_INDEX": "registry", "read_dataset_yaml": "custom", "load_spec": "custom",
    "RawTile": "raw", "RawScan": "raw", "find_tiles": "raw", "LabelDecoder": "raw",
    "prepare": "preparation", "crop_windows": "preparation", "axis_starts": "preparation", "PrepareWarning": "preparation",
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
    from cmdbnet.data.custom import load_spec, read_dataset_yaml
    from cmdbnet.data.dataset import PreparedDataset
    from cmdbnet.data.manifest import read_manifest
    from cmdbnet.data.preparation import PrepareWarning, axis_starts, crop_windows, prepare
    from cmdbnet.data.raw import LabelDecoder, RawScan, RawTile, find_tiles
    from cmdbnet.data.registry import DATASETS, IGNORE_INDEX, BandChoice, DatasetSpec, get_spec
    from cmdbnet.data.synthetic import SynthScenes, SynthTile, render_scene, synth, tile_plan
    from cmdbnet.data.transforms import eval_transform, train_transform
