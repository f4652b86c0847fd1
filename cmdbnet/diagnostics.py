"""What will run where: devices, library versions and the scan backend per device (``cmdb doctor``).

One function gathers the facts so the CLI, a bug report and a benchmark print the same ones.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

from cmdbnet.errors import CmdbError
from cmdbnet.models import scan

__all__ = ["environment_report"]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _devices() -> list[dict]:
    out = [{"device": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append({"device": f"cuda:{i}", "name": p.name, "capability": f"{p.major}.{p.minor}",
                        "memory_gib": round(p.total_memory / 2**30, 1)})
    return out


def _backend(device: str) -> str:
    try:
        return scan.resolve_backend(device)
    except CmdbError as exc:  # CMDB_SCAN_BACKEND names something that cannot run here
        return f"error: {exc}"


def environment_report() -> dict:
    """Devices, torch/CUDA/cuDNN versions, Triton and mamba-ssm import status with the reason,
    and the scan backend CPU and CUDA tensors get (honouring ``CMDB_SCAN_BACKEND``).

    The CUDA answer is what CUDA tensors would get, also on a machine without a GPU.
    """
    v = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    # cuDNN 9 encodes major*10000 + minor*100 + patch, cuDNN 8 major*1000 + minor*100 + patch
    cudnn = None if v is None else (f"{v // 10000}.{v % 10000 // 100}.{v % 100}" if v >= 90000
                                    else f"{v // 1000}.{v % 1000 // 100}.{v % 100}")
    status = scan.backend_status()
    optional = {}
    for name, dist in (("triton", "triton"), ("mamba_ssm", "mamba-ssm")):
        why = status[name]
        optional[name] = {"ok": not why, "version": _version(dist), "reason": why or None}
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "cudnn": cudnn,
        "cuda_available": torch.cuda.is_available(),
        "devices": _devices(),
        "scan_backend_env": os.environ.get(scan.BACKEND_ENV, "auto") or "auto",
        "scan_backend": {"cpu": _backend("cpu"), "cuda": _backend("cuda")},
        "optional": optional,
        "native_scan": {"ok": not status["native"], "library": scan.native_library_path(),
                        "openmp": scan.native_uses_openmp(), "reason": status["native"] or None},
    }
