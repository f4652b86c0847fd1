"""Parameters and multiply-adds per module, beside the design's budget for each.

One eval-mode forward of a (1, C, crop, crop) input under ``FlopCounterMode`` attributes every
convolution, matmul and attention to its top-level module (MACs = FLOPs / 2); normalisation,
activations, pooling and interpolation are not counted, as in fvcore/thop and the figures
papers quote. The counter cannot see inside the selective scan, so ``scan_macs`` of each
call's shapes replaces whatever it counted there. Auxiliary heads do not run in eval mode:
they add parameters but no MACs. Backward is not counted. README ("Parameter budget") says
where the design's figures come from and why ours differ.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cmdbnet.errors import CmdbError
from cmdbnet.models.vss import SelectiveScan

__all__ = ["DESIGN_BUDGET", "MODULES", "count_complexity"]

# Report name -> attribute of the network (absent modules are None there and count zero).
MODULES = {"cnn_branch": "cnn", "mamba_branch": "mamba", "fusion": "fusion",
           "boundary_refinement": "boundary", "heads": "heads"}
LABELS = {"cnn_branch": "CNN branch", "mamba_branch": "Mamba branch", "fusion": "fusion",
          "boundary_refinement": "boundary refinement", "heads": "heads", "total": "total"}
# The design's budget at 256 x 256: (params, multiply-adds); it has no row for heads.
DESIGN_BUDGET = {"cnn_branch": (21.3e6, 3.6e9), "mamba_branch": (8.5e6, 2.1e9), "fusion": (3.2e6, 0.8e9),
               "boundary_refinement": (1.8e6, 0.4e9), "heads": None, "total": (34.8e6, 6.9e9)}


def _owner(fqn: str, modules: dict[str, str] = MODULES) -> str | None:
    return next((name for name, attr in modules.items() if fqn == attr or fqn.startswith(attr + ".")), None)


def _sub(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def count_complexity(model: nn.Module, crop: int = 256, in_channels: int = 3, variant: str | None = None
                     ) -> dict[str, Any]:
    """Parameters and inference MACs per module of ``model`` at a ``crop`` x ``crop`` input.

    Returns ``{"crop", "variant", "modules": {name: {"params", "macs"}}, "total": {...}}`` with
    ``name`` in :data:`MODULES`, or in the model's own ``complexity_modules`` (report name ->
    submodule path, as the baselines declare); totals are the sums of the modules.
    """
    mods = getattr(model, "complexity_modules", MODULES)
    if crop < 1:
        raise CmdbError(f"crop must be positive, got {crop}")
    modules: dict[str, dict[str, int]] = {}
    for name, attr in mods.items():
        sub = _sub(model, attr)
        modules[name] = {"params": sum(p.numel() for p in sub.parameters()) if sub is not None else 0, "macs": 0}
    outside = sum(p.numel() for p in model.parameters()) - sum(m["params"] for m in modules.values())
    if outside:
        raise CmdbError(f"{outside} parameters sit outside the modules {', '.join(mods.values())}")

    scans = {f"{type(model).__name__}.{fqn}": fqn for fqn, m in model.named_modules() if isinstance(m, SelectiveScan)}
    scan_extra: dict[str, int] = {name: 0 for name in mods}

    def record(fqn: str):
        def hook(module, args, kwargs, _out):
            scan_extra[_owner(fqn, mods)] += module.macs(args, kwargs)
        return hook

    handles = [m.register_forward_hook(record(fqn), with_kwargs=True)
               for fqn, m in model.named_modules() if isinstance(m, SelectiveScan)]
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(1, in_channels, crop, crop, dtype=param.dtype, device=param.device)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    counts = counter.get_flop_counts()
    flops = {key: sum(ops.values()) for key, ops in counts.items()}
    root = type(model).__name__
    for name, attr in mods.items():
        inside_scans = sum(flops.get(key, 0) for key, fqn in scans.items() if _owner(fqn, mods) == name)
        modules[name]["macs"] = (flops.get(f"{root}.{attr}", 0) - inside_scans) // 2 + scan_extra[name]
    total = {"params": sum(m["params"] for m in modules.values()), "macs": sum(m["macs"] for m in modules.values())}
    return {"crop": crop, "variant": variant if variant is not None else getattr(model, "variant", None),
            "modules": modules, "total": total}
