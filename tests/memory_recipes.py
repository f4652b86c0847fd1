"""A tiny network and recipe shared by the memory tests (profiling and training)."""

from __future__ import annotations

from cmdbnet.settings import Settings, load_settings

GiB, MiB = 2**30, 2**20
TINY_MODEL = {"backbone": "resnet18", "pretrained": "off", "mamba_depths": [1, 1, 1, 1],
              "mamba_dims": [32, 64, 128, 256], "d_state": 4, "fusion_channels": 32}


def tiny(**train) -> Settings:
    return load_settings(None, {"model": TINY_MODEL, "data": {"crop": 128},
                                "train": {"batch": 4, "accum": 4, "amp": True, **train}})
