"""Boundary refinement: predict object edges and use them to sharpen the fused features.

Why: aerial classes meet along long, thin borders (roof against road, tree crown against low
vegetation) that a 1/4-scale decoder blurs. A head supervised on boundary maps (the loss's
boundary term) learns where those borders are from the low-level stage-1 map, which still
holds edges, and the fused features are then re-weighted there: features on a predicted
edge are amplified and the edge features themselves are injected, so the segmentation head
sees sharper transitions. Everything runs at 1/4 scale with depthwise-separable convolutions
on at most 96 channels: a dense 3x3 conv on the 256-channel fused map would cost more MACs
than the whole module, and on CPU every extra pass over that map costs more than its MACs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmdbnet.models.fusion import ConvBNReLU, pointwise

__all__ = ["BoundaryRefinement"]


def _separable(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(ConvBNReLU(cin, cin, k=3, groups=cin), ConvBNReLU(cin, cout))


class BoundaryRefinement(nn.Module):
    """forward: fused (B, C, H/4, W/4), low (B, C_low, H/4, W/4) ->
    (refined (B, C, H/4, W/4), boundary logits (B, 1, H/4, W/4)); the network upsamples the logits."""

    def __init__(self, channels: int = 256, low_channels: int = 64, mid: int = 64, reduced: int = 32):
        super().__init__()
        self.reduce = ConvBNReLU(channels, reduced)
        self.edge = nn.Sequential(_separable(low_channels + reduced, mid), _separable(mid, mid))
        self.logits = nn.Conv2d(mid, 1, 1)
        self.inject = nn.Conv2d(mid, channels, 1)

    def forward(self, fused: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if low.shape[-2:] != fused.shape[-2:]:
            low = F.interpolate(low, size=fused.shape[-2:], mode="bilinear", align_corners=False)
        edge = self.edge(torch.cat([low, self.reduce(fused)], dim=1))
        logits = pointwise(self.logits, edge)
        attention = torch.sigmoid(logits)
        refined = torch.addcmul(fused + pointwise(self.inject, edge), fused, attention)  # fused * (1 + a) + edge
        return refined, logits
