"""Compiles the Triton scan's launches for NVIDIA targets without a GPU and reads ptxas' figures.

Every launch of a network call (D, delta_bias and softplus on, z off), with its arguments bound
the way Triton's launcher binds them (integers equal to 1 become constants, divisibility by 16
is noted), lowered to PTX and a cubin by Triton's own ptxas, whose -v log gives registers and
spills. ``python tests/models/triton_compile.py`` prints the full table (sm_75/80/86/90, a large
card's grid and the largest tiles) under whichever Triton is installed; benchmarks/gpu.py runs
it on the card's image. Needs no pytest; test_scan_triton_compile.py checks a subset in CI.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from cmdbnet.models.scan import triton as triton_scan

CAPABILITIES = (75, 80, 86, 90)
# (multiprocessors, d_states, kernels): an H100/H200's grid (small channel blocks, chunks of L and
# their carry passes); and the largest tiles (16 channels x d_state x 32 steps, at most 2048), which
# a small card or a large batch gets: the backward is the kernel at risk there
PLANS = ((132, (1, 16), ("forward", "backward")), (0, (1, 4, 16), ("backward",)))


def network_launches(n: int, sms: int, b: int = 4, d: int = 128, groups: int = 4, l: int = 1024):  # noqa: E741
    """(name, kernel, args, keywords) of every launch of one forward + backward at stage 1's
    channels on a card of ``sms`` multiprocessors: the network's flags, and inputs as the
    dispatcher hands them over."""
    g = torch.Generator().manual_seed(0)
    u, delta, gout = (torch.randn(b, d, l, generator=g) for _ in range(3))
    A = -torch.rand(d, n, generator=g)  # noqa: N806
    B, C = (torch.randn(b, groups, n, l, generator=g) for _ in range(2))  # noqa: N806
    D, bias = torch.ones(d), torch.rand(d, generator=g)  # noqa: N806
    fwd, bwd = triton_scan.kernels(False)
    _, _, states, f = triton_scan.forward_launches(u, delta, A, B, C, D, None, bias, True, sms)
    bl, _ = triton_scan.backward_launches(u, delta, A, B, C, D, None, bias, states, True, gout, None, sms)
    out = []
    for name, kernel, launches in (("forward", fwd, f), ("backward", bwd, bl)):
        out += [(f"{name}{' carry pass' if kw['LOCAL'] else ''}", kernel, args, kw) for _, args, kw in launches]
    assert len(out) == (4 if sms else 2), "a 132-SM card gets the chunked grid at these shapes"
    return out


def compile_like_runtime(kernel, args, kwargs, capability: int):
    """(compiled kernel, ptxas -v log): the launcher's binding of ``args``, compiled for sm_``capability``."""
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as cache, triton.knobs.cache.scope(), triton.knobs.nvidia.scope():
        triton.knobs.cache.dir = cache  # a fresh cache, so that ptxas runs and prints its log
        triton.knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    return compiled, log.getvalue()


def ptxas_figures(log: str) -> tuple[int, int]:
    """(registers, spilled bytes stored + loaded) from a ptxas -v log of one kernel."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert regs and spills, log
    return int(regs[1]), int(spills[1]) + int(spills[2])


def rows(sms: int, d_states, kernels, capabilities=CAPABILITIES):
    for n in d_states:
        for name, kernel, args, kw in network_launches(n, sms):
            if name.split()[0] not in kernels:
                continue
            for cap in capabilities:
                compiled, log = compile_like_runtime(kernel, args, kw, cap)
                assert f".target sm_{cap}" in compiled.asm["ptx"] and compiled.asm["cubin"]
                yield cap, n, name, kw["BLOCK_D"], kw.get("num_warps", 4), *ptxas_figures(log), compiled.asm["ttir"]


def main() -> int:
    print(f"triton {triton.__version__}: the scan kernels compiled with the network's flags")
    print("| target | d_state | kernel | grid for | channels per program | warps | registers | spilled bytes |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0
    for sms, d_states, kernels in PLANS:
        for cap, n, name, block_d, warps, registers, spilled, _ in rows(sms, d_states, kernels):
            grid = f"{sms} SMs" if sms else "largest tiles"
            print(f"| sm_{cap} | {n} | {name} | {grid} | {block_d} | {warps} | {registers} | {spilled} |", flush=True)
            worst = max(worst, spilled)
    return 1 if worst else 0


if __name__ == "__main__":
    sys.exit(main())
