"""What predicts: a checkpoint's network, or an exported ONNX file that onnxruntime runs.

Both come with the metadata predict needs (classes, palette, bands, normalisation) and fail
here, with one clear line, when they cannot run: not after an hour of work.
"""

from __future__ import annotations

import os

import torch

from cmdbnet.checkpoint import load_model, resolve_checkpoint
from cmdbnet.errors import CmdbError
from cmdbnet.inference.onnx_runner import is_onnx, load_onnx_model
from cmdbnet.inference.rasters import ModelMeta
from cmdbnet.inference.window import forward_tta
from cmdbnet.settings import PredictSettings

__all__ = ["load_network", "load_predictor_model"]


def load_predictor_model(checkpoint: str | os.PathLike, device: torch.device):
    """Network, metadata and its output layout (classes K, boundary head) from a checkpoint.

    A probe forward on a small input checks that the network's K matches the class list
    stored beside it, so a mismatched checkpoint fails here and not after an hour of work.
    """
    path = resolve_checkpoint(checkpoint)
    try:
        model, ckpt = load_model(path, device)
    except CmdbError:
        raise
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CmdbError(f"{path}: cannot rebuild the network from this checkpoint ({first[:200]})") from None
    meta = ModelMeta.from_checkpoint(ckpt, path)
    probe = torch.zeros((1, meta.band_count, 64, 64), device=device)
    try:
        probs, bnd = forward_tta(model, probe, "none")
    except CmdbError:  # the scan backend cannot run here (CMDB_SCAN_BACKEND): its own message
        raise
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CmdbError(f"{path}: the network does not run on {meta.band_count}-band input ({first})") from None
    if probs.shape[1] != len(meta.classes):
        raise CmdbError(f"{path}: the network predicts {probs.shape[1]} classes but the checkpoint "
                        f"names {len(meta.classes)}")
    return model, ckpt, meta, bnd is not None


def load_network(path: os.PathLike, s: PredictSettings, device: torch.device):
    """(network, metadata, settings) for ``path``: a checkpoint, or an ``.onnx`` file whose fixed
    tile replaces ``s.tile`` (onnxruntime on ``s.device``'s provider; no AMP, no compile)."""
    if is_onnx(path):
        model, meta, raw = load_onnx_model(path, s.device)
        s = s.model_copy(update={"tile": int(raw["tile"]), "amp": False, "compile": False})
        has_boundary, variant, part = raw["boundary_output"], raw.get("variant", "?"), "output (export with --boundary)"
    else:
        model, ckpt, meta, has_boundary = load_predictor_model(path, device)
        variant, part = (ckpt.get("settings") or {}).get("model", {}).get("variant", "?"), "head"
    if s.boundary and not has_boundary:
        raise CmdbError(f"{path}: this network (variant {variant}) has no boundary {part}; drop --boundary")
    return model, meta, s
