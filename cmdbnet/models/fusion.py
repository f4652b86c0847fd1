"""Joining the branches per stage and aggregating the stages into one map at 1/4 scale.

Every variant ends in the same :class:`FPNAggregator` (UPerNet-style: pyramid pooling on the
deepest map, FPN top-down, a cheap smoothing at 1/4), so an ablation changes only how the
two branches meet at each stage:

- :class:`GatedFusion` (``full``, ``no_boundary``): dual gating plus cross-branch attention.
- :class:`ConcatFusion` (``no_fusion``): concatenation + 1x1 conv, the plain join.
- :class:`SingleBranchNeck` (``cnn_only``, ``mamba_only``): no join at all.

Each takes ``(cnn_feats, mamba_feats)`` (lists of (B, C_i, H_i, W_i), or None for an absent
branch) and returns ``(fused, stage_maps)``: fused (B, out_channels, H/4, W/4) and the joined
per-stage maps, whose first (1/4 scale) the boundary head reads as its low-level input.

Why the cost sits where it does: at 1/4 scale (4096 positions at a 256 crop) every w x w
per-pixel linear map costs as much as at 1/32 while holding 64x fewer weights, so attention
reads pooled tokens, gates go through a bottleneck, and the 3x3 convolution of the
aggregation runs at 1/32 (inside the pyramid pooling), not at 1/4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmdbnet.models.depthwise import depthwise
from cmdbnet.models.exporting import adaptive_avg_pool2d, is_exporting

__all__ = ["ConvBNReLU", "CrossAttention", "DualGate", "GatedFusion", "ConcatFusion", "SingleBranchNeck",
           "FPNAggregator", "pointwise"]


def pointwise(conv: nn.Conv2d, x: torch.Tensor, channel_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(x)`` for a plain 1x1 convolution, as one batched matmul on NCHW-contiguous CPU input.

    Why: oneDNN's 1x1 convolution (forward and even more its backward) on wide 1/4-scale maps
    costs several times a (B, out, in) x (B, in, HW) matmul, which reads the map in place.
    ``channel_scale`` (B, in, 1, 1), when given, multiplies the input channels first (a folded
    Dropout2d mask) without materialising the scaled map. Anything else (another device, a
    channels-last or strided map, a kernel that is not a plain 1x1) goes through ``conv``.
    """
    if x.dim() != 4 or not _eager_cpu_nchw(x) or not _plain_1x1(conv):
        return conv(x * channel_scale if channel_scale is not None else x)
    b, _, h, w = x.shape
    return _channel_matmul(conv, x.flatten(2), channel_scale).view(b, -1, h, w)


def _channel_matmul(conv: nn.Conv2d, x: torch.Tensor, channel_scale: torch.Tensor | None = None) -> torch.Tensor:
    """A 1x1 ``conv`` applied to x (B, in, N), any strides, as one batched matmul: (B, out, N)."""
    weight = conv.weight.flatten(1)
    weight = (weight * channel_scale.flatten(1).unsqueeze(1) if channel_scale is not None
              else weight.expand(x.shape[0], -1, -1))
    if conv.bias is None:
        return torch.bmm(weight, x)
    return torch.baddbmm(conv.bias.unsqueeze(-1), weight, x)


def _eager_cpu_nchw(x: torch.Tensor) -> bool:
    """Where the CPU fast paths of this module apply: NCHW-contiguous CPU maps, outside
    torch.compile (which fuses the plain ops itself and cannot trace the hand-written ones)."""
    return (x.device.type == "cpu" and x.is_contiguous() and not torch.compiler.is_compiling()
            and not is_exporting())


def _plain_1x1(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding in ((0, 0), "valid")
            and conv.groups == 1 and conv.padding_mode == "zeros")


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 1, groups: int = 1, act: bool = True):
        layers = [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        super().__init__(*(layers + [nn.ReLU(inplace=True)] if act else layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pointwise(self[0], x) if _plain_1x1(self[0]) else depthwise(self[0], x)
        for layer in list(self)[1:]:
            x = layer(x)
        return x


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    size = tuple(like.shape[-2:])
    if _eager_cpu_nchw(x) and size == (2 * x.shape[-2], 2 * x.shape[-1]):
        return _Up2x.apply(x)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class _Up2x(torch.autograd.Function):
    """Bilinear 2x upsampling (align_corners=False) of an NCHW-contiguous map, written as its fixed taps.

    At exactly 2x every output row and column is ``lerp(x[i], x[i -+ 1], 1/4)`` (the edge clamped
    to x[i]), so the forward is four strided lerps into the output and the backward their
    adjoint, a few strided adds per axis, where the generic CPU kernels make extra full-size
    copies (forward) or scatter one output pixel at a time (backward).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        rows = x.new_empty(b, c, h, 2, w)          # pass 1: rows, (B, C, 2H, W)
        _lerp_axis(x, rows, 2)
        out = x.new_empty(b, c, 2 * h, 2 * w)      # pass 2: columns
        _lerp_axis(rows.view(b, c, 2 * h, w), out.view(b, c, 2 * h, w, 2), 3)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _lerp_axis_adjoint(_lerp_axis_adjoint(grad, 3), 2)


def _lerp_axis(x: torch.Tensor, out: torch.Tensor, dim: int) -> None:
    """out (x's shape with a size-2 axis after ``dim``) <- the even and odd 2x bilinear taps along ``dim``."""
    n = x.shape[dim]
    even, odd = out.select(dim + 1, 0), out.select(dim + 1, 1)
    torch.lerp(x.narrow(dim, 1, n - 1), x.narrow(dim, 0, n - 1), 0.25, out=even.narrow(dim, 1, n - 1))
    even.narrow(dim, 0, 1).copy_(x.narrow(dim, 0, 1))
    torch.lerp(x.narrow(dim, 0, n - 1), x.narrow(dim, 1, n - 1), 0.25, out=odd.narrow(dim, 0, n - 1))
    odd.narrow(dim, n - 1, 1).copy_(x.narrow(dim, n - 1, 1))


def _lerp_axis_adjoint(grad: torch.Tensor, dim: int) -> torch.Tensor:
    """Gradient of :func:`_lerp_axis` along ``dim``: grad (size 2n there) -> (size n there)."""
    n = grad.shape[dim] // 2
    taps = grad.unflatten(dim, (n, 2))
    even, odd = taps.select(dim + 1, 0), taps.select(dim + 1, 1)
    out = torch.add(even, odd).mul_(0.75)
    out.narrow(dim, 1, n - 1).add_(odd.narrow(dim, 0, n - 1), alpha=0.25)
    out.narrow(dim, 0, n - 1).add_(even.narrow(dim, 1, n - 1), alpha=0.25)
    out.narrow(dim, 0, 1).add_(even.narrow(dim, 0, 1), alpha=0.25)          # clamped edges: weight 1 in all
    out.narrow(dim, n - 1, 1).add_(odd.narrow(dim, n - 1, 1), alpha=0.25)
    return out


class DualGate(nn.Module):
    """Each branch admits the other through a sigmoid gate computed from both.

    forward: c, m (B, w, H, W) -> (c + g_c * m, m + g_m * c). The gates see the concatenation,
    so where the CNN is confident (texture, edges) it can refuse the smoother global features
    and where it is not (large uniform roofs, shadows) take them, and the reverse for Mamba.
    """

    def __init__(self, width: int, reduction: int = 4):
        super().__init__()
        hidden = max(width // reduction, 8)
        self.net = nn.Sequential(ConvBNReLU(2 * width, hidden), nn.Conv2d(hidden, 2 * width, 1))

    def forward(self, c: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g_c, g_m = torch.sigmoid(self.net(torch.cat([c, m], dim=1))).chunk(2, dim=1)
        return c + g_c * m, m + g_m * c


def _pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """``adaptive_avg_pool2d(x, size)``; as the equal (and cheaper) plain average pool when the sides divide."""
    h, w = x.shape[-2:]
    if h % size or w % size or is_exporting():
        return adaptive_avg_pool2d(x, size)
    return F.avg_pool2d(x, (h // size, w // size))


class CrossAttention(nn.Module):
    """Every position of ``x`` attends to ``pool x pool`` pooled tokens of the other branch.

    forward: x (B, w, H, W), other (B, w, H, W) -> x + attention (B, w, H, W). Pooling the keys
    keeps the cost linear in H*W (a 256 crop's 4096 positions read 64 tokens, not 4096), and
    a small per-channel output scale (LayerScale, 0.01) makes the block start near the identity
    while still passing gradient to the attention weights from the first step.
    """

    def __init__(self, width: int, pool: int = 8, head_dim: int = 32):
        super().__init__()
        dim = max(width // 2, head_dim)
        heads = max(dim // head_dim, 1)
        while dim % heads:
            heads -= 1
        self.pool, self.heads, self.dim = pool, heads, dim
        self.q = nn.Conv2d(width, dim, 1, bias=False)
        self.kv = nn.Linear(width, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Conv2d(dim, width, 1)
        self.scale = nn.Parameter(torch.full((width, 1, 1), 1e-2))

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        tokens = _pool(other, self.pool).flatten(2).transpose(1, 2)                     # (B, P, w)
        k, v = self.kv(self.norm(tokens)).chunk(2, dim=-1)
        split = lambda t: t.unflatten(-1, (self.heads, self.dim // self.heads)).transpose(1, 2)  # noqa: E731
        if not _eager_cpu_nchw(x):
            q = self.q(x).flatten(2).transpose(1, 2)                                   # (B, HW, dim)
            o = F.scaled_dot_product_attention(split(q), split(k), split(v))           # (B, h, HW, d)
            o = o.transpose(1, 2).flatten(2).transpose(1, 2).reshape(b, -1, h, w)
            return x + self.scale * self.proj(o)
        # NCHW on CPU: q and proj as batched matmuls straight between the channel-major map and
        # the token-major attention layout, so neither side is copied into the other's layout.
        q = torch.bmm(x.flatten(2).transpose(1, 2), self.q.weight.flatten(1).t().expand(b, -1, -1))
        o = F.scaled_dot_product_attention(split(q), split(k), split(v))               # (B, h, HW, d)
        o = o.transpose(1, 2).flatten(2)                       # (B, HW, dim), a view for one head
        return x + self.scale * _channel_matmul(self.proj, o.transpose(1, 2)).view(b, -1, h, w)


class GatedFusionStage(nn.Module):
    """One stage: align widths, dual gate, attention both ways, sum + 1x1 conv to ``width``.

    Summing before the 1x1 (instead of concatenating) halves the stage's largest per-pixel cost;
    after gating and attention each branch already carries the other's information.
    """

    def __init__(self, c_ch: int, m_ch: int, width: int, pool: int = 8):
        super().__init__()
        self.align_c = nn.Identity() if c_ch == width else ConvBNReLU(c_ch, width)
        self.align_m = nn.Identity() if m_ch == width else ConvBNReLU(m_ch, width)
        self.gate = DualGate(width)
        self.attn_c = CrossAttention(width, pool)  # local features read global context
        self.attn_m = CrossAttention(width, pool)  # global features read local detail
        self.fuse = ConvBNReLU(width, width)

    def forward(self, c: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        c, m = self.gate(self.align_c(c), self.align_m(m))
        c, m = self.attn_c(c, m), self.attn_m(m, c)
        return self.fuse(c + m)


class PyramidPooling(nn.Module):
    """PSPNet/UPerNet pyramid pooling: (B, C, h, w) -> (B, out, h, w) with context at 1, 2, 3, 6 bins."""

    def __init__(self, cin: int, out: int, bins: tuple[int, ...] = (1, 2, 3, 6), branch: int | None = None):
        super().__init__()
        branch = branch or max(cin // 4, 16)
        self.bins = bins
        # No BatchNorm on the pooled maps: a 1x1 bin of a batch of one has one value per channel.
        self.branches = nn.ModuleList(nn.Sequential(nn.Conv2d(cin, branch, 1), nn.ReLU(inplace=True)) for _ in bins)
        self.bottleneck = ConvBNReLU(cin + branch * len(bins), out, k=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [_up(conv(adaptive_avg_pool2d(x, b)), x) for b, conv in zip(self.bins, self.branches)]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class FPNAggregator(nn.Module):
    """Stage maps at 1/4..1/32 -> one (B, out, H/4, W/4) map: pyramid pooling on the deepest,
    1x1 laterals, top-down sums, depthwise 3x3 smoothing at 1/4.

    Laterals are plain 1x1 convolutions as in the original FPN: the sum is normalised once, by
    the smoothing's BatchNorm, instead of once per level at full 1/4-scale width.
    """

    def __init__(self, in_channels: list[int], out: int = 256):
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], out)
        self.laterals = nn.ModuleList(nn.Conv2d(c, out, 1) for c in in_channels[:-1])
        self.smooth = ConvBNReLU(out, out, k=3, groups=out)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        p = self.ppm(feats[-1])
        for lateral, f in zip(reversed(self.laterals), reversed(feats[:-1])):
            p = pointwise(lateral, f) + _up(p, f)
        return self.smooth(p)


class GatedFusion(nn.Module):
    """The design's fusion module: per-stage :class:`GatedFusionStage`, then :class:`FPNAggregator`."""

    def __init__(self, cnn_channels: list[int], mamba_channels: list[int], out_channels: int = 256, pool: int = 8):
        super().__init__()
        widths = list(mamba_channels)
        self.stages = nn.ModuleList(GatedFusionStage(c, m, w, pool)
                                    for c, m, w in zip(cnn_channels, mamba_channels, widths))
        self.aggregate = FPNAggregator(widths, out_channels)
        self.low_channels, self.out_channels = widths[0], out_channels

    def forward(self, cnn: list[torch.Tensor], mamba: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        maps = [stage(c, m) for stage, c, m in zip(self.stages, cnn, mamba)]
        return self.aggregate(maps), maps


class ConcatFusion(nn.Module):
    """Ablation ``no_fusion``: both branches joined per stage by concatenation and a 1x1 conv."""

    def __init__(self, cnn_channels: list[int], mamba_channels: list[int], out_channels: int = 256):
        super().__init__()
        widths = list(mamba_channels)
        self.joins = nn.ModuleList(ConvBNReLU(c + m, w) for c, m, w in zip(cnn_channels, mamba_channels, widths))
        self.aggregate = FPNAggregator(widths, out_channels)
        self.low_channels, self.out_channels = widths[0], out_channels

    def forward(self, cnn: list[torch.Tensor], mamba: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        maps = [join(torch.cat([c, m], dim=1)) for join, c, m in zip(self.joins, cnn, mamba)]
        return self.aggregate(maps), maps


class SingleBranchNeck(nn.Module):
    """Ablations ``cnn_only`` / ``mamba_only``: the one branch's maps go straight to the aggregator."""

    def __init__(self, channels: list[int], out_channels: int = 256):
        super().__init__()
        self.aggregate = FPNAggregator(list(channels), out_channels)
        self.low_channels, self.out_channels = channels[0], out_channels

    def forward(self, cnn: list[torch.Tensor] | None, mamba: list[torch.Tensor] | None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        maps = cnn if cnn is not None else mamba
        return self.aggregate(maps), maps
