"""``cmdb export --check``: the written file in onnxruntime against the network in PyTorch (fp32).

Inputs: pixels drawn uniformly over 0..255 and generated aerial scenes (``data.synthetic``), each
normalised with the checkpoint's mean and std, at the file's tile. PyTorch runs its ordinary
path (the C scan and the other CPU fast paths, not the export form), so the check covers the
export form's equivalence too. The file passes when no class probability differs by more than
``MAX_ABS_DIFF`` and the per-pixel arg-max agrees on at least ``MIN_AGREEMENT`` of the pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cmdbnet.data.synthetic import render_scene
from cmdbnet.inference.onnx_runner import OnnxNetwork
from cmdbnet.inference.rasters import ModelMeta

__all__ = ["MAX_ABS_DIFF", "MIN_AGREEMENT", "check_inputs", "compare"]

MAX_ABS_DIFF = 1e-4
MIN_AGREEMENT = 0.9999


def check_inputs(meta: ModelMeta, tile: int, seed: int = 0, random: int = 2, scenes: int = 2) -> torch.Tensor:
    """(random + scenes, bands, tile, tile) normalised inputs; scene bands beyond R, G, B, NIR are noise."""
    rng = np.random.default_rng(seed)
    raw = [rng.integers(0, 256, (meta.band_count, tile, tile)).astype(np.float32) for _ in range(random)]
    for _ in range(scenes):
        img = render_scene(meta.classes, tile, tile, rng)[1].astype(np.float32)
        extra = max(0, meta.band_count - img.shape[0])
        raw.append(np.concatenate([img, rng.integers(0, 256, (extra, tile, tile)).astype(np.float32)])
                   [:meta.band_count])
    x = torch.from_numpy(np.stack(raw))
    mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in (meta.mean, meta.std))
    return (x - mean) / std


def compare(model: torch.nn.Module, runner: OnnxNetwork, x: torch.Tensor, batch: int | None) -> dict[str, Any]:
    """Probabilities (and the boundary map, when exported) of both on ``x``, one window at a time
    unless the file's batch is fixed; returns the figures and whether they pass."""
    step = batch or 1
    diff, agree, total, bdiff = 0.0, 0, 0, 0.0
    with torch.inference_mode():
        for i in range(0, x.shape[0], step):
            xb = x[i:i + step]
            out = model(xb)
            ref = out["seg"].float().softmax(1)
            got = runner(xb)
            diff = max(diff, float((got["probs"] - ref).abs().max()))
            agree += int((got["probs"].argmax(1) == ref.argmax(1)).sum())
            total += ref[:, 0].numel()
            if got["boundary_probs"] is not None:
                bdiff = max(bdiff, float((got["boundary_probs"] - out["boundary"].float().sigmoid()).abs().max()))
    agreement = agree / total
    return {"max_abs_diff": diff, "argmax_agreement": agreement, "boundary_max_abs_diff": bdiff,
            "windows": int(x.shape[0]), "passed": diff <= MAX_ABS_DIFF and bdiff <= MAX_ABS_DIFF
            and agreement >= MIN_AGREEMENT}
