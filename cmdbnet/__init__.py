"""cmdbnet: CNN + Mamba dual-branch semantic segmentation of aerial imagery.

The public API mirrors the command line; names load lazily so ``import cmdbnet`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "synth": "cmdbnet.data.synthetic",
    "prepare": "cmdbnet.data.preparation",
    "train": "cmdbnet.api",
    "ablation": "cmdbnet.ablation",
    "evaluate": "cmdbnet.evaluation",
    "predict": "cmdbnet.inference.files",
    "export": "cmdbnet.export",  # the package itself, which is callable: cmdbnet.export(run, "model.onnx")
    "build_model": "cmdbnet.models",
    "load_settings": "cmdbnet.settings",
    "Settings": "cmdbnet.settings",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cmdbnet' has no attribute {name!r}")
    value = importlib.import_module(module)
    value = value if module == f"{__name__}.{name}" else getattr(value, name)
    globals()[name] = value
    return value
