"""``cmdb export``: a checkpoint's network as one self-describing ONNX file (``cmdbnet.export``).

Scan route. The selective scan is exported in its log-depth form (``scan.parallel.export_scan``,
switched in by ``models.exporting``): Hillis-Steele levels of slice, multiply-add and concat.
At a fixed tile every scan has a fixed length L, so the graph holds ceil(log2 L) levels of
ordinary ops: no custom op, no ONNX ``Scan``/``Loop`` (whose L sequential steps onnxruntime
would run one by one), the same combination of (decay, input) pairs as the torch_parallel
backend, and a result equal to the C scan within fp32 rounding (``--check`` measures it).

Exporter. The TorchScript exporter (``dynamo=False``) traces this network into a graph equal to
PyTorch in a fraction of the dynamo exporter's time (benchmarks/RESULTS.md); the dynamo exporter
(needs onnxscript) runs where the TorchScript one is missing or fails. The batch axis stays
dynamic unless ``batch`` fixes it; height and width are the tile.

Compatibility: opset 17 (LayerNormalization as one op) and ONNX IR version 8 by default, which
onnxruntime 1.17 (the newest that QGIS's Deepness plugin allows) loads, as does the newest.

Output: class probabilities (B, K, tile, tile), the softmax inside the graph; with ``boundary``
a second output, the boundary probability (B, 1, tile, tile) (Deepness reads one output only:
files for QGIS are exported without it). The file is written under a temporary name, checked
(``check``), and renamed only when it passes.
"""

from __future__ import annotations

import io
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmdbnet.checkpoint import load_model, resolve_checkpoint
from cmdbnet.data.registry import get_spec
from cmdbnet.errors import CmdbError
from cmdbnet.export.check import check_inputs, compare
from cmdbnet.export.metadata import cmdbnet_metadata, deepness_metadata, model_metadata
from cmdbnet.inference.onnx_runner import load_onnx_model, require
from cmdbnet.inference.rasters import ModelMeta
from cmdbnet.models.exporting import exporting
from cmdbnet.utils import atomic_path, file_sha256

__all__ = ["export", "IR_VERSION", "OPSETS"]

IR_VERSION = {17: 8, 18: 8, 19: 9, 20: 9}  # the IR each opset came with; onnxruntime 1.17 reads IR <= 9
OPSETS = tuple(IR_VERSION)
INPUT, OUTPUTS = "image", ("probs", "boundary")


class Probabilities(nn.Module):
    """The network with its softmax (and the boundary's sigmoid): what the ONNX graph computes."""

    def __init__(self, net: nn.Module, boundary: bool):
        super().__init__()
        self.net, self.boundary = net, boundary

    def forward(self, x: torch.Tensor):
        out = self.net(x)
        probs = out["seg"].softmax(1)
        return (probs, out["boundary"].sigmoid()) if self.boundary else probs


def export(source: str | os.PathLike, out: str | os.PathLike, tile: int | None = None,
           batch: int | str = "dynamic", opset: int = 17, boundary: bool = False, check: bool = True,
           exporter: str = "auto") -> dict[str, Any]:
    """Export a checkpoint (file or run folder) to ``out`` (.onnx); returns a summary.

    ``tile``: the fixed window (default: the run's predict tile, 512 unless it changed it).
    ``batch``: "dynamic" or a fixed number. ``check``: compare with PyTorch before the file
    takes its name (module docstring). ``exporter``: "auto", "torchscript" or "dynamo".
    """
    onnx = require("onnx")
    require("onnxruntime")
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise CmdbError(f"{out}: the output must end in .onnx")
    if opset not in IR_VERSION:
        raise CmdbError(f"--opset {opset} is not supported; choose one of {', '.join(map(str, OPSETS))}")
    fixed = _batch(batch)
    path = resolve_checkpoint(source)
    model, ckpt = load_model(path, "cpu")
    meta = ModelMeta.from_checkpoint(ckpt, path)
    settings = ckpt["settings_obj"]
    tile = int(tile or settings.predict.tile)
    if tile < 32 or tile % 32:
        raise CmdbError(f"--tile {tile}: must be a positive multiple of 32, the network's stride")
    if boundary and model.boundary is None:
        raise CmdbError(f"{path}: this network (variant {settings.model.variant}) has no boundary head; "
                        "drop --boundary")
    t0 = time.perf_counter()
    proto, used = _trace(Probabilities(model, boundary).eval(), meta.band_count, tile, fixed, opset, boundary,
                         exporter)
    seconds = time.perf_counter() - t0
    pixel = _pixel_size(ckpt["dataset"])
    overlap = settings.predict.overlap
    props = model_metadata(deepness_metadata(meta, tile, overlap, pixel),
                           cmdbnet_metadata(meta, ckpt["dataset"], tile, overlap, pixel, boundary,
                                            settings.model.variant, file_sha256(path)))
    proto.ir_version = min(proto.ir_version, IR_VERSION[opset])
    _static_outputs(proto, (len(meta.classes), 1), tile)
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name, proto.doc_string = "cmdbnet", f"cmdbnet {settings.model.variant} segmentation network"
    summary: dict[str, Any] = {"source": str(path), "output": str(out), "tile": tile, "batch": fixed or "dynamic",
                               "opset": opset, "ir_version": proto.ir_version, "exporter": used,
                               "boundary_output": boundary, "classes": list(meta.classes),
                               "nodes": len(proto.graph.node), "export_seconds": round(seconds, 2)}
    with atomic_path(out, suffix=".onnx") as tmp:
        onnx.save(proto, str(tmp))
        if check:
            runner = load_onnx_model(tmp, "cpu")[0]
            result = compare(model, runner, check_inputs(meta, tile), fixed)
            summary["check"] = result
            if not result["passed"]:
                raise CmdbError(f"{out}: onnxruntime disagrees with PyTorch (max abs probability difference "
                                f"{result['max_abs_diff']:.2e}, boundary {result['boundary_max_abs_diff']:.2e}, "
                                f"arg-max agreement {100 * result['argmax_agreement']:.3f}%; limits 1e-4 and "
                                "99.99%); no file written")
    summary["bytes"] = out.stat().st_size
    return summary


def _static_outputs(proto, channels: tuple[int, ...], tile: int) -> None:
    """Outputs declared (batch, channels, tile, tile): Deepness reads K from the declared shape,
    which the TorchScript exporter leaves symbolic."""
    for out, k in zip(proto.graph.output, channels):
        dims = out.type.tensor_type.shape.dim
        for dim, value in zip(list(dims)[1:], (k, tile, tile)):
            dim.Clear()
            dim.dim_value = value


def _batch(batch: int | str) -> int | None:
    if str(batch).strip().lower() == "dynamic":
        return None
    try:
        n = int(batch)
    except ValueError:
        n = 0
    if n < 1:
        raise CmdbError(f"--batch {batch!r}: use 'dynamic' or a positive number of windows")
    return n


def _pixel_size(ds: dict[str, Any]) -> float | None:
    """Pixel size in metres: the checkpoint's, else its registered dataset's, else unknown."""
    if ds.get("pixel_size_m"):
        return float(ds["pixel_size_m"])
    try:
        return float(get_spec(str(ds.get("name", ""))).pixel_size_m)
    except (CmdbError, KeyError, ValueError, AttributeError):
        return None


def _trace(wrapper: nn.Module, bands: int, tile: int, batch: int | None, opset: int, boundary: bool,
           exporter: str):
    """(onnx ModelProto, exporter used) of ``wrapper`` at the tile; see the module docstring."""
    onnx = require("onnx")
    names = list(OUTPUTS[:2 if boundary else 1])
    x = torch.zeros((batch or 2, bands, tile, tile))
    errors = []
    for kind in (["torchscript", "dynamo"] if exporter == "auto" else [exporter]):
        buf = io.BytesIO()
        try:
            with torch.no_grad(), exporting(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if kind == "torchscript":
                    dyn = None if batch else {n: {0: "batch"} for n in [INPUT, *names]}
                    torch.onnx.export(wrapper, (x,), buf, dynamo=False, opset_version=opset, input_names=[INPUT],
                                      output_names=names, dynamic_axes=dyn, do_constant_folding=True)
                    return onnx.load_from_string(buf.getvalue()), kind
                require("onnxscript")
                dyn = None if batch else ({0: torch.export.Dim("batch")},)
                prog = torch.onnx.export(wrapper, (x,), dynamo=True, opset_version=max(opset, 18),
                                         input_names=[INPUT], output_names=names, dynamic_shapes=dyn,
                                         verbose=False)
                return prog.model_proto, kind
        except CmdbError:
            raise
        except Exception as exc:  # noqa: BLE001 - an exporter's failure: try the next, report all
            errors.append(f"{kind}: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}")
    raise CmdbError("the network could not be exported to ONNX (" + "; ".join(errors) + ")")
