"""Export to ONNX for onnxruntime and QGIS's Deepness plugin: ``cmdb export`` / ``cmdbnet.export(...)``.

``onnx`` traces the network and writes the file, ``metadata`` describes it for Deepness and for
``cmdb predict -k model.onnx``, ``check`` compares onnxruntime with PyTorch before the file is
kept. The package is callable, ``cmdbnet.export(run, "model.onnx")``, mirroring the command.
"""

from __future__ import annotations

from cmdbnet.export.onnx import export
from cmdbnet.utils import callable_package

__all__ = ["export"]

callable_package(__name__, export)
