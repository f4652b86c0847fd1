"""The network: CNN branch, Mamba branch, fusion, boundary refinement, heads.

``build_model(settings.model)`` is the one entry point the engine uses; the parts are
importable for anyone composing their own network.
"""

from cmdbnet.models.net import CMDBNet, build_model

__all__ = ["CMDBNet", "build_model"]
