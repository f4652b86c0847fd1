"""Selective scan: the CPU backends (C and chunked torch) against a plain sequential reference,
and backend dispatch."""

from __future__ import annotations

import importlib.abc
import itertools
import sys
import threading
import types

import pytest
import torch
import torch.nn.functional as F
from scan_reference import make_inputs, reference_scan, rel_err

from cmdbnet.models import scan
from cmdbnet.models.scan import buffers, chunked, dispatch, selective_scan


@pytest.fixture(autouse=True)
def _fresh_backend_state(monkeypatch):
    monkeypatch.delenv(scan.BACKEND_ENV, raising=False)
    monkeypatch.setattr(dispatch, "_TRITON_FAILURE", [])
    dispatch._mamba_ssm_import.cache_clear()
    yield
    dispatch._mamba_ssm_import.cache_clear()


SHAPES = [(2, 4, 1, 3), (2, 6, 37, 4), (1, 8, 64, 2), (3, 4, 19, 5), (2, 8, 300, 1)]  # last: kept states, 2 chunks
FLAGS = list(itertools.product([False, True], repeat=4))  # D, z, delta_bias, delta_softplus
CASES = [(form, *flags) for form in ("3d", "g1", "g2") for flags in FLAGS]


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize(("form", "has_D", "has_z", "has_bias", "softplus"), CASES)
def test_matches_reference(monkeypatch, backend, form, has_D, has_z, has_bias, softplus):
    monkeypatch.setenv(scan.BACKEND_ENV, backend)
    i = CASES.index((form, has_D, has_z, has_bias, softplus))
    b, d, l, n = SHAPES[i % len(SHAPES)]
    if i % 2:  # several blocks of chunks, the last ones short, so every carry is exercised
        monkeypatch.setattr(chunked, "_CHUNK_ELEMS", (5 if i % 4 == 1 else 3) * b * d * n)
        monkeypatch.setattr(chunked, "_BLOCK_ELEMS", (10 if i % 4 == 1 else 1) * b * d)
    mode = ("out", "out+last", "last")[i % 3]
    kw = make_inputs(b, d, l, n, form, D=has_D, z=has_z, bias=has_bias, seed=i)
    inputs = list(kw.values())
    before = [t.detach().clone() for t in inputs]
    opts = {"delta_softplus": softplus, "return_last_state": mode != "out"}

    ours = selective_scan(**kw, **opts)
    ref = reference_scan(**kw, **opts)
    ours, ref = (ours, ref) if mode != "out" else ((ours,), (ref,))
    assert ours[0].dtype == torch.float32 and ours[0].shape == (b, d, l)
    g = torch.Generator().manual_seed(100 + i)
    weights = [torch.randn(o.shape, generator=g) for o in ours]
    if mode == "last":
        weights[0] = torch.zeros_like(weights[0])  # gradient reaches the inputs only via last_state
    for o, r in zip(ours, ref):
        assert rel_err(o, r) <= 1e-5
    g_ours = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ours, weights)), inputs)
    g_ref = torch.autograd.grad(sum((r * w.double()).sum() for r, w in zip(ref, weights)), inputs)
    for name, a, r in zip(kw, g_ours, g_ref):
        assert a.dtype == kw[name].dtype and a.shape == kw[name].shape, name
        assert rel_err(a, r) <= 1e-5, name
    for t, t0 in zip(inputs, before):
        assert torch.equal(t.detach(), t0), "the scan must not write into its inputs"


@pytest.mark.parametrize("k", [1, 2, 15, 16, 17, 24, 63, 64, 65, 300])
def test_two_level_scans_match_the_sequential_recurrence(k):
    g = torch.Generator().manual_seed(k)
    a = torch.rand(k, 3, 2, dtype=torch.float64, generator=g)
    a[k // 2] = 0.0  # a decay that underflowed: the products must stay finite
    x, h0 = torch.randn(k, 3, 2, dtype=torch.float64, generator=g), torch.randn(3, 2, dtype=torch.float64, generator=g)
    fwd, rev = x.clone(), x.clone()
    chunked._scan_forward(fwd, a, h0, torch.empty_like(x))
    chunked._scan_reverse(rev, a, torch.empty_like(x))
    want_f, want_r, h = x.clone(), x.clone(), h0
    for t in range(k):
        want_f[t] += a[t] * h
        h = want_f[t]
    for t in range(k - 2, -1, -1):
        want_r[t] += a[t + 1] * want_r[t + 1]
    assert chunked._sub_length(k, 6) < k or k < 16  # two levels, as at the network's d_state 1
    assert torch.allclose(fwd, want_f, rtol=1e-12, atol=1e-12)
    assert torch.allclose(rev, want_r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 3])
def test_backward_products_match_matmul(n):
    g = torch.Generator().manual_seed(n)
    x, v, b = (torch.randn(*shape, generator=g) for shape in ((5, 2, 4, n, 8), (5, 2, 4, 1, 8), (5, 2, 4, n, 1)))
    dot, outer = torch.empty(5, 2, 4, n, 1), torch.empty(5, 2, 4, 1, 8)
    chunked._dot(x, v, dot, torch.empty_like(x))
    chunked._outer(b, x, outer)
    assert torch.allclose(dot, x @ v.mT, atol=1e-6) and torch.allclose(outer, b.mT @ x, atol=1e-6)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_long_chunks_at_small_d_state_match_reference(monkeypatch, backend):
    monkeypatch.setenv(scan.BACKEND_ENV, backend)
    kw = make_inputs(2, 8, 1500, 1, "g2", D=True, bias=True)  # one 1024-step chunk in two levels, one shorter
    assert chunked.chunk_plan(2, 8, 1500, 1)[0] == 1024
    ours = selective_scan(**kw, delta_softplus=True)
    ref = reference_scan(**kw, delta_softplus=True)
    assert rel_err(ours, ref) <= 1e-5
    gout = torch.randn(ours.shape, generator=torch.Generator().manual_seed(3))
    for name, a, r in zip(kw, torch.autograd.grad(ours, list(kw.values()), gout),
                          torch.autograd.grad(ref, list(kw.values()), gout.double())):
        assert rel_err(a, r) <= 1e-5, name


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_last_state_only_gradient_and_mixed_groups(monkeypatch, backend):
    monkeypatch.setenv(scan.BACKEND_ENV, backend)
    kw = make_inputs(2, 6, 11, 3, "3d", D=True, z=True, bias=True)
    kw["C"] = torch.randn(2, 3, 3, 11).requires_grad_()  # B ungrouped, C in 3 groups
    ours = selective_scan(**kw, delta_softplus=True, return_last_state=True)[1]
    ref = reference_scan(**kw, delta_softplus=True, return_last_state=True)[1]
    assert ours.shape == (2, 6, 3) and rel_err(ours, ref) <= 1e-5
    for name, a, r in zip(kw, torch.autograd.grad(ours.sum(), list(kw.values()), allow_unused=True),
                          torch.autograd.grad(ref.sum(), list(kw.values()), allow_unused=True)):
        if r is None:  # C and z do not reach the last state
            assert a is None or a.abs().max() == 0, name
        else:
            assert rel_err(a, r) <= 1e-5, name


@pytest.mark.parametrize("backend", ["native", "torch", "torch_parallel"])
@pytest.mark.parametrize("mix", ["both", "B only", "C only"])
def test_time_invariant_b_and_c_as_selective_scan_fn_takes_them(monkeypatch, backend, mix):
    """B and/or C of shape (D, N), as mamba-ssm's selective_scan_fn accepts them (Triton: triton_interpreted.py)."""
    monkeypatch.setenv(scan.BACKEND_ENV, backend)
    from scan_reference import check_against_reference

    kw = make_inputs(2, 6, 21, 3, "dn", D=True, z=True, bias=True, seed=3)
    if mix != "both":
        kw["C" if mix == "B only" else "B"] = make_inputs(2, 6, 21, 3, "g2", seed=4)["B"]
    check_against_reference(kw, True, "out+last", 3)


def test_complex_b_is_refused_clearly():
    kw = make_inputs(1, 4, 5, 2, "dn")
    kw["B"] = kw["B"].detach().to(torch.complex64)
    with pytest.raises(ValueError, match="B must be real"):
        selective_scan(**kw)


def test_gradcheck_fp64(monkeypatch):
    monkeypatch.setattr(chunked, "_CHUNK_ELEMS", 3 * 2 * 4 * 2)
    kw = make_inputs(1, 4, 7, 2, "g2", D=True, z=True, bias=True, dtype=torch.float64)

    def fn(*args):
        return selective_scan(*args[:5], D=args[5], z=args[6], delta_bias=args[7],
                              delta_softplus=True, return_last_state=True)

    assert torch.autograd.gradcheck(fn, tuple(kw.values()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_fp32(dtype):
    kw = make_inputs(2, 8, 33, 4, "g2", D=True, z=True, bias=True, dtype=dtype)
    out, last = selective_scan(**kw, delta_softplus=True, return_last_state=True)
    assert out.dtype == dtype and last.dtype == torch.float32
    wide = {k: v.detach().float().requires_grad_() for k, v in kw.items()}
    ref = selective_scan(**wide, delta_softplus=True)
    assert rel_err(out, ref) <= (2e-3 if dtype == torch.float16 else 1e-2)
    grads = torch.autograd.grad(out.float().sum(), list(kw.values()))
    assert all(gr.dtype == dtype for gr in grads)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_modes_and_threads_of_the_caller_are_respected(monkeypatch, backend):
    monkeypatch.setenv(scan.BACKEND_ENV, backend)
    kw = make_inputs(4, 8, 21, 3, "g2", D=True, z=True, bias=True)
    ref = reference_scan(**kw, delta_softplus=True)
    threads = torch.get_num_threads()
    with torch.inference_mode():  # outputs are inference tensors, written from worker threads
        assert rel_err(selective_scan(**kw, delta_softplus=True), ref) <= 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the scan itself must stay in fp32
        out = selective_scan(**kw, delta_softplus=True)
    assert out.dtype == torch.float32 and rel_err(out, ref) <= 1e-5
    grads = torch.autograd.grad(selective_scan(**kw, delta_softplus=True).sum(), list(kw.values()))
    try:  # the batch split over worker threads must not change the numbers
        torch.set_num_threads(1)
        serial = torch.autograd.grad(selective_scan(**kw, delta_softplus=True).sum(), list(kw.values()))
    finally:
        torch.set_num_threads(threads)
    assert all(rel_err(a, s) <= 1e-6 for a, s in zip(grads, serial))
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert torch.get_num_threads() == threads and seen == [threads], "the worker pool leaked its setting"


def test_fast_softplus_is_accurate():
    x = torch.linspace(-60, 60, 100_001, dtype=torch.float64)  # where log1p(e) is all of it, too
    exact = x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))
    assert ((buffers.softplus(buffers.Scratch(x), x) - exact).abs() / exact).max() <= 1e-13
    x32 = x.float()
    exact = F.softplus(x32.double())
    assert ((buffers.softplus(buffers.Scratch(x32), x32) - exact).abs() / exact).max() <= 4e-7  # ~2 ulp


def test_scan_macs_convention():
    assert scan.scan_macs(1, 1, 1, 16, has_z=False, has_D=False) == 65
    assert scan.scan_macs(2, 3, 5, 4, has_z=True, has_D=True) == 2 * 3 * 5 * (16 + 3)


# ----------------------------------------------------------------------------- dispatch


def _small():
    return make_inputs(2, 4, 9, 3, "g2", D=True, z=True, bias=True)


@pytest.fixture
def fake_mamba(monkeypatch):
    """A stand-in mamba_ssm whose selective_scan_fn records how it was called."""
    calls = []

    def selective_scan_fn(*args, **kwargs):
        calls.append((args, kwargs))
        return "from-mamba-ssm"

    pkg, ops, iface = (types.ModuleType(m) for m in
                       ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface"))
    iface.selective_scan_fn = selective_scan_fn
    pkg.ops, ops.selective_scan_interface = ops, iface
    for mod in (pkg, ops, iface):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return calls


def _pretend_cuda(monkeypatch):
    monkeypatch.setattr(dispatch, "_device_is_cuda", lambda device: True)


def test_auto_routes_cuda_tensors_to_mamba_ssm(monkeypatch, fake_mamba):
    _pretend_cuda(monkeypatch)
    kw = _small()
    assert "mamba_ssm" in scan.available_backends()
    assert selective_scan(**kw, delta_softplus=True, return_last_state=True) == "from-mamba-ssm"
    (args, kwargs), = fake_mamba
    assert len(args) == 5 and all(a is kw[k] for a, k in zip(args, ("u", "delta", "A", "B", "C")))
    assert set(kwargs) == {"D", "z", "delta_bias", "delta_softplus", "return_last_state"}
    assert kwargs["D"] is kw["D"] and kwargs["z"] is kw["z"] and kwargs["delta_bias"] is kw["delta_bias"]
    assert kwargs["delta_softplus"] is True and kwargs["return_last_state"] is True


def test_auto_sends_cpu_tensors_to_the_c_scan(fake_mamba):
    kw = _small()
    assert scan.resolve_backend("cpu") == "native"
    assert rel_err(selective_scan(**kw), reference_scan(**kw)) <= 1e-5 and not fake_mamba


def test_env_torch_forces_ours(monkeypatch, fake_mamba):
    _pretend_cuda(monkeypatch)
    monkeypatch.setenv(scan.BACKEND_ENV, "torch")
    kw = _small()
    assert rel_err(selective_scan(**kw), reference_scan(**kw)) <= 1e-5 and not fake_mamba


def test_env_mamba_ssm_forces_fused(monkeypatch, fake_mamba):
    monkeypatch.setenv(scan.BACKEND_ENV, "mamba_ssm")
    with pytest.raises(RuntimeError, match="CUDA"):  # a CPU tensor cannot go to the kernel
        selective_scan(**_small())
    _pretend_cuda(monkeypatch)
    assert selective_scan(**_small()) == "from-mamba-ssm" and len(fake_mamba) == 1


def test_env_mamba_ssm_without_it_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # makes the import fail
    monkeypatch.setenv(scan.BACKEND_ENV, "mamba_ssm")
    with pytest.raises(RuntimeError, match=r"pip install cmdbnet\[cuda\]"):
        selective_scan(**_small())
    assert "mamba_ssm" not in scan.available_backends()


@pytest.mark.parametrize("value", ["cuda", "mamba-ssm!", "parallel"])
def test_env_unknown_value(monkeypatch, value):
    monkeypatch.setenv(scan.BACKEND_ENV, value)
    with pytest.raises(ValueError, match=scan.BACKEND_ENV):
        selective_scan(**_small())


def test_import_raising_oserror_falls_back_under_auto(monkeypatch):
    class BrokenExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "mamba_ssm":
                raise OSError("libcudart.so.12: cannot open shared object file")
            return None

    for name in [m for m in sys.modules if m.split(".")[0] == "mamba_ssm"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [BrokenExtension(), *sys.meta_path])
    _pretend_cuda(monkeypatch)
    monkeypatch.setattr(dispatch, "_triton_import", lambda: (None, "stand-in: no triton"))
    kw = _small()
    assert scan.resolve_backend("cuda") == "torch_parallel"
    assert rel_err(selective_scan(**kw), reference_scan(**kw)) <= 1e-5
    monkeypatch.setenv(scan.BACKEND_ENV, "mamba_ssm")
    with pytest.raises(RuntimeError, match="OSError"):
        selective_scan(**kw)
