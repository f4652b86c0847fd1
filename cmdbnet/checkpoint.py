"""Checkpoints that carry everything ``predict`` and ``evaluate`` need, and no code.

Why: peers ship pickled model objects (which run arbitrary code on load and break when
the class moves) and hard-code class lists in their predict scripts. A cmdbnet checkpoint
is a plain mapping of tensors and JSON-like values, loaded with
``torch.load(weights_only=True)``:

    format      "cmdbnet-checkpoint"
    version     1
    model       state dict of the network
    settings    the full Settings as JSON-able dict (rebuilds the network)
    dataset     {name, classes, palette, ignore_index, bands, band_count, dtype, mean, std,
                 excluded_in_means}
    epoch, step, optimizer, scheduler, scaler, rng, best_metric   (training state; optional)

A run's ``last.pt`` has all of it (``--resume`` reads it); ``best.pt`` leaves out what only a
resume needs (``RESUME_ONLY``: the optimizer's moments alone are twice the weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cmdbnet.errors import CmdbError
from cmdbnet.models import build_model
from cmdbnet.serialization import safe_torch_load
from cmdbnet.settings import settings_from_dict
from cmdbnet.utils import atomic_path

FORMAT = "cmdbnet-checkpoint"
VERSION = 1
RESUME_ONLY = ("optimizer", "scheduler", "scaler", "rng", "batches_done", "micro_batch", "accum")


def nonfinite_tensors(state: Any) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or inf."""
    if not isinstance(state, dict):
        return []
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically (temporary name, then rename); never with non-finite weights."""
    path = Path(path)
    bad = nonfinite_tensors(payload.get("model"))
    if bad:
        raise CmdbError(f"refusing to write {path}: {len(bad)} weight tensor(s) hold NaN or inf (first: {bad[0]})")
    data = {"format": FORMAT, "version": VERSION, **payload}
    # through a Python file, so a full disk surfaces as its OSError (torch's own writer says "unexpected pos")
    with atomic_path(path, suffix=".pt") as tmp, open(tmp, "wb") as f:
        torch.save(data, f)
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file from a file or a run folder (``best.pt``, else ``last.pt``)."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
        raise CmdbError(f"no best.pt or last.pt in run folder {p}")
    if not p.exists():
        raise CmdbError(f"checkpoint not found: {p}")
    return p


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a cmdbnet checkpoint safely; refuse files that hold code or are not ours."""
    p = resolve_checkpoint(path)
    data = safe_torch_load(p, "checkpoint", map_location)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CmdbError(f"{p}: not a cmdbnet checkpoint (no '{FORMAT}' header); "
                        "to use bare backbone weights, set model.backbone_weights instead")
    if int(data.get("version", 0)) > VERSION:
        raise CmdbError(f"{p}: written by a newer cmdbnet (checkpoint version {data['version']}); upgrade cmdbnet")
    for key in ("model", "settings", "dataset"):
        if key not in data:
            raise CmdbError(f"{p}: checkpoint lacks '{key}'")
    bad = nonfinite_tensors(data["model"])
    if bad:
        raise CmdbError(f"{p}: {len(bad)} weight tensor(s) hold NaN or inf (first: {bad[0]}); the run that wrote "
                        "it diverged or trained on NaN pixels: use an earlier checkpoint or retrain")
    return data


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the network a checkpoint was trained with, in eval mode, and its metadata.

    Returns ``(model, checkpoint)``; ``checkpoint["dataset"]`` holds classes, palette,
    bands and normalisation, so callers need nothing but the checkpoint.
    """
    ckpt = load_checkpoint(path)
    settings = settings_from_dict(ckpt["settings"])
    model_settings = settings.model.model_copy(update={"pretrained": "off", "backbone_weights": None})
    model = build_model(model_settings)
    state = ckpt["model"]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else (first[0] if first else "size mismatch")
        raise CmdbError(f"{resolve_checkpoint(path)}: weights do not fit the network in its settings "
                        f"({detail[:200]})") from None
    if missing or unexpected:
        raise CmdbError(f"{resolve_checkpoint(path)}: weights do not match the network in its settings "
                        f"({len(missing)} missing, {len(unexpected)} unexpected keys)")
    model.to(device).eval()
    ckpt["settings_obj"] = settings
    return model, ckpt
