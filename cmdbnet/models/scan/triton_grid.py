"""How the Triton scan splits a call into programs (channel blocks, then chunks of L), and its launches.

Pure arithmetic on the call's shape and the card's multiprocessor count, so it is tested on a
CPU and printed by ``benchmarks/gpu.py`` for the network's shapes.

A program owns ``block_d`` channels of one (batch, group) row and walks its steps in blocks of
``TRITON_BLOCK_L``, the state in registers. One program per 16 channels leaves a large card
mostly idle at the network's stage-1 shape (few channels, long L) and a whole-image window
(batch 1, L in the millions) nearly empty. Two levers, used in this order:

1. Fewer channels per program, down to a tile of one element per thread of a 4-warp program
   (``MIN_TILE``). Free: no work is repeated, and B/C rows (shared by a group's channels) are
   only read more often, which is cheap at the network's small d_state.
2. Chunks of L, each its own program, joined by a carry pass: a first launch scans every chunk
   from a zero state (forward) or a zero gradient (backward) and keeps its end value and its
   product of decays; the second launch starts each chunk from the carry folded over the chunks
   before it (after it, for the backward) and does the full work. The scan is done twice, so a
   chunk is at least ``MIN_CHUNK_BLOCKS`` blocks long and chunks are only made while the
   channel programs fall short of ``PROGRAMS_PER_SM`` per multiprocessor.

Chosen over channels alone because the channel count bounds that lever: at batch 1 no channel
split gives a 132-SM card more than the call's channels, each walking the whole of L.

Where a card is small or the batch large, tiles stay at their largest (``TILE`` elements); the
backward then runs 8 warps instead of 4, since it keeps several such tiles live and 4 warps
spill registers at 16 channels x d_state 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cmdbnet.models.scan.footprint import TRITON_BLOCK_L

__all__ = ["MAX_BLOCK_D", "MIN_CHUNK_BLOCKS", "MIN_TILE", "PROGRAMS_PER_SM", "TILE", "GridPlan", "backward_launches",
           "forward_launches", "launch_plan", "plan"]

TILE = 2048  # at most channels x d_state x steps elements per scanned tile (registers)
MAX_BLOCK_D = 16
MIN_TILE = 128  # one element per thread of a 4-warp program
PROGRAMS_PER_SM = 4  # 16 warps per multiprocessor: enough to hide the block loop's latency
MIN_CHUNK_BLOCKS = 8  # a chunk of L is scanned twice: at least 256 steps of it


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@dataclass(frozen=True)
class GridPlan:
    """Block sizes and the grid (B*G, channel blocks, chunks) of one scan call."""

    block_d: int
    n_pad: int
    n_dblk: int
    n_blocks: int  # blocks of TRITON_BLOCK_L steps over L
    chunk: int  # blocks per chunk
    n_chunks: int
    grid: tuple[int, int, int]
    bwd_warps: int  # 8 for the backward's largest tiles: half the registers per thread (no spills)

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


def plan(b: int, g: int, dg: int, n: int, l: int, sms: int) -> GridPlan:  # noqa: E741
    """The plan for B batch rows, G groups of ``dg`` channels, d_state ``n``, length ``l`` on a
    card with ``sms`` multiprocessors (0: no target, as under the interpreter: 16-channel blocks,
    one chunk)."""
    n_pad = _pow2(n)
    block_d = min(_pow2(dg), MAX_BLOCK_D, max(1, TILE // (n_pad * TRITON_BLOCK_L)))
    floor = max(1, MIN_TILE // (n_pad * TRITON_BLOCK_L))
    target = PROGRAMS_PER_SM * sms
    while block_d > floor and b * g * math.ceil(dg / block_d) < target:
        block_d //= 2
    n_dblk = math.ceil(dg / block_d)
    n_blocks = max(1, math.ceil(l / TRITON_BLOCK_L))
    chunk = n_blocks
    if b * g * n_dblk < target:
        wanted = math.ceil(target / (b * g * n_dblk))
        chunk = min(n_blocks, max(MIN_CHUNK_BLOCKS, math.ceil(n_blocks / wanted)))
    n_chunks = math.ceil(n_blocks / chunk)
    warps = 8 if block_d * n_pad * TRITON_BLOCK_L >= TILE else 4
    return GridPlan(block_d, n_pad, n_dblk, n_blocks, chunk, n_chunks, (b * g, n_dblk, n_chunks), warps)


def launch_plan(b: int, d: int, g: int, n: int, l: int, sms: int) -> GridPlan:  # noqa: E741
    """The grid of a (B, D, L) call with G groups and d_state N on a card of ``sms`` multiprocessors."""
    return plan(b, g, d // g, n, l, sms)


def _opt(t, u):
    return t if t is not None else u  # a pointer the kernel never reads


def forward_launches(u, delta, A, B, C, D, z, delta_bias, softplus, sms):  # noqa: N803
    """(out, last_state, checkpoints, launches): the forward's buffers and its kernel launches as
    (grid, args, keywords), in order, not run. Inputs contiguous fp32, B and C (B, G, N, L)."""
    b, d, l = u.shape  # noqa: E741
    g, n = B.shape[1], A.shape[1]
    p = launch_plan(b, d, g, n, l, sms)
    out, last, states = u.new_empty((b, d, l)), u.new_empty((b, d, n)), u.new_empty((b, d, n, p.n_blocks))
    hloc, prod = (u.new_empty((p.n_chunks, b, d, n)) if p.n_chunks > 1 else u for _ in range(2))
    args = (u, delta, A, B, C, _opt(D, u), _opt(z, u), _opt(delta_bias, u), out, states, last, hloc, prod,
            d, d // g, g, l, n, p.n_blocks, p.chunk, p.n_chunks, *B.stride(), *C.stride())
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                 SOFTPLUS=bool(softplus), BLOCK_D=p.block_d, N_PAD=p.n_pad, BL=TRITON_BLOCK_L)
    launches = [(p.grid, args, {**flags, "LOCAL": False})]
    if p.n_chunks > 1:  # first the carry pass: every chunk but the last from a zero state
        launches.insert(0, ((b * g, p.n_dblk, p.n_chunks - 1), args, {**flags, "LOCAL": True}))
    return out, last, states, launches


def backward_launches(u, delta, A, B, C, D, z, delta_bias, states, softplus, gout, glast, sms):  # noqa: N803
    """(launches, finish): the backward's kernel launches as in :func:`forward_launches`, and
    what returns the gradients once they ran."""
    b, d, l = u.shape  # noqa: E741
    g, n = B.shape[1], A.shape[1]
    p = launch_plan(b, d, g, n, l, sms)
    gu, gdelta = torch.empty_like(u), torch.empty_like(u)
    gz = torch.empty_like(u) if z is not None else None
    gB, gC = (u.new_empty((b, g, p.n_dblk, n, l)) for _ in range(2))  # noqa: N806
    gA = u.new_empty((p.n_chunks * b, d, n))  # noqa: N806
    gD, gbias = u.new_empty((p.n_chunks * b, d)), u.new_empty((p.n_chunks * b, d))  # noqa: N806
    gcar, prod = (u.new_empty((p.n_chunks, b, d, n)) if p.n_chunks > 1 else u for _ in range(2))
    head = (u, delta, A, B, C, _opt(D, u), _opt(z, u), _opt(delta_bias, u), states, gout, _opt(glast, u),
            gcar, prod, gu, gdelta, _opt(gz, u), gB, gC, gA, gD, gbias,
            d, d // g, g, l, n, p.n_blocks, p.n_dblk, p.chunk, p.n_chunks)
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                 SOFTPLUS=bool(softplus), HAS_GLAST=glast is not None, BLOCK_D=p.block_d, N_PAD=p.n_pad,
                 BL=TRITON_BLOCK_L, num_warps=p.bwd_warps)
    launches = [(p.grid, (*head, 0, *B.stride(), *C.stride()), {**flags, "LOCAL": False})]
    if p.n_chunks > 1:  # first the carry pass: every chunk but the first from a zero gradient
        launches.insert(0, ((b * g, p.n_dblk, p.n_chunks - 1), (*head, 1, *B.stride(), *C.stride()),
                            {**flags, "LOCAL": True}))

    def finish():
        gb, gc = (t[:, :, 0] if p.n_dblk == 1 else t.sum(2) for t in (gB, gC))
        return (gu, gdelta, gA.sum(0), gb, gc, gD.sum(0) if D is not None else None, gz,
                gbias.sum(0) if delta_bias is not None else None, None)

    return launches, finish
