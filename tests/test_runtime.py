"""Runtime policies: autocast (what runs when a precision is asked for, and why when it differs) and
the process allocator setting."""

from __future__ import annotations

import platform

import pytest
import torch

from cmdbnet.runtime import inference_precision, resolve_precision
from cmdbnet.utils import reuse_freed_memory

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_fp32_when_amp_is_off():
    p = resolve_precision(False, "fp16", CUDA)
    assert (p.enabled, p.dtype, p.label, p.needs_scaler, p.note) == (False, torch.float32, "fp32", False, "")


def test_fp16_on_cpu_falls_back_to_fp32_and_says_why():
    p = resolve_precision(True, "fp16", CPU)
    assert not p.enabled and p.label == "fp32" and "needs CUDA" in p.note and "bf16" in p.note


def test_bf16_on_cpu_autocasts_without_a_scaler():
    p = resolve_precision(True, "bf16", CPU)
    assert (p.enabled, p.dtype, p.needs_scaler, p.note) == (True, torch.bfloat16, False, "")
    with p.autocast(CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_fp16_on_cuda_needs_a_scaler():
    p = resolve_precision(True, "fp16", CUDA)
    assert (p.enabled, p.dtype, p.needs_scaler, p.label) == (True, torch.float16, True, "fp16")


def test_bf16_on_a_gpu_without_bf16_falls_back_to_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    p = resolve_precision(True, "bf16", CUDA)
    assert (p.enabled, p.dtype, p.needs_scaler) == (True, torch.float16, True) and "no bf16" in p.note


def test_inference_precision_is_fp16_on_cuda_and_bf16_on_cpu():
    assert inference_precision(True, CUDA).dtype == torch.float16
    assert inference_precision(True, CPU).dtype == torch.bfloat16
    assert not inference_precision(False, CPU).enabled


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_reuse_freed_memory_takes_on_glibc_and_tensors_still_work():
    assert reuse_freed_memory() is True
    a = torch.ones(8 << 20)  # 32 MiB: at the mmap threshold
    b = torch.ones(1 << 20)
    del a
    assert float(torch.ones(8 << 20).sum() + b.sum()) == (8 << 20) + (1 << 20)
