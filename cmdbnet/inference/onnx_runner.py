"""An exported ``.onnx`` file as the network behind ``cmdb predict``: the second network runner.

``cmdb predict -k model.onnx`` runs the same windows, blending, georeferencing and writers as
with a checkpoint; only the forward pass differs. :class:`OnnxNetwork` is called like the torch
network on a normalised batch and returns probabilities (the softmax, and the boundary's
sigmoid, are inside the graph), which ``window.forward_tta`` takes as they are. Classes,
palette, bands and normalisation come from the file's ``cmdbnet`` metadata entry, so a
deployment needs the .onnx file and no checkpoint; the tile is the file's fixed input size.

This module also owns the metadata entry's name and format (``cmdb export`` writes it).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmdbnet.errors import CmdbError
from cmdbnet.inference.rasters import ModelMeta

__all__ = ["METADATA_KEY", "FORMAT", "VERSION", "OnnxNetwork", "is_onnx", "load_onnx_model", "providers",
           "require"]

METADATA_KEY = "cmdbnet"  # one metadata_props entry, a JSON object (see export/metadata.py)
FORMAT = "cmdbnet-onnx"
VERSION = 1
INSTALL_HINT = 'pip install "cmdbnet[export]"'


def require(module: str) -> Any:
    """Import an optional export/ONNX dependency, or one clear error naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise CmdbError(f"{module} is not installed ({exc}); install the ONNX extra: {INSTALL_HINT}") from None


def is_onnx(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def providers(device: str | torch.device) -> list[str]:
    """onnxruntime execution providers for ``--device`` (auto: CUDA when this onnxruntime has it)."""
    ort = require("onnxruntime")
    have = ort.get_available_providers()
    want = str(device).split(":")[0]
    if want == "cuda" and "CUDAExecutionProvider" not in have:
        raise CmdbError(f"--device cuda: this onnxruntime has no CUDA provider (it has {', '.join(have)}); "
                        "install onnxruntime-gpu or use --device cpu")
    if want in ("cuda", "auto") and "CUDAExecutionProvider" in have:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session(path: Path, device: str | torch.device = "cpu", threads: int | None = None):
    """An onnxruntime session on ``path``; an unreadable or foreign file is one CmdbError."""
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers(device))
    except CmdbError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CmdbError(f"{path}: not a readable ONNX model ({first[:200]})") from None


def read_metadata(path: Path, sess) -> dict[str, Any]:
    """The ``cmdbnet`` metadata entry of a session's model; CmdbError if absent or malformed."""
    props = sess.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in props:
        raise CmdbError(f"{path}: this ONNX model was not written by `cmdb export` (no '{METADATA_KEY}' metadata "
                        "with its classes, bands and normalisation); export it with `cmdb export RUN -o model.onnx`")
    try:
        meta = json.loads(props[METADATA_KEY])
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
    except (ValueError, AttributeError) as exc:
        raise CmdbError(f"{path}: malformed '{METADATA_KEY}' metadata ({exc})") from None
    if int(meta.get("version", 0)) > VERSION:
        raise CmdbError(f"{path}: written by a newer cmdbnet (format version {meta['version']}); upgrade cmdbnet")
    return meta


class OnnxNetwork:
    """Callable like the torch network: x (B, C, T, T) normalised float -> {"probs": (B, K, T, T),
    "boundary_probs": (B, 1, T, T) or None}, on ``x``'s device. A fixed-batch file gets its
    batch padded up to the fixed size and cut back."""

    def __init__(self, sess, batch: int | None, boundary: bool):
        self.sess, self.batch, self.boundary = sess, batch, boundary
        self.input = sess.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        n = x.shape[0]
        a = x.detach().float().cpu().numpy()
        if self.batch is not None and n != self.batch:
            if n > self.batch:
                raise CmdbError(f"this ONNX model takes batches of {self.batch}; got {n}")
            a = np.concatenate([a, np.zeros((self.batch - n, *a.shape[1:]), a.dtype)])
        outs = self.sess.run(None, {self.input: np.ascontiguousarray(a)})
        probs = torch.from_numpy(outs[0][:n]).to(x.device)
        bnd = torch.from_numpy(outs[1][:n]).to(x.device) if self.boundary and len(outs) > 1 else None
        return {"probs": probs, "boundary_probs": bnd}


def load_onnx_model(path: str | Path, device: str | torch.device = "cpu",
                    threads: int | None = None) -> tuple[OnnxNetwork, ModelMeta, dict[str, Any]]:
    """The runner, the model's metadata as predict uses it, and the raw ``cmdbnet`` entry."""
    path = Path(path)
    if not path.is_file():
        raise CmdbError(f"ONNX model not found: {path}")
    sess = session(path, device, threads)
    raw = read_metadata(path, sess)
    try:
        meta = ModelMeta.from_checkpoint({"dataset": raw}, path)
        tile = int(raw["tile"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CmdbError(f"{path}: malformed '{METADATA_KEY}' metadata ({exc})") from None
    shape = sess.get_inputs()[0].shape
    if len(shape) != 4 or shape[1] != meta.band_count or tuple(shape[2:]) != (tile, tile):
        raise CmdbError(f"{path}: input shape {shape} does not match its metadata ({meta.band_count} bands, "
                        f"tile {tile})")
    batch = shape[0] if isinstance(shape[0], int) else None
    return OnnxNetwork(sess, batch, bool(raw.get("boundary_output"))), meta, raw
