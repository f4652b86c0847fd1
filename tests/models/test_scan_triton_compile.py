"""The Triton scan kernels compile for real NVIDIA targets, here, without a GPU.

The interpreter (test_scan_backends) checks what the kernels compute, not that Triton's
compiler accepts them; this lowers both kernels to PTX and a cubin (Triton ships its own
ptxas) for a Turing laptop card (sm_75) and a Hopper server card (sm_90).
"""

from __future__ import annotations

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from cmdbnet.models.scan import triton as triton_scan


def _signature(fn, constexprs: dict) -> dict[str, str]:
    # pointers end in _p (fp32 after the dispatcher's upcast); everything else is a size or stride
    return {n: "constexpr" if n in constexprs else ("*fp32" if n.endswith("_p") else "i32") for n in fn.arg_names}


# (target, flags on?, (channels per group, d_state)): the default network's stage-1 call, and v0's d_state 16
CASES = [(75, True, (32, 1)), (90, False, (64, 16))]


@pytest.mark.slow
@pytest.mark.parametrize(("capability", "flags", "shape"), CASES)
def test_kernels_compile_for_nvidia_targets(monkeypatch, capability, flags, shape):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    block_d, n_pad = triton_scan._plan(*shape)
    fwd, bwd = triton_scan.kernels(False)
    consts = dict(HAS_D=flags, HAS_Z=flags, HAS_BIAS=flags, SOFTPLUS=flags, BLOCK_D=block_d, N_PAD=n_pad,
                  BL=triton_scan.BLOCK_L)
    for fn, extra in ((fwd, {}), (bwd, {"HAS_GLAST": flags})):
        c = {**consts, **extra}
        kernel = triton.compile(ASTSource(fn=fn, signature=_signature(fn, c), constexprs=c),
                                target=GPUTarget("cuda", capability, 32))
        assert f".target sm_{capability}" in kernel.asm["ptx"] and kernel.asm["cubin"]
