"""Segmentation head and auxiliary (deep-supervision) heads.

The auxiliary heads read stage 3 (1/16) of each branch present, so both branches get a direct
gradient early in training and do not wait for the fusion to become useful. They exist only
for training: the network skips them in eval mode and returns their logits at their own
resolution (the loss upsamples), which keeps them out of inference cost entirely.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmdbnet.models.fusion import ConvBNReLU, pointwise

__all__ = ["SegHead", "AuxHead", "Heads"]


class SegHead(nn.Module):
    """(B, C, H/4, W/4) -> (B, K, H, W) logits at ``size`` (bilinear)."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.drop = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        logits = pointwise(self.cls, x, channel_scale=_dropout_mask(self.drop, x))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _dropout_mask(drop: nn.Dropout2d, x: torch.Tensor) -> torch.Tensor | None:
    """``drop``'s (B, C, 1, 1) keep mask for x, drawn as F.dropout2d draws it, or None when inactive.

    Why: a classifier after the dropout is linear, so the mask folds into its weights (per
    sample) and the dropped-out map is never materialised, forward or backward.
    """
    p = drop.p
    if not drop.training or p == 0 or x.dim() != 4:
        return None
    if p == 1:
        return x.new_zeros(x.shape[0], x.shape[1], 1, 1)
    return x.new_empty(x.shape[0], x.shape[1], 1, 1).bernoulli_(1 - p).div_(1 - p)


class AuxHead(nn.Sequential):
    """(B, C, h, w) -> (B, K, h, w) logits: 3x3 conv-BN-ReLU, dropout, 1x1 classifier."""

    def __init__(self, channels: int, num_classes: int, mid: int = 64, dropout: float = 0.1):
        super().__init__(ConvBNReLU(channels, mid, k=3), nn.Dropout2d(dropout), nn.Conv2d(mid, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self[0](x)
        return pointwise(self[2], x, channel_scale=_dropout_mask(self[1], x))


class Heads(nn.Module):
    """The segmentation head plus one auxiliary head per input channel count in ``aux_channels``."""

    def __init__(self, channels: int, num_classes: int, aux_channels: list[int]):
        super().__init__()
        self.seg = SegHead(channels, num_classes)
        self.aux = nn.ModuleList(AuxHead(c, num_classes) for c in aux_channels)

    def forward(self, x: torch.Tensor, size: tuple[int, int], aux_feats: list[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return (seg (B, K, *size), aux list of (B, K, h_i, w_i)); aux only when given features."""
        seg = self.seg(x, size)
        aux = [head(f) for head, f in zip(self.aux, aux_feats)] if aux_feats is not None else []
        return seg, aux
