"""The Mamba branch: VMamba-style 2-D selective scan (SS2D), VSS blocks and a four-stage pyramid.

Why cross-scan: a selective scan is causal along one sequence; flattening an image row-major
lets a pixel see only what lies above-left of it. Scanning four ways (row-major, column-major
and both reversed) and summing gives every pixel a path from every other pixel, which is the
global context the CNN branch lacks. The four directions go through the scan as one call with
4x the channels (each direction its own group of B and C), so the kernel runs once per block.

Defaults: d_state 1 and no z gate as VMamba v2, which found them more accurate than v0's
d_state 16 / expand 2 / silu(z) gate; expand 0.5 as CM-UNet, because on CPU our torch scan is
a recurrence over 4096 tokens at stage 1 whose cost grows with the scanned width (its share
of a step: benchmarks/model.py --breakdown); an MLP ratio of 2.5 after the scan puts back the
parameters the narrower scan gives up. ``ssm_gate=True``, ``d_state=16``, ``ssm_expand=2``
restore the v0 block.

Inside the branch tensors are channels-last (B, H, W, C), as LayerNorm and Linear want them;
the branch returns NCHW maps like every other encoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cmdbnet.models.exporting import is_exporting
from cmdbnet.models.scan import resolve_backend, scan_macs, selective_scan
from cmdbnet.models.scan.native import PlaneScan
from cmdbnet.models.scan.parallel import export_scan

__all__ = ["SS2D", "VSSBlock", "MambaEncoder", "SelectiveScan", "DropPath"]


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample (identity in eval)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * self._keep(x)

    def add(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)`` as one pass over the map (addcmul), forward and backward."""
        if not self.training or self.p == 0.0:
            return residual + x
        return torch.addcmul(residual, x, self._keep(x))

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return keep.div_(1.0 - self.p)  # scale the (B, 1, 1, 1) mask, not the activations


class SelectiveScan(nn.Module):
    """The scan as a module: complexity counting hooks it (FLOP counters cannot see inside).

    Two call forms. ``(u, delta, A, B, C, D, delta_bias)`` in selective_scan's layout, one
    sequence per channel; with ``plane=(h, w)`` SS2D's four orders of a channels-last plane at
    once, merged (:class:`PlaneScan`'s layout), where the C library runs (see ``_plane_scan``).
    Opaque to torch.compile: tracing the torch backend would unroll its time loop and its
    worker threads into the graph (minutes of compile for nothing); the rest compiles around it.
    """

    @torch.compiler.disable
    def forward(self, u, delta, A, B, C, D, delta_bias, plane=None):  # noqa: N803
        if is_exporting():  # plain ops only (models/exporting.py); never the plane form
            return export_scan(u, delta, A, B, C, D, delta_bias)
        if plane is not None:
            return PlaneScan.apply(u, delta, A, B, C, D, delta_bias, *plane)
        return selective_scan(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=True)

    @staticmethod
    def macs(args, kwargs=None) -> int:
        """Multiply-adds of one call with these arguments (``scan_macs``), either call form."""
        u, _delta, A, _B, _C, D = args[:6]  # noqa: N806
        if (kwargs or {}).get("plane") is not None:
            b, l, d = u.shape  # noqa: E741
            d *= SS2D.K
        else:
            b, d, l = u.shape  # noqa: E741
        return scan_macs(b, d, l, A.shape[1], has_z=False, has_D=D is not None)


def _plane_scan(t: torch.Tensor) -> bool:
    """Whether SS2D runs its scan position-major through the C library: where that library runs
    the scan (CPU fp32, backend native), outside torch.compile (which needs the torch ops)."""
    return (t.device.type == "cpu" and t.dtype == torch.float32 and not torch.compiler.is_compiling()
            and not is_exporting() and resolve_backend(t.device) == "native")


def _cross_scan(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4, C, H*W): row-major, column-major, and both reversed."""
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)


def _cross_merge(y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 4, C, H*W) -> (B, C, H*W) in row-major order: undo each scan order and sum."""
    y = y[:, :2] + y[:, 2:].flip(-1)
    b, _, c, _ = y.shape
    cols = y[:, 1].view(b, c, w, h).transpose(2, 3).reshape(b, c, h * w)
    return y[:, 0] + cols


class SS2D(nn.Module):
    """2-D selective scan: in_proj, depthwise conv, four-way scan, LayerNorm, (gate), out_proj.

    forward: (B, H, W, C) -> (B, H, W, C).
    """

    K = 4  # scan directions

    def __init__(self, d_model: int, d_state: int = 1, expand: float = 1.0, dt_rank: int | str = "auto",
                 d_conv: int = 3, gate: bool = False, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4):
        super().__init__()
        d_inner = max(1, int(expand * d_model))
        self.d_inner, self.d_state, self.gate = d_inner, d_state, gate
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        k, r, n = self.K, self.dt_rank, d_state
        self.in_proj = nn.Linear(d_model, d_inner * (2 if gate else 1), bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner)
        self.act = nn.SiLU()
        # Per direction: x -> (dt low-rank, B, C); dt low-rank -> per-channel dt. Stacked over K.
        self.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * n, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, r))
        self.dt_projs_bias = nn.Parameter(torch.empty(k * d_inner))  # flat: the scan's delta_bias
        self.A_logs = nn.Parameter(torch.empty(k * d_inner, n))
        self.Ds = nn.Parameter(torch.empty(k * d_inner))
        self.scan = SelectiveScan()
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self._mamba_init(dt_min, dt_max, dt_init_floor)

    @torch.no_grad()
    def _mamba_init(self, dt_min: float, dt_max: float, floor: float) -> None:
        """Mamba's init: A = -(1..N) (S4D-real), D = 1, softplus(dt bias) log-uniform in [dt_min, dt_max]."""
        nn.init.uniform_(self.x_proj_weight, -self.d_inner ** -0.5, self.d_inner ** -0.5)
        nn.init.uniform_(self.dt_projs_weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(self.dt_projs_bias.shape) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.A_logs.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(self.A_logs))
        self.Ds.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        xz = self.in_proj(x)
        if self.gate:
            xz, z = xz.chunk(2, dim=-1)
        u = self.act(self.conv2d(xz.permute(0, 3, 1, 2)))            # (B, D, H, W)
        y = self._scan_plane(u) if _plane_scan(u) else self._scan_orders(u)  # (B, H, W, D)
        y = self.out_norm(y)
        if self.gate:
            y = y * F.silu(z)
        return self.out_proj(y)

    def _scan_orders(self, u: torch.Tensor) -> torch.Tensor:
        """The four orders as four reordered copies (B, K, D, L), one scan call, then the merge."""
        b, _, h, w = u.shape
        L = h * w
        xs = _cross_scan(u)                                          # (B, K, D, L)
        # Plain broadcast matmuls, not einsum: (K, c, D) @ (B, K, D, L) runs as one bmm over
        # B*K with no permuted copy of the large (B, K, D, L) operand.
        x_dbl = torch.matmul(self.x_proj_weight, xs)                 # (B, K, R + 2N, L)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.matmul(self.dt_projs_weight, dts)                # (B, K, D, L)
        ys = self.scan(xs.view(b, -1, L), dts.view(b, -1, L), -torch.exp(self.A_logs.float()),
                       Bs, Cs, self.Ds.float(), self.dt_projs_bias.float())
        y = _cross_merge(ys.view(b, self.K, self.d_inner, L), h, w)  # (B, D, L)
        return y.transpose(1, 2).reshape(b, h, w, self.d_inner)

    def _scan_plane(self, u: torch.Tensor) -> torch.Tensor:
        """The same, position-major on the channels-last plane: the projections are per position,
        so they run once over the plane for all four orders, and the scan visits the positions in
        each order itself (:class:`PlaneScan`): no reordered copies, no merge."""
        b, d, h, w = u.shape
        k, r, n, L = self.K, self.dt_rank, self.d_state, h * w
        ul = u.permute(0, 2, 3, 1).reshape(b, L, d)                  # a view when u is channels-last
        x_dbl = F.linear(ul, self.x_proj_weight.view(-1, d)).view(b, L, k, r + 2 * n)
        dts, Bs, Cs = torch.split(x_dbl, [r, n, n], dim=3)
        # (K, B*L, R) @ (K, R, D): each order's dt projection, batched over orders, read in place
        delta = torch.bmm(dts.permute(2, 0, 1, 3).reshape(k, b * L, r), self.dt_projs_weight.transpose(1, 2))
        y = self.scan(ul, delta.view(k, b, L, d), -torch.exp(self.A_logs.float()), Bs, Cs, self.Ds.float(),
                      self.dt_projs_bias.float(), plane=(h, w))
        return y.view(b, h, w, d)


class VSSBlock(nn.Module):
    """x + DropPath(SS2D(LN(x))), then x + DropPath(MLP(LN(x))) when ``mlp_ratio`` > 0.

    forward: (B, H, W, C) -> (B, H, W, C).
    """

    def __init__(self, dim: int, drop_path: float = 0.0, mlp_ratio: float = 4.0, **ssm):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, **ssm)
        self.drop_path = DropPath(drop_path)
        hidden = int(dim * mlp_ratio)
        self.mlp = None
        if hidden > 0:
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop_path.add(x, self.op(self.norm(x)))
        if self.mlp is not None:
            x = self.drop_path.add(x, self.mlp(self.norm2(x)))
        return x


class _LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    """(B, C_in, H, W) -> (B, H/4, W/4, dim): two 3x3 stride-2 convs (VMamba v2's stem)."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, dim // 2, 3, stride=2, padding=1), _LayerNorm2d(dim // 2), nn.GELU(),
            nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and not is_exporting():  # the LayerNorm between the convs then reads them in place, no copies
            x = x.contiguous(memory_format=torch.channels_last)
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """(B, H, W, C) -> (B, H/2, W/2, C_out): concatenate each 2x2 neighbourhood, LN, linear."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class MambaStage(nn.Module):
    """Downsample (patch embedding or merging), VSS blocks, and a LayerNorm on the stage output."""

    def __init__(self, down: nn.Module, dim: int, depth: int, drop_paths: list[float], **block):
        super().__init__()
        self.down = down
        self.blocks = nn.Sequential(*[VSSBlock(dim, drop_path=drop_paths[i], **block) for i in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (channels-last input of the next stage, normalised (B, C, H, W) output map)."""
        x = self.blocks(self.down(x))
        return x, self.norm(x).permute(0, 3, 1, 2).contiguous()


class MambaEncoder(nn.Module):
    """Four VSS stages at 1/4..1/32.

    forward: (B, in_channels, H, W) -> [(B, dims[i], H / 2**(i+2), W / 2**(i+2)) for i in 0..3];
    ``out_channels = dims``. H and W must be divisible by 32.
    """

    def __init__(self, in_channels: int = 3, dims: list[int] = (64, 128, 256, 512), depths: list[int] = (2, 2, 4, 2),
                 drop_path: float = 0.1, mlp_ratio: float = 2.5, d_state: int = 1, ssm_expand: float = 0.5,
                 dt_rank: int | str = "auto", d_conv: int = 3, ssm_gate: bool = False):
        super().__init__()
        self.out_channels = list(dims)
        rates = torch.linspace(0, drop_path, max(sum(depths), 1)).tolist()
        ssm = dict(mlp_ratio=mlp_ratio, d_state=d_state, expand=ssm_expand, dt_rank=dt_rank, d_conv=d_conv,
                   gate=ssm_gate)
        stages, start = [], 0
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            down = PatchEmbed(in_channels, dim) if i == 0 else PatchMerging(dims[i - 1], dim)
            stages.append(MambaStage(down, dim, depth, rates[start:start + depth], **ssm))
            start += depth
        self.stages = nn.ModuleList(stages)
        self.checkpointing = False  # set by the network: recompute each stage in backward
        self.apply(_init_linear)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x, out = checkpoint(stage, x, use_reentrant=False)
            else:
                x, out = stage(x)
            feats.append(out)
        return feats


def _init_linear(m: nn.Module) -> None:
    """VMamba's init for linear layers (truncated normal, std 0.02); SS2D's own tensors keep theirs."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
