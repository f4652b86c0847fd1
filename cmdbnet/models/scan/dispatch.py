"""Which scan backend runs a call, and the ``selective_scan`` entry point that dispatches to it.

``auto`` sends CUDA tensors to mamba-ssm's fused kernel when it imports, else to our Triton
kernels when Triton imports, else to the launch-light ``torch_parallel`` scan; CPU tensors go
to the ``native`` C scan (compiled at first use), or to the chunked ``torch`` scan where no C
compiler works (one warning) or the dtype is not fp32 after upcasting (fp64). A Triton kernel
that fails to compile or launch under ``auto`` turns Triton off for the rest of the process,
with one warning, and the call runs on ``torch_parallel``; asked for explicitly
(``CMDB_SCAN_BACKEND=triton``) the failure raises.
"""


from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings

import torch

from cmdbnet.errors import CmdbError
from cmdbnet.models.scan import native
from cmdbnet.models.scan.chunked import ChunkedScan
from cmdbnet.models.scan.parallel import ParallelScan

__all__ = ["BACKENDS", "BACKEND_ENV", "ScanBackendError", "ScanBackendNameError", "available_backends",
           "backend_status", "override_function", "resolve_backend", "selective_scan"]

BACKEND_ENV = "CMDB_SCAN_BACKEND"
BACKENDS = ("auto", "native", "torch", "torch_parallel", "triton", "mamba_ssm")
_TRITON_FAILURE: list[str] = []  # why Triton was turned off in this process, once it was


class ScanBackendError(CmdbError, RuntimeError):
    """The requested scan backend cannot run here; the user installs it or unsets the variable."""


class ScanBackendNameError(CmdbError, ValueError):
    """``CMDB_SCAN_BACKEND`` holds a name no backend answers to."""


@functools.cache
def _mamba_ssm_import() -> tuple[object | None, str]:
    """``(selective_scan_fn or None, why not)``, cached so that a failed import costs once.

    Released mamba_ssm imports its compiled ``selective_scan_cuda`` at import time, so a wheel
    built against another CUDA or torch fails with OSError or anything else, not only
    ImportError; each of them means "use ours".
    """
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # noqa: BLE001 - see docstring
        return None, f"{type(exc).__name__}: {exc}"
    return selective_scan_fn, ""


@functools.cache
def _triton_import() -> tuple[object | None, str]:
    """``(cmdbnet.models.scan.triton or None, why not)``: Triton ships with torch's Linux CUDA
    wheels only, and a broken install can fail with anything, as mamba_ssm's can."""
    try:
        from cmdbnet.models.scan import triton as triton_scan  # optional dependency: triton
    except Exception as exc:  # noqa: BLE001 - see docstring
        return None, f"{type(exc).__name__}: {exc}"
    triton_scan.TritonScan.on_failure = staticmethod(_triton_failed)
    return triton_scan, ""


def _device_is_cuda(device: torch.device | str) -> bool:
    """Whether the fused kernel can take tensors on ``device`` (a seam for tests without a GPU)."""
    return torch.device(device).type == "cuda"


def _requested() -> str:
    name = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ScanBackendNameError(f"{BACKEND_ENV}={name!r} is not a scan backend; use one of "
                                   f"{', '.join(BACKENDS)}")
    return name


def available_backends() -> tuple[str, ...]:
    """Backends that run here; ``native`` needs CPU tensors, ``mamba_ssm`` and ``triton`` CUDA ones."""
    extra = (name for name, imp in (("triton", _triton_import), ("mamba_ssm", _mamba_ssm_import)) if imp()[0])
    return (*(("native",) if native.library() else ()), "torch", "torch_parallel", *extra)


def backend_status() -> dict[str, str]:
    """Per optional backend, ``""`` when it can run (and has not failed here) or why it cannot."""
    return {"native": native.library_error(),
            "triton": _TRITON_FAILURE[0] if _TRITON_FAILURE else _triton_import()[1],
            "mamba_ssm": _mamba_ssm_import()[1]}


@functools.cache
def _native_or_torch() -> str:
    """``native`` when the C scan builds here, else ``torch`` with one warning per process."""
    if native.library() is not None:
        return "native"
    warnings.warn(f"the C selective scan could not be built ({native.library_error()}); using the slower "
                  f"torch scan. Set {BACKEND_ENV}=torch to skip it.", RuntimeWarning, stacklevel=3)
    return "torch"


def resolve_backend(device: torch.device | str) -> str:
    """The backend (one of ``BACKENDS`` but auto) for tensors on ``device``, honouring ``CMDB_SCAN_BACKEND``.

    The variable is read at every call so that a run (or a test) can switch backends without
    re-importing the model.
    """
    name = _requested()
    if name in ("torch", "torch_parallel"):
        return name
    if name == "auto":
        if not _device_is_cuda(device):
            return _native_or_torch() if torch.device(device).type == "cpu" else "torch"
        if _mamba_ssm_import()[0] is not None:
            return "mamba_ssm"
        return "triton" if _triton_import()[0] is not None and not _TRITON_FAILURE else "torch_parallel"
    if name == "triton":
        mod, why = _triton_import()
        if mod is None:
            raise ScanBackendError(f"{BACKEND_ENV}=triton but triton cannot be imported ({why}); it ships with "
                                   f"torch's Linux CUDA wheels, or set {BACKEND_ENV}=auto")
        if not _device_is_cuda(device) and not mod.interpreter_ready():
            raise ScanBackendError(f"{BACKEND_ENV}=triton needs CUDA tensors, got {device} (to run its kernels "
                                   f"on CPU, set TRITON_INTERPRET=1 before the process starts); or set "
                                   f"{BACKEND_ENV}=auto")
        return "triton"
    if name == "native":
        if native.library() is None:
            raise ScanBackendError(f"{BACKEND_ENV}=native but the C scan cannot be built here "
                                   f"({native.library_error()}); or set {BACKEND_ENV}=auto")
        if torch.device(device).type != "cpu":
            raise ScanBackendError(f"{BACKEND_ENV}=native needs CPU tensors, got {device}; set {BACKEND_ENV}=auto")
        return "native"
    fn, why = _mamba_ssm_import()
    if fn is None:
        raise ScanBackendError(f"{BACKEND_ENV}=mamba_ssm but mamba_ssm cannot be imported ({why}); "
                               f"install it with `pip install cmdbnet[cuda]` (needs a CUDA toolkit), "
                               f"or set {BACKEND_ENV}=auto")
    if not _device_is_cuda(device):
        raise ScanBackendError(f"{BACKEND_ENV}=mamba_ssm needs CUDA tensors, got {device}; "
                               f"set {BACKEND_ENV}=auto")
    return "mamba_ssm"


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:  # noqa: N803
    """Shape errors in the caller's terms, rather than from deep inside the chunk loop."""
    (b, d, l), n = (u.shape if u.dim() == 3 else (0, 0, 0)), A.shape[-1]  # noqa: E741
    want = {"u": (b, d, l), "delta": (b, d, l), "A": (d, n), "D": (d,), "z": (b, d, l), "delta_bias": (d,)}
    for (name, shape), t in zip(want.items(), (u, delta, A, D, z, delta_bias)):
        if t is not None and (tuple(t.shape) != shape or not b or t.is_complex()):
            raise ValueError(f"selective_scan: {name} must be real with shape {shape} for u (B, D, L) and "
                             f"A (D, N); got {tuple(t.shape)} {t.dtype}")
    for name, t in (("B", B), ("C", C)):
        g = t.shape[1] if t.dim() == 4 else 1
        if tuple(t.shape) not in ((b, n, l), (b, g, n, l), (d, n)) or d % g or t.is_complex():
            raise ValueError(f"selective_scan: {name} must be real, (B, N, L) = {(b, n, l)}, (B, G, N, L) with G "
                             f"dividing D = {d}, or time-invariant (D, N) = {(d, n)}; got {tuple(t.shape)} "
                             f"{t.dtype}")


def _run(function, u, delta, A, B, C, D, z, delta_bias, delta_softplus, last, dtype=None):  # noqa: N803
    """Run one of our autograd Functions (ChunkedScan's signature) the way mamba-ssm runs its kernel.

    fp16/bf16 are upcast as mamba-ssm does (the decays underflow in half precision); fp64 stays
    unless ``dtype`` says otherwise, so gradcheck can run. The casts sit outside the Function:
    autograd then hands each gradient back in its input's dtype.
    """
    dtype = dtype or torch.promote_types(u.dtype, torch.float32)
    (b, d, l), n = u.shape, A.shape[1]  # noqa: E741
    # time-invariant (D, N): each channel its own group, constant over L (autograd sums it back)
    B, C = (t[None, :, :, None].expand(b, d, n, l) if t.dim() == 2 else t for t in (B, C))
    B, C = (t.unsqueeze(1) if t.dim() == 3 else t for t in (B, C))
    g = math.lcm(B.shape[1], C.shape[1])  # B and C in different groups (the CUDA kernel refuses it)
    B, C = (t.repeat_interleave(g // t.shape[1], dim=1) if t.shape[1] != g else t for t in (B, C))
    args = [t if t is None else t.to(dtype) for t in (u, delta, A, B, C, D, z, delta_bias)]
    out, last_state = function.apply(*args, bool(delta_softplus))
    return (out.to(u.dtype), last_state) if last else out.to(u.dtype)


def _triton_failed(exc: BaseException) -> bool:
    """A Triton kernel failed to compile or launch: under ``auto``, turn Triton off for this process
    with one warning and say "fall back" (True); asked for explicitly, say "raise" (False)."""
    if _requested() == "triton":
        return False
    if not _TRITON_FAILURE:
        _TRITON_FAILURE.append(f"its kernel failed here ({type(exc).__name__}: {str(exc).strip()[:300]})")
        warnings.warn(f"Triton selective scan failed to compile or launch ({type(exc).__name__}: "
                      f"{str(exc).strip()[:300]}); using the torch_parallel scan for the rest of this "
                      f"run. Set {BACKEND_ENV}=torch_parallel to skip Triton.", RuntimeWarning, stacklevel=3)
    return True


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,  # noqa: N803
                   delta_softplus=False, return_last_state=False):
    """Drop-in for mamba_ssm's ``selective_scan_fn``; returns ``out`` or ``(out, last_state)``.

    u, delta, z (B, D, L); A (D, N), real; B and C (B, N, L), (B, G, N, L) with G dividing D, or
    time-invariant (D, N) (run as D groups constant over L: memory of a (B, D, N, L) input);
    D and delta_bias (D,). Complex A, B or C are refused (ValueError).

    The backend is resolved per call (see :func:`resolve_backend`) so one model runs the fused
    kernel on a GPU box and the torch scan on a laptop without a code change.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    backend = resolve_backend(u.device)
    if backend == "mamba_ssm":
        return _mamba_ssm_import()[0](u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                      delta_softplus=delta_softplus, return_last_state=return_last_state)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if backend == "triton":
        try:
            return _run(_triton_import()[0].TritonScan, *args, dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - a compile or launch failure; _triton_failed decides
            if not _triton_failed(exc):
                raise
        backend = "torch_parallel"
    if backend == "native" and torch.promote_types(u.dtype, torch.float32) == torch.float32:
        return _run(native.NativeScan, *args)
    return _run(ParallelScan if backend == "torch_parallel" else _scan_function(), *args)


_FUNCTION_OVERRIDE: list[type[torch.autograd.Function]] = []


@contextlib.contextmanager
def override_function(fn: type[torch.autograd.Function]):
    """Run the torch backend's scans through ``fn`` (ChunkedScan's signature) inside the block.

    The public seam for profiling, which traces memory with a stand-in that allocates what
    ChunkedScan saves but skips its time loop.
    """
    _FUNCTION_OVERRIDE.append(fn)
    try:
        yield
    finally:
        _FUNCTION_OVERRIDE.remove(fn)


def _scan_function() -> type[torch.autograd.Function]:
    return _FUNCTION_OVERRIDE[-1] if _FUNCTION_OVERRIDE else ChunkedScan
