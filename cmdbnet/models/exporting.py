"""Export mode: the network as plain torch ops, which an ONNX exporter can trace.

The CPU fast paths (the C scan and plane scan, the C depthwise convolution, the fused 1x1
matmuls, channels-last inputs) call compiled code through ctypes or hand-written autograd
Functions that no exporter can see into. Inside :func:`exporting` they step aside, as they do
under torch.compile, and the selective scan runs its export form (``scan.parallel.export_scan``):
a log-depth scan whose op count is fixed by the sequence length, so a fixed tile gives one
fixed graph of ordinary ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["exporting", "is_exporting"]

_DEPTH = [0]


@contextlib.contextmanager
def exporting() -> Iterator[None]:
    """Run the network in export mode inside the block (nests; not thread-specific)."""
    _DEPTH[0] += 1
    try:
        yield
    finally:
        _DEPTH[0] -= 1


def is_exporting() -> bool:
    """Inside :func:`exporting`, or while a TorchScript trace or torch.export runs."""
    return bool(_DEPTH[0]) or torch.jit.is_tracing() or torch.compiler.is_exporting()


def adaptive_avg_pool2d(x: torch.Tensor, size: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, size)``; in export mode as two averaging matmuls over the bins
    (the same bins, the same means), which the TorchScript exporter takes for any input size."""
    if not is_exporting():
        return torch.nn.functional.adaptive_avg_pool2d(x, size)
    rows, cols = (_bin_matrix(int(n), size, x) for n in x.shape[-2:])  # the tile is fixed
    return rows @ x @ cols.t()


def _bin_matrix(n: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """(size, n): row i averages input positions floor(i n / size) .. ceil((i + 1) n / size) - 1."""
    bins = [((i * n) // size, -(-(i + 1) * n // size)) for i in range(size)]
    rows = [[1.0 / (hi - lo) if lo <= j < hi else 0.0 for j in range(n)] for lo, hi in bins]
    return torch.tensor(rows, dtype=like.dtype, device=like.device)  # a constant, not traced writes
