"""Parameters and multiply-adds per module, as in SPEC.md's budget table.

How it counts: one eval-mode forward of a (1, C, crop, crop) input under
``torch.utils.flop_counter.FlopCounterMode``, whose per-module breakdown attributes every
convolution, matmul and attention to the top-level module it runs in (MACs = FLOPs / 2).
Normalisation, activations, pooling and interpolation are not counted, as in fvcore/thop and
the figures papers quote. A FLOP counter cannot see the selective scan (a custom autograd
function of elementwise ops), so whatever it counted inside a scan call is dropped and
``scan_macs`` of that call's shapes is added instead. Inference cost: auxiliary heads do not
run in eval mode, so they add parameters but no MACs. Backward is not counted.

Measured for the defaults (ResNet34, Mamba dims [64, 128, 256, 512], depths [2, 2, 4, 2],
d_state 1, ssm_expand 0.5, mlp_ratio 2.5, fusion 256) at 256 x 256, against SPEC.md's table
(``cmdb count-params``):

    module                params   SPEC     MACs     SPEC
    CNN branch            21.28 M  21.3 M   4.78 G   3.6 G
    Mamba branch           5.94 M   8.5 M   1.26 G   2.1 G
    fusion                 4.84 M   3.2 M   0.66 G   0.8 G
    boundary refinement    0.04 M   1.8 M   0.15 G   0.4 G
    heads                  0.30 M   -       0.01 G   -
    total                 32.40 M  34.8 M   6.86 G   6.9 G

Why they differ:

- CNN branch: 3.6 G is ResNet34's well-known count at 224 x 224; at 256 x 256 the same
  convolutions cost (256/224)^2 = 1.31 times more, 4.78 G (the classifier, which the branch
  drops, is the missing 0.5 M of torchvision's 21.8 M). SPEC's total of 6.9 G therefore
  cannot hold with a ResNet34 at 256 unless the rest shrinks by about 1.2 G against its
  table, which is what the defaults do.
- Mamba branch: with SPEC's dims and depths the cost per block is set by the scan width and
  the MLP. VMamba's MLP ratio 4 alone would make the branch about 9 M / 1.9 G and the total
  over 7 G. The defaults narrow the scan (expand 0.5, d_state 1: the scan itself is 0.02 G,
  and it is what a CPU step waits on) and keep an MLP of ratio 2.5; most of the branch's
  parameters sit in stage 4, where they cost few MACs.
- Fusion: more parameters than SPEC because the pyramid pooling's 3x3 bottleneck runs at
  1/32 (2.4 M parameters for 0.15 G), where parameters are cheap in MACs; fewer MACs because
  everything at 1/4 scale is 1x1 or depthwise and attention reads 64 pooled tokens.
- Boundary refinement: depthwise-separable at 1/4 scale on at most 96 channels; a dense 3x3
  conv on the 256-channel fused map alone would cost 2.4 G, so SPEC's 1.8 M could not have
  been spent at that scale within its own 0.4 G.
- Heads: SPEC's table has no row for them (its modules add up to its total); ours are the
  1x1 classifier plus two auxiliary heads used only in training (0.29 M, no inference MACs).
- Total: 32.4 M is 7% under SPEC's 34.8 M (the brief allows 10%), 6.86 G just under its 6.9 G.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cmdbnet.errors import CmdbError
from cmdbnet.models.scan import scan_macs
from cmdbnet.models.vss import SelectiveScan

__all__ = ["MODULES", "SPEC_CLAIMS", "count_complexity"]

# Report name -> attribute of the network (absent modules are None there and count zero).
MODULES = {"cnn_branch": "cnn", "mamba_branch": "mamba", "fusion": "fusion",
           "boundary_refinement": "boundary", "heads": "heads"}
LABELS = {"cnn_branch": "CNN branch", "mamba_branch": "Mamba branch", "fusion": "fusion",
          "boundary_refinement": "boundary refinement", "heads": "heads", "total": "total"}
# SPEC.md's table at 256 x 256: (params, multiply-adds). It has no row for heads.
SPEC_CLAIMS = {"cnn_branch": (21.3e6, 3.6e9), "mamba_branch": (8.5e6, 2.1e9), "fusion": (3.2e6, 0.8e9),
               "boundary_refinement": (1.8e6, 0.4e9), "heads": None, "total": (34.8e6, 6.9e9)}


def _owner(fqn: str) -> str | None:
    top = fqn.split(".", 1)[0]
    return next((name for name, attr in MODULES.items() if attr == top), None)


def count_complexity(model: nn.Module, crop: int = 256, in_channels: int = 3, variant: str | None = None
                     ) -> dict[str, Any]:
    """Parameters and inference MACs per module of ``model`` at a ``crop`` x ``crop`` input.

    Returns ``{"crop", "variant", "modules": {name: {"params", "macs"}}, "total": {...}}`` with
    ``name`` in :data:`MODULES`; totals are the sums of the modules.
    """
    if crop < 1:
        raise CmdbError(f"crop must be positive, got {crop}")
    modules: dict[str, dict[str, int]] = {}
    for name, attr in MODULES.items():
        sub = getattr(model, attr, None)
        modules[name] = {"params": sum(p.numel() for p in sub.parameters()) if sub is not None else 0, "macs": 0}
    outside = sum(p.numel() for p in model.parameters()) - sum(m["params"] for m in modules.values())
    if outside:
        raise CmdbError(f"{outside} parameters sit outside the modules {', '.join(MODULES.values())}")

    scans = {f"{type(model).__name__}.{fqn}": fqn for fqn, m in model.named_modules() if isinstance(m, SelectiveScan)}
    scan_extra: dict[str, int] = {name: 0 for name in MODULES}

    def record(fqn: str):
        def hook(_module, args, _out):
            u, _delta, A, _B, _C, D, _bias = args  # noqa: N806
            b, d, l = u.shape  # noqa: E741
            scan_extra[_owner(fqn)] += scan_macs(b, d, l, A.shape[1], has_z=False, has_D=D is not None)
        return hook

    handles = [m.register_forward_hook(record(fqn)) for fqn, m in model.named_modules() if isinstance(m, SelectiveScan)]
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
    for name, attr in MODULES.items():
        inside_scans = sum(flops.get(key, 0) for key, fqn in scans.items() if _owner(fqn) == name)
        modules[name]["macs"] = (flops.get(f"{root}.{attr}", 0) - inside_scans) // 2 + scan_extra[name]
    total = {"params": sum(m["params"] for m in modules.values()), "macs": sum(m["macs"] for m in modules.values())}
    return {"crop": crop, "variant": variant if variant is not None else getattr(model, "variant", None),
            "modules": modules, "total": total}
