"""Process-level CPU settings of the runtime."""

from __future__ import annotations

import platform

import pytest
import torch

from cmdbnet.runtime import reuse_freed_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_reuse_freed_memory_takes_on_glibc_and_tensors_still_work():
    assert reuse_freed_memory() is True
    a = torch.ones(8 << 20)  # 32 MiB: at the mmap threshold
    b = torch.ones(1 << 20)
    del a
    assert float(torch.ones(8 << 20).sum() + b.sum()) == (8 << 20) + (1 << 20)
