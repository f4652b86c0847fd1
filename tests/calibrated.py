"""A test checkpoint whose batch-norm statistics are measured on generated scenes, so the masks a
random network predicts follow the image (several classes) instead of one class everywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cmdbnet.checkpoint import save_checkpoint
from cmdbnet.data.registry import ISPRS_CLASSES, ISPRS_PALETTE
from cmdbnet.models import build_model
from cmdbnet.settings import IMAGENET_MEAN, IMAGENET_STD, Settings


def save_calibrated_checkpoint(path: Path, settings: Settings, scenes: np.ndarray) -> Path:
    """Build ``settings.model`` (seed 0), measure its batch-norm statistics on ``scenes``
    ((N, 3, H, W) RGB pixels) and save it as an ISPRS Potsdam checkpoint at ``path``."""
    torch.manual_seed(0)
    net = build_model(settings.model)
    for mod in net.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None
    x = torch.from_numpy(scenes).float()
    with torch.no_grad():
        net.train()((x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1))
    dataset = {"name": "potsdam", "classes": list(ISPRS_CLASSES), "palette": [list(p) for p in ISPRS_PALETTE],
               "ignore_index": 255, "bands": "rgb", "band_count": 3, "dtype": "uint8",
               "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    save_checkpoint(path, {"model": net.state_dict(), "settings": settings.model_dump(mode="json"),
                           "dataset": dataset})
    return path
