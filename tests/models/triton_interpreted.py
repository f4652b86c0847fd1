"""Triton scan kernels on CPU under TRITON_INTERPRET=1, against the sequential reference.

Not collected by itself (the name does not start with ``test_``): ``test_scan_backends`` runs it
in a fresh process with the variable set before triton is imported, which the interpreter needs.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import triton
import triton.language as tl
from scan_reference import (
    BROKEN_KERNEL,
    check_against_reference,
    check_half_precision,
    make_inputs,
    reference_scan,
    rel_err,
)

from cmdbnet.models import scan
from cmdbnet.models.scan import dispatch, selective_scan, triton_grid
from cmdbnet.models.scan import triton as triton_scan

if not triton_scan.interpreter_ready():
    pytest.exit("run with TRITON_INTERPRET=1 (see test_scan_backends.py)", returncode=3)


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv(scan.BACKEND_ENV, "triton")
    monkeypatch.setattr(dispatch, "_TRITON_FAILURE", [])
    dispatch._triton_import.cache_clear()
    yield
    dispatch._triton_import.cache_clear()


# Every option on and off at least once, every B/C form, every output mode; L = 1, L past one
# block of 32 steps and not a multiple of it, exactly two blocks; d_state 1, 16 and 3, 5
# (padded to 4 and 8); channel blocks the group does not fill.
CASES = [  # form, D, z, delta_bias, delta_softplus, mode, (b, d, l, n)
    ("3d", True, True, True, True, "out+last", (2, 4, 1, 3)),
    ("g2", True, True, True, True, "out+last", (2, 6, 37, 4)),
    ("g1", False, False, False, False, "out", (1, 4, 64, 16)),
    ("g2", True, False, True, True, "last", (2, 4, 45, 1)),
    ("3d", False, True, False, True, "out", (1, 3, 33, 5)),
    ("g2", True, True, False, False, "out+last", (1, 4, 64, 1)),
    ("g1", True, False, True, False, "out", (1, 2, 40, 16)),
    ("dn", True, True, True, True, "out+last", (1, 4, 9, 2)),  # time-invariant B and C (D, N)
]


@pytest.mark.parametrize(("form", "has_D", "has_z", "has_bias", "softplus", "mode", "shape"), CASES)
def test_matches_reference(form, has_D, has_z, has_bias, softplus, mode, shape):
    i = CASES.index((form, has_D, has_z, has_bias, softplus, mode, shape))
    kw = make_inputs(*shape, form, D=has_D, z=has_z, bias=has_bias, seed=i)
    check_against_reference(kw, softplus, mode, i)


def test_strided_and_mixed_group_b_c():
    kw = make_inputs(2, 6, 35, 2, "3d", D=True, z=True, bias=True, seed=7)
    proj = torch.randn(2, 3, 9, 35, generator=torch.Generator().manual_seed(8))
    kw["C"] = proj[:, :, 3:5].requires_grad_()  # (B, 3, N, L), strided, as the model's slices
    assert not kw["C"].is_contiguous()
    check_against_reference(kw, True, "out+last", 8)


@pytest.mark.parametrize(("has_z", "mode"), [(True, "out+last"), (False, "out")])
def test_chunks_of_l_joined_by_carry_passes(monkeypatch, has_z, mode):
    """The grid of a large card (L in chunks, each started from the carry of the others) at a
    shape the interpreter runs: 3 chunks of one block, the last one partial; with the gate and
    the last state's gradient, and with the network's flags."""
    monkeypatch.setattr(triton_scan, "_sm_count", lambda device: 64)
    monkeypatch.setattr(triton_grid, "MIN_CHUNK_BLOCKS", 1)
    assert triton_grid.plan(1, 2, 2, 2, 70, 64).grid == (2, 1, 3)
    kw = make_inputs(1, 4, 70, 2, "g2", D=True, z=has_z, bias=True, seed=20 + has_z)
    with torch.no_grad():  # softplus(delta) about 0.02: decays near 1, so carries cross whole chunks
        kw["delta"].sub_(4.0)
    check_against_reference(kw, True, mode, 20 + has_z)


def _probe(out_p, b, g, ch, dim, L, N, n_blocks, sb, sg):  # noqa: N803
    one = tl.arange(0, 1)
    rows, dn_rows = _rows(b, ch + one, dim, L, N, (N - 1) + one)  # noqa: F821 - the kernels' own helpers
    tl.store(out_p + one, rows + (L - 1))
    tl.store(out_p + 1 + one, tl.reshape(dn_rows * n_blocks + (n_blocks - 1), (1,)))
    tl.store(out_p + 2 + one, _bc_base(b, g, sb, sg) + one)  # noqa: F821
    tl.store(out_p + 3 + one, ((b * dim + ch + one) * N + N - 1) * n_blocks + n_blocks - 1)  # 32-bit, as before


def test_offsets_past_2_31_are_exact():
    """The last element's offsets at B=64, D=1024, L=2**20, d_state 16, G=4, from the helpers the
    kernels use, with the sizes as the launcher passes them (32-bit integers)."""
    b, d, l, n, g = 64, 1024, 2**20, 16, 4  # noqa: E741
    n_blocks = l // triton_scan.BLOCK_L
    probe = triton.jit(types.FunctionType(_probe.__code__, triton_scan.jitted(True), "_probe"))
    out = torch.zeros(4, dtype=torch.int64)
    probe[(1,)](out, b - 1, g - 1, d - 1, d, l, n, n_blocks, g * n * l, n * l)
    assert out[0] == b * d * l - 1 and out[1] == b * d * n * n_blocks - 1 > 2**31
    assert out[2] == (b - 1) * g * n * l + (g - 1) * n * l > 2**31
    assert out[3] != b * d * n * n_blocks - 1  # the interpreter does wrap 32-bit products


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_fp32(dtype):
    check_half_precision(dtype)




def test_backward_failure_falls_back_under_auto(monkeypatch):
    monkeypatch.setenv(scan.BACKEND_ENV, "auto")
    monkeypatch.setattr(dispatch, "_device_is_cuda", lambda device: True)
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)
    dispatch._mamba_ssm_import.cache_clear()
    fwd = triton_scan.kernels(True)[0]
    monkeypatch.setattr(triton_scan, "kernels", lambda interpret: (fwd, BROKEN_KERNEL))
    kw = make_inputs(2, 4, 9, 3, "g2", D=True, z=True, bias=True)
    out = selective_scan(**kw, delta_softplus=True)  # forward on the Triton kernel
    with pytest.warns(RuntimeWarning, match="sm_50.*torch_parallel"):
        grads = torch.autograd.grad(out.sum(), list(kw.values()))
    ref = torch.autograd.grad(reference_scan(**kw, delta_softplus=True).sum(), list(kw.values()))
    assert all(rel_err(a, r) <= 1e-5 for a, r in zip(grads, ref))
    assert scan.resolve_backend("cuda") == "torch_parallel"
    dispatch._mamba_ssm_import.cache_clear()


def test_backward_failure_raises_when_triton_was_asked_for(monkeypatch):
    fwd = triton_scan.kernels(True)[0]
    monkeypatch.setattr(triton_scan, "kernels", lambda interpret: (fwd, BROKEN_KERNEL))
    kw = make_inputs(1, 2, 5, 1, "3d")
    out = selective_scan(**kw)
    with pytest.raises(RuntimeError, match="sm_50"):
        torch.autograd.grad(out.sum(), list(kw.values()))
