"""Export to ONNX for onnxruntime and QGIS's Deepness plugin: ``cmdb export`` / ``cmdbnet.export(...)``.

``onnx`` traces the network and writes the file, ``metadata`` describes it for Deepness and for
``cmdb predict -k model.onnx``, ``check`` compares onnxruntime with PyTorch before the file is
kept. The package is callable, ``cmdbnet.export(run, "model.onnx")``, mirroring the command.
"""

from __future__ import annotations

import sys
import types

from cmdbnet.export.onnx import export

__all__ = ["export"]


class _CallablePackage(types.ModuleType):
    """``cmdbnet.export`` is this package and the function at once: the public API mirrors the CLI."""

    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
