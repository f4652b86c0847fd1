"""Selective scan (Mamba's S6 recurrence): mamba-ssm's fused CUDA kernel when present, else ours.

``dispatch`` picks the backend per call; ``chunked`` is the torch scan and its backward (CPU);
``buffers`` how it runs on a small CPU; ``native`` the C scan for CPU (the default there, built
at first use); ``triton`` our CUDA kernels (compiled at first use), ``triton_grid`` their grid;
``parallel`` the launch-light log-depth torch scan for CUDA without Triton; ``cost`` its
multiply-adds.

Shapes and semantics are those of ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``::

    u: r(B D L)
    delta: r(B D L)
    A: r(D N)
    B: r(B N L) or r(B G N L)   (G groups split D into G equal blocks of channels)
    C: r(B N L) or r(B G N L)
    D: r(D)
    z: r(B D L)
    delta_bias: r(D)
    out: r(B D L) in u's dtype; last_state: r(B D N) in the compute dtype (fp32, or fp64)

The fused kernel exists only on CUDA and only where mamba-ssm compiled, which a laptop or a CI
box often lacks; the model must still train there, so the CPU backends are real
implementations rather than test oracles: a C scan, and a chunked sequential torch scan with a
hand-written reverse-time backward for machines without a C compiler.
"""

from cmdbnet.models.scan.chunked import KEEP_ALL_MAX_N, chunk_plan, state_bytes
from cmdbnet.models.scan.cost import scan_macs
from cmdbnet.models.scan.dispatch import (
                                          BACKEND_ENV,
                                          BACKENDS,
                                          ScanBackendError,
                                          ScanBackendNameError,
                                          available_backends,
                                          backend_status,
                                          override_function,
                                          resolve_backend,
                                          selective_scan,
)
from cmdbnet.models.scan.footprint import saved_state_bytes
from cmdbnet.models.scan.native import library_path as native_library_path
from cmdbnet.models.scan.native import uses_openmp as native_uses_openmp

__all__ = ["BACKENDS", "BACKEND_ENV", "KEEP_ALL_MAX_N", "ScanBackendError", "ScanBackendNameError",
           "available_backends", "backend_status", "chunk_plan", "native_library_path", "native_uses_openmp",
           "override_function", "resolve_backend",
           "saved_state_bytes", "scan_macs", "selective_scan", "state_bytes"]
