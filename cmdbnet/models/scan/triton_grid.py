"""How the Triton scan splits a call into programs: channel blocks, then chunks of L.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cmdbnet.models.scan.footprint import TRITON_BLOCK_L

__all__ = ["MAX_BLOCK_D", "MIN_CHUNK_BLOCKS", "MIN_TILE", "PROGRAMS_PER_SM", "TILE", "GridPlan", "plan"]

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
    return GridPlan(block_d, n_pad, n_dblk, n_blocks, chunk, n_chunks, (b * g, n_dblk, n_chunks))
