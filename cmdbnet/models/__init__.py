"""The network: CNN branch, Mamba branch, fusion, boundary refinement, heads; and the baselines.

``build_model(settings.model)`` is the one entry point the engine uses; the parts are
importable for anyone composing their own network.
"""

from typing import Any

from torch import nn

from cmdbnet.models.baselines import BaselineNet, build_baseline
from cmdbnet.models.net import CMDBNet
from cmdbnet.models.net import build_model as build_cmdbnet

__all__ = ["BaselineNet", "CMDBNet", "build_model"]


def build_model(settings: Any) -> nn.Module:
    """The network ``settings.arch`` names (a ``ModelSettings``): cmdbnet's variants, or a baseline."""
    if getattr(settings, "arch", "cmdbnet") != "cmdbnet":
        return build_baseline(settings)
    return build_cmdbnet(settings)
