"""The selective scan as a small C library (``native.c``), compiled at first use, for CPU fp32.

Why: at d_state 1 a time step is a few flops per channel, so a torch scan issues ops whose
overhead and memory passes dwarf the arithmetic; the C loops read each channel's sequence once
per pass and keep only the recurrence sequential. It needs a C compiler (``cc``, or ``$CC``),
which Linux and macOS machines usually have: the library is built once per source, compiler
and CPU into the user cache (``$CMDB_CACHE_DIR`` or ``~/.cache/cmdbnet``), written under a
temporary name and renamed, so concurrent ranks or a killed build never leave a broken file.
Where no compiler works the dispatcher falls back to the torch scan, once, with a warning.

The same library does SS2D's cross-scan and cross-merge (:class:`CrossScan`, :class:`CrossMerge`):
pure data movement, one pass each where torch needs stacks, flips, transposes and adds.

At d_state <= KEEP_ALL_MAX_N forward keeps each sequence's dt and states for backward (as the
torch scan keeps its states), which saves backward the softplus and the recurrence; above it
backward recomputes them from the inputs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from cmdbnet.models.scan.buffers import worker_pool
from cmdbnet.models.scan.chunked import KEEP_ALL_MAX_N

__all__ = ["NativeScan", "PlaneScan", "CACHE_ENV", "library", "library_error", "library_path"]

CACHE_ENV = "CMDB_CACHE_DIR"
_SOURCE = Path(__file__).with_name("native.c")
# -march=native: the library is built on the machine that runs it (the cache key holds the
# CPU's flags); a compiler that does not know the flag gets the second set. No -ffast-math: it
# would let the compiler assume no NaN or inf.
_FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared")
_TUNINGS = (("-march=native",), ())
_P, _I = ctypes.c_void_p, ctypes.c_int64
_FWD_ARGS = [_I] * 6 + [_P] * 8 + [ctypes.c_int] + [_P] * 4
_BWD_ARGS = [_I] * 6 + [_P] * 8 + [ctypes.c_int] + [_P] * 12


def _cpu_signature() -> str:
    """The CPU's instruction-set flags (a cache shared over NFS must not hand AVX-512 code to an
    older node)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dirs() -> list[Path]:
    """The user cache, then a per-user temporary folder (a read-only home on a cluster node)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                     "cmdbnet")
    user = getattr(os, "getuid", lambda: "user")()
    return [Path(root) / "kernels", Path(tempfile.gettempdir()) / f"cmdbnet-kernels-{user}"]


def _compiler() -> str:
    cc = os.environ.get("CC") or "cc"
    path = shutil.which(cc)
    if path is None:
        raise OSError(f"no C compiler found ({cc!r} is not on PATH; set CC)")
    return path


class CompileError(OSError):
    """The compiler ran and refused the source: another folder would not help."""


def _build(cc: str, dst: Path) -> None:
    """Compile to a temporary name in ``dst``'s folder, then rename onto ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".part", dir=dst.parent)
    os.close(fd)
    try:
        for tuning in _TUNINGS:
            proc = subprocess.run([cc, *_FLAGS, *tuning, str(_SOURCE), "-o", tmp, "-lm"], capture_output=True,
                                  text=True, timeout=120)
            if not proc.returncode:
                os.replace(tmp, dst)
                return
        raise CompileError(f"{Path(cc).name} failed to compile the CPU scan: {proc.stderr.strip()[:300]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _built(cc: str) -> Path:
    """The library for this source, compiler and CPU: from the cache, or built into it."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), *_FLAGS, version, _cpu_signature()]).encode())
    name = f"scan-{key.hexdigest()[:16]}.so"
    cache, fallback = (folder / name for folder in _cache_dirs())
    for path in (cache, fallback):
        if path.is_file():
            return path
    try:
        _build(cc, cache)
        return cache
    except CompileError:
        raise
    except OSError:  # the cache folder cannot be written
        _build(cc, fallback)
        return fallback


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    try:
        lib = ctypes.CDLL(str(_built(_compiler())))
    except (OSError, subprocess.SubprocessError) as exc:
        return None, str(exc)
    lib.cmdb_scan_fwd.argtypes, lib.cmdb_scan_bwd.argtypes = _FWD_ARGS, _BWD_ARGS
    lib.cmdb_xscan_fwd.argtypes = [_I] * 7 + [ctypes.c_int] + [_P] * 10
    lib.cmdb_xscan_bwd.argtypes = [_I] * 7 + [ctypes.c_int] + [_P] * 17
    for fn in (lib.cmdb_scan_fwd, lib.cmdb_scan_bwd, lib.cmdb_xscan_fwd, lib.cmdb_xscan_bwd):
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
    return None if lib is None else lib._name


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _run(fn, units: int, *args) -> None:
    """``fn(lo, hi, *args)`` over units (sequences or planes) shared by torch's intra-op threads.

    ctypes releases the GIL for the call, so the pool's threads run the C code side by side.
    The units go out in a few slices per thread, taken as threads come free: when another
    process holds a core, the other threads take over its share instead of waiting for it.
    """
    workers = max(1, min(units, torch.get_num_threads()))
    if workers == 1:
        codes = [fn(0, units, *args)]
    else:
        slices = min(units, 4 * workers)
        bounds = [units * i // slices for i in range(slices + 1)]
        pool = worker_pool(workers, os.getpid())
        codes = [f.result() for f in [pool.submit(fn, lo, hi, *args) for lo, hi in zip(bounds, bounds[1:])]]
    if any(codes):
        raise MemoryError("the CPU scan could not allocate its per-thread buffers")


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
        _run(lib.cmdb_scan_fwd, b * g, d, l, n, g, *map(_ptr, ins), int(delta_softplus), _ptr(out), _ptr(last),
             _ptr(dt), _ptr(h))
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
        _run(library().cmdb_scan_bwd, b * g, d, l, n, g, *map(_ptr, ins), int(ctx.delta_softplus),
             _ptr(gout), _ptr(glast), *map(_ptr, (gu, gdelta, gA, gB, gC, gD, gz, gbias, dt, h)))
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
        y = u.new_empty((b, l, d))
        keep = any(ctx.needs_input_grad) and n <= KEEP_ALL_MAX_N
        blocks = _blocks(d)  # kept in the C loop's own order: (K, B, blocks, L, [N,] lanes)
        dt, states = (u.new_empty((_K, b, blocks, l, _LANES)), u.new_empty((_K, b, blocks, l, n, _LANES))
                      ) if keep else (None, None)
        _run(library().cmdb_xscan_fwd, b * _blocks(d), b, d, h, w, n, int(delta_softplus), *map(_ptr, ins),
             _ptr(y), _ptr(dt), _ptr(states))
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
        _run(library().cmdb_xscan_bwd, b * blocks, b, d, *ctx.hw, n, int(ctx.delta_softplus), *map(_ptr, ins),
             _ptr(gy.contiguous()), _ptr(dt), _ptr(states), *map(_ptr, (gu, gdelta, gA, gB, gC, gD, gbias)))
        gD = None if D is None else gD.sum(0).repeat(_K)
        gbias = None if delta_bias is None else gbias.sum(0)
        return gu, gdelta, gA.sum(0), gB.sum(0), gC.sum(0), gD, gbias, None, None, None


_K = 4       # scan orders
_LANES = 32  # channels per unit of work (XB in native.c)


def _blocks(d: int) -> int:
    return -(-d // _LANES)
