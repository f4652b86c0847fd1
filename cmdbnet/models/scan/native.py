"""The selective scan as a small C library (``native.c``, ``plane.c``), built at first use, for CPU fp32.

Why: at d_state 1 a time step is a few flops per channel, so a torch scan issues ops whose
overhead and memory passes dwarf the arithmetic; the C loops read each channel's sequence once
per pass and keep only the recurrence sequential. It needs a C compiler (``cc``, or ``$CC``),
which Linux and macOS machines usually have: the library is built once per source, compiler
and CPU into the user cache (``$CMDB_CACHE_DIR`` or ``~/.cache/cmdbnet``), a private folder
whose files are checked before they are loaded (``build.py`` says how). Where no compiler
works the dispatcher falls back to the torch scan, once, with a warning.

The same library runs SS2D's four scan orders position-major on a channels-last plane
(:class:`PlaneScan`: no reordered copies, no merge) and the depthwise 3 x 3 convolution of
``cmdbnet.models.depthwise``. Built with OpenMP where the compiler has it, so that its loops run
on torch's own OpenMP threads (``parallel.h`` says why that matters).

At d_state <= KEEP_ALL_MAX_N forward keeps each sequence's dt and states for backward (as the
torch scan keeps its states), which saves backward the softplus and the recurrence; above it
backward recomputes them from the inputs.
"""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess

import torch

from cmdbnet.errors import CmdbError
from cmdbnet.models.scan import build
from cmdbnet.models.scan.buffers import worker_pool
from cmdbnet.models.scan.build import CACHE_ENV
from cmdbnet.models.scan.chunked import KEEP_ALL_MAX_N

__all__ = ["NativeScan", "PlaneScan", "CACHE_ENV", "library", "library_error", "library_path", "pointer", "run_units",
           "uses_openmp"]

_P, _I = ctypes.c_void_p, ctypes.c_int64
_FWD_ARGS = [_I] * 6 + [_P] * 8 + [ctypes.c_int] + [_P] * 4
_BWD_ARGS = [_I] * 6 + [_P] * 8 + [ctypes.c_int] + [_P] * 12


def _open(cc: list[str]) -> ctypes.CDLL:
    """Load the checked library; where its OpenMP runtime cannot load here, one built without OpenMP."""
    path = build.library_file(cc)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        path = build.library_file(cc, build.SERIAL_TUNINGS)
        lib = ctypes.CDLL(str(path))
    missing = [name for name in build.SYMBOLS if not hasattr(lib, name)]
    if missing:
        raise OSError(f"the C library {path} lacks {', '.join(missing)}")
    lib.path = str(path)
    return lib


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    try:
        lib = _open(build.compiler())
    except (OSError, subprocess.SubprocessError, CmdbError) as exc:
        return None, str(exc)
    lib.openmp, lib.lanes = bool(lib.cmdb_openmp()), lib.cmdb_xscan_lanes()
    lib.cmdb_set_threads.argtypes = [ctypes.c_int]
    lib.cmdb_scan_fwd.argtypes, lib.cmdb_scan_bwd.argtypes = _FWD_ARGS, _BWD_ARGS
    lib.cmdb_xscan_fwd.argtypes = [_I] * 7 + [ctypes.c_int] + [_P] * 10
    lib.cmdb_xscan_bwd.argtypes = [_I] * 7 + [ctypes.c_int] + [_P] * 17
    lib.cmdb_dw3x3_fwd.argtypes = [_I] * 5 + [_P] * 4
    lib.cmdb_dw3x3_bwd_input.argtypes = [_I] * 5 + [_P] * 3
    lib.cmdb_dw3x3_bwd_weight.argtypes = [_I] * 4 + [_P] * 4
    for fn in (lib.cmdb_scan_fwd, lib.cmdb_scan_bwd, lib.cmdb_xscan_fwd, lib.cmdb_xscan_bwd, lib.cmdb_dw3x3_fwd,
               lib.cmdb_dw3x3_bwd_input, lib.cmdb_dw3x3_bwd_weight):
        fn.restype = ctypes.c_int
    return lib, ""


def library() -> ctypes.CDLL | None:
    """The compiled library, building it on first use; None where it cannot be built."""
    return _load()[0]


def library_error() -> str:
    """Why the library cannot be built here, or ``""``."""
    return _load()[1]


def library_path() -> str | None:
    """The cached library file in use, or None."""
    lib = library()
    return None if lib is None else lib.path


def uses_openmp() -> bool:
    """Whether the library splits its work on torch's OpenMP threads (else Python threads do)."""
    lib = library()
    return lib is not None and lib.openmp


def pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def run_units(fn, units: int, *args) -> None:
    """``fn(lo, hi, *args)`` over units (sequences or planes) on as many threads as torch uses.

    Built with OpenMP, the library splits the units itself, on torch's own OpenMP threads.
    Otherwise a pool of Python threads does (ctypes releases the GIL for the call). Either way
    the units go out in a few slices per thread, taken as threads come free: when another
    process holds a core, the other threads take over its share instead of waiting for it.
    """
    workers, lib = max(1, min(units, torch.get_num_threads())), library()
    if workers == 1 or lib.openmp:
        lib.cmdb_set_threads(workers)
        codes = [fn(0, units, *args)]
    else:
        slices = min(units, 4 * workers)
        bounds = [units * i // slices for i in range(slices + 1)]
        pool = worker_pool(workers, os.getpid())
        codes = [f.result() for f in [pool.submit(fn, lo, hi, *args) for lo, hi in zip(bounds, bounds[1:])]]
    if any(codes):
        raise MemoryError("the C library could not allocate its per-thread buffers")


class NativeScan(torch.autograd.Function):
    """ChunkedScan's signature and results, on CPU fp32 tensors, through the C library."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):  # noqa: N803
        lib = library()
        ins = [t if t is None else t.contiguous() for t in (u, delta, A, B, C, D, z, delta_bias)]
        u, delta, A, B, C, D, z, delta_bias = ins
        (b, d, l), g, n = u.shape, B.shape[1], A.shape[1]
        out, last = u.new_empty((b, d, l)), u.new_empty((b, d, n))
        keep = any(ctx.needs_input_grad) and n <= KEEP_ALL_MAX_N
        dt, h = (u.new_empty((b, d, l)), u.new_empty((b, d, n, l))) if keep else (None, None)
        run_units(lib.cmdb_scan_fwd, b * g, d, l, n, g, *map(pointer, ins), int(delta_softplus), pointer(out),
                  pointer(last), pointer(dt), pointer(h))
        ctx.save_for_backward(*ins, dt, h)
        ctx.delta_softplus = delta_softplus
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout, glast):
        *ins, dt, h = ctx.saved_tensors
        u, delta, A, B, C, D, z, delta_bias = ins
        (b, d, l), g, n = u.shape, B.shape[1], A.shape[1]
        gout = torch.zeros_like(u) if gout is None else gout.contiguous()
        glast = None if glast is None else glast.contiguous()
        gu, gdelta, gB, gC = (torch.empty_like(t) for t in (u, delta, B, C))
        gz = None if z is None else torch.empty_like(z)
        gA = u.new_empty((b, d, n))
        gD = None if D is None else u.new_empty((b, d))
        gbias = None if delta_bias is None else u.new_empty((b, d))
        run_units(library().cmdb_scan_bwd, b * g, d, l, n, g, *map(pointer, ins), int(ctx.delta_softplus),
                  pointer(gout), pointer(glast), *map(pointer, (gu, gdelta, gA, gB, gC, gD, gz, gbias, dt, h)))
        sums = [None if t is None else t.sum(0) for t in (gA, gD, gbias)]
        return gu, gdelta, sums[0], gB, gC, sums[1], gz, sums[2], None


class PlaneScan(torch.autograd.Function):
    """SS2D's four-way scan of a channels-last plane, merged, on CPU fp32 (``cmdb_xscan_*``).

    forward(u (B, L, D), delta (K, B, L, D), A (K*D, N), B and C (B, L, K, N), D and delta_bias
    (K*D) or None, h, w, delta_softplus) -> y (B, L, D): the sum over the four scan orders of an
    L = h * w plane of :func:`selective_scan` with each order's own A, B, C, D and bias, as SS2D's
    cross-scan, scan and cross-merge compute it, without the four reordered copies.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, h, w, delta_softplus=True):  # noqa: N803
        ins = [t if t is None else t.contiguous() for t in (u, delta, A, B, C, D, delta_bias)]
        u, delta, A, B, C, D, delta_bias = ins
        (b, l, d), n = u.shape, A.shape[1]
        y, lib = u.new_empty((b, l, d)), library()
        keep = any(ctx.needs_input_grad) and n <= KEEP_ALL_MAX_N
        blocks = _blocks(d)  # kept in the C loop's own order: (K, B, blocks, L, [N,] lanes)
        dt, states = (u.new_empty((_K, b, blocks, l, lib.lanes)), u.new_empty((_K, b, blocks, l, n, lib.lanes))
                      ) if keep else (None, None)
        run_units(lib.cmdb_xscan_fwd, b * blocks, b, d, h, w, n, int(delta_softplus), *map(pointer, ins),
                  pointer(y), pointer(dt), pointer(states))
        ctx.save_for_backward(*ins, dt, states)
        ctx.hw, ctx.delta_softplus = (h, w), delta_softplus
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        *ins, dt, states = ctx.saved_tensors
        u, delta, A, B, C, D, delta_bias = ins
        (b, _, d), n, blocks = u.shape, A.shape[1], _blocks(u.shape[2])
        gu, gdelta = torch.empty_like(u), torch.empty_like(delta)
        gA, gbias, gD = u.new_empty((b, _K * d, n)), u.new_empty((b, _K * d)), u.new_empty((b, d))
        gB, gC = u.new_empty((blocks, *B.shape)), u.new_empty((blocks, *C.shape))
        run_units(library().cmdb_xscan_bwd, b * blocks, b, d, *ctx.hw, n, int(ctx.delta_softplus), *map(pointer, ins),
                  pointer(gy.contiguous()), pointer(dt), pointer(states),
                  *map(pointer, (gu, gdelta, gA, gB, gC, gD, gbias)))
        gD = None if D is None else gD.sum(0).repeat(_K)
        gbias = None if delta_bias is None else gbias.sum(0)
        return gu, gdelta, gA.sum(0), gB.sum(0), gC.sum(0), gD, gbias, None, None, None


_K = 4  # scan orders


def _blocks(d: int) -> int:
    """Units of work per batch row at d channels: blocks of the C loop's lanes (XB in plane.c)."""
    return -(-d // library().lanes)
