"""The CNN + Mamba network and its ablation variants, built from ``ModelSettings``.

A variant only decides which parts exist; the parts themselves never look at the variant:

    variant      cnn  mamba  fusion                 boundary
    full         yes  yes    GatedFusion            yes
    no_boundary  yes  yes    GatedFusion            -
    no_fusion    yes  yes    ConcatFusion           -
    cnn_only     yes  -      SingleBranchNeck       -
    mamba_only   -    yes    SingleBranchNeck       -

This is the design's ablation ladder (CNN only, Mamba only, both without fusion, both with
fusion, full with boundary refinement): boundary refinement appears only in ``full``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cmdbnet.models.boundary import BoundaryRefinement
from cmdbnet.models.cnn import ResNetEncoder
from cmdbnet.models.exporting import is_exporting
from cmdbnet.models.fusion import ConcatFusion, GatedFusion, SingleBranchNeck
from cmdbnet.models.heads import Heads
from cmdbnet.models.vss import MambaEncoder

__all__ = ["CMDBNet", "build_model", "STRIDE"]

STRIDE = 32  # deepest stage's downsampling; inputs are padded to a multiple of it


class CMDBNet(nn.Module):
    """Dual-branch segmentation network.

    forward: (B, in_channels, H, W), any H and W -> {"seg": (B, K, H, W) logits,
    "aux": list of (B, K, h, w) logits at stage-3 resolution (empty in eval mode),
    "boundary": (B, 1, H, W) logits or None}. Inputs whose sides are not multiples of 32 are
    padded (reflect) inside and every output is cropped back, so callers never pad.
    """

    def __init__(self, cnn: ResNetEncoder | None, mamba: MambaEncoder | None, fusion: nn.Module,
                 boundary: BoundaryRefinement | None, heads: Heads, variant: str = "full"):
        super().__init__()
        self.cnn, self.mamba, self.fusion, self.boundary, self.heads = cnn, mamba, fusion, boundary, heads
        self.variant = variant

    def set_checkpointing(self, enabled: bool) -> None:
        """Recompute each stage of both branches in backward (less activation memory, ~30% slower)."""
        for branch in (self.cnn, self.mamba):
            if branch is not None:
                branch.checkpointing = bool(enabled)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        h, w = x.shape[-2:]
        x = _cpu_layout(_pad_to(x, STRIDE))
        cnn = self.cnn(x) if self.cnn is not None else None
        mamba = self.mamba(x) if self.mamba is not None else None
        fused, maps = self.fusion(cnn, mamba)
        boundary = None
        if self.boundary is not None:
            fused, boundary = self.boundary(fused, maps[0])
            boundary = _crop(F.interpolate(boundary, size=x.shape[-2:], mode="bilinear", align_corners=False), h, w)
        aux_feats = None
        if self.training:
            aux_feats = [feats[2] for feats in (cnn, mamba) if feats is not None]
        seg, aux = self.heads(fused, x.shape[-2:], aux_feats)
        scale = x.shape[-2] // aux[0].shape[-2] if aux else 1
        aux = [_crop(a, -(-h // scale), -(-w // scale)) for a in aux]
        return {"seg": _crop(seg, h, w), "aux": aux, "boundary": boundary}


def _cpu_layout(x: torch.Tensor) -> torch.Tensor:
    """Channels-last input for CPU inference: oneDNN's convolutions run faster in it and keep it
    downstream, with outputs as close to fp64 as NCHW's. Not with gradients: its backward
    measured far further from fp64 than NCHW's (both in benchmarks/RESULTS.md)."""
    if x.device.type == "cpu" and x.dim() == 4 and not torch.is_grad_enabled() and not is_exporting():
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"  # reflect needs the pad smaller than the side
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return x if x.shape[-2:] == (h, w) else x[..., :h, :w]


def build_model(settings: Any) -> CMDBNet:
    """The network described by ``settings`` (a ``ModelSettings``); backbone weights load here."""
    s = settings
    variant = s.variant
    cnn = mamba = boundary = None
    if variant != "mamba_only":
        cnn = ResNetEncoder(s.backbone, s.in_channels, s.pretrained, s.backbone_weights)
    if variant != "cnn_only":
        mamba = MambaEncoder(s.in_channels, s.mamba_dims, s.mamba_depths, drop_path=s.drop_path,
                             mlp_ratio=s.mlp_ratio, d_state=s.d_state, ssm_expand=s.ssm_expand,
                             dt_rank=s.dt_rank, d_conv=s.d_conv, ssm_gate=s.ssm_gate)
    if cnn is not None and mamba is not None:
        fusion_cls = ConcatFusion if variant == "no_fusion" else GatedFusion
        fusion = fusion_cls(cnn.out_channels, mamba.out_channels, s.fusion_channels)
    else:
        fusion = SingleBranchNeck((cnn or mamba).out_channels, s.fusion_channels)
    if variant == "full":
        boundary = BoundaryRefinement(s.fusion_channels, fusion.low_channels)
    aux_channels = [enc.out_channels[2] for enc in (cnn, mamba) if enc is not None]
    net = CMDBNet(cnn, mamba, fusion, boundary, Heads(s.fusion_channels, s.num_classes, aux_channels), variant)
    net.set_checkpointing(s.checkpointing)
    return net
