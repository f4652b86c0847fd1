"""The GPU scan backends (Triton under TRITON_INTERPRET=1, torch_parallel) against the sequential
reference, and the CUDA dispatch order: mamba_ssm, else triton, else torch_parallel, with the
once-per-process Triton fallback."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from scan_reference import (
    BROKEN_KERNEL,
    check_against_reference,
    check_half_precision,
    make_inputs,
    reference_scan,
    rel_err,
)
from torch.utils._python_dispatch import TorchDispatchMode

import cmdbnet.models.scan as scan_pkg
from cmdbnet.errors import CmdbError
from cmdbnet.models import scan
from cmdbnet.models.scan import dispatch, selective_scan
from cmdbnet.models.scan import triton as triton_scan
from cmdbnet.models.scan.parallel import linear_scan


@pytest.fixture(autouse=True)
def _fresh_backend_state(monkeypatch):
    monkeypatch.delenv(scan.BACKEND_ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(dispatch, "_TRITON_FAILURE", [])
    dispatch._mamba_ssm_import.cache_clear()
    dispatch._triton_import.cache_clear()
    yield
    dispatch._mamba_ssm_import.cache_clear()
    dispatch._triton_import.cache_clear()


def _use(monkeypatch, backend):
    monkeypatch.setenv(scan.BACKEND_ENV, backend)


FLAGS = list(itertools.product([False, True], repeat=4))  # D, z, delta_bias, delta_softplus
# (b, d, l, n): L = 1; L past one Triton block and not a multiple of it; exactly two blocks;
# d_state 1 and 16 (padded to itself), 3 and 5 (padded to 4 and 8)
SHAPES = [(2, 4, 1, 3), (2, 6, 37, 4), (1, 4, 64, 16), (2, 4, 45, 1), (1, 8, 33, 5)]
PARALLEL_CASES = [(form, *flags) for form in ("3d", "g1", "g2") for flags in FLAGS]


@pytest.mark.parametrize(("form", "has_D", "has_z", "has_bias", "softplus"), PARALLEL_CASES)
def test_torch_parallel_matches_reference(monkeypatch, form, has_D, has_z, has_bias, softplus):
    _use(monkeypatch, "torch_parallel")
    i = PARALLEL_CASES.index((form, has_D, has_z, has_bias, softplus))
    b, d, l, n = SHAPES[i % len(SHAPES)]
    kw = make_inputs(b, d, l, n, form, D=has_D, z=has_z, bias=has_bias, seed=i)
    check_against_reference(kw, softplus, ("out", "out+last", "last")[i % 3], i)


def test_strided_and_mixed_group_b_c(monkeypatch, backend="torch_parallel"):
    """B and C as the model passes them (slices of one projection, not contiguous), B ungrouped
    while C is in groups, and a channel block that the group size does not fill."""
    _use(monkeypatch, backend)
    kw = make_inputs(2, 6, 35, 2, "3d", D=True, z=True, bias=True, seed=7)
    g = torch.Generator().manual_seed(8)
    proj = torch.randn(2, 3, 9, 35, generator=g)
    kw["C"] = proj[:, :, 3:5].requires_grad_()  # (B, 3, N, L), strided; B stays (B, N, L)
    assert not kw["C"].is_contiguous()
    check_against_reference(kw, True, "out+last", 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_fp32(monkeypatch, dtype, backend="torch_parallel"):
    _use(monkeypatch, backend)
    check_half_precision(dtype)


def test_linear_scan_long_sequences_and_underflow(monkeypatch):
    """Many levels, both directions, a decay that underflows to 0: products only, no NaN/inf."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1000, generator=g, dtype=torch.float64)
    a[:, 500] = 0.0  # the history is cut here
    x = torch.randn(3, 1000, generator=g, dtype=torch.float64)
    fwd, bwd = torch.zeros_like(x), torch.zeros_like(x)
    h = torch.zeros(3, dtype=torch.float64)
    for t in range(1000):
        h = a[:, t] * h + x[:, t]
        fwd[:, t] = h
    h = torch.zeros(3, dtype=torch.float64)
    for t in reversed(range(1000)):
        h = a[:, t] * h + x[:, t]
        bwd[:, t] = h
    assert torch.allclose(linear_scan(a, x), fwd, rtol=1e-12, atol=1e-12)
    assert torch.allclose(linear_scan(a, x, reverse=True), bwd, rtol=1e-12, atol=1e-12)
    kw = make_inputs(1, 2, 300, 2, "3d", bias=True)
    with torch.no_grad():
        kw["delta"].mul_(1e3)  # exp(delta A) underflows to 0 in fp32 at most steps
    out = scan.selective_scan(**kw)  # chunked, as the reference for this check
    monkeypatch.setenv(scan.BACKEND_ENV, "torch_parallel")
    assert torch.isfinite(selective_scan(**kw)).all() and rel_err(selective_scan(**kw), out) <= 1e-5


# ----------------------------------------------------------------------------- dispatch


def _small():
    return make_inputs(2, 4, 9, 3, "g2", D=True, z=True, bias=True)


@pytest.fixture
def pretend_cuda(monkeypatch):
    monkeypatch.setattr(dispatch, "_device_is_cuda", lambda device: True)


@pytest.fixture
def no_mamba(monkeypatch):
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # makes the import fail


@pytest.fixture
def no_triton(monkeypatch):
    """Triton missing, as on a Windows or ROCm wheel of torch: its import fails."""
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "cmdbnet.models.scan.triton", raising=False)
    monkeypatch.delattr(scan_pkg, "triton", raising=False)


@pytest.fixture
def fake_mamba(monkeypatch):
    pkg, ops, iface = (types.ModuleType(m) for m in
                       ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface"))
    iface.selective_scan_fn = lambda *args, **kwargs: "from-mamba-ssm"
    pkg.ops, ops.selective_scan_interface = ops, iface
    for mod in (pkg, ops, iface):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)


def test_cuda_order_prefers_mamba_ssm(pretend_cuda, fake_mamba):
    assert scan.available_backends() == ("native", "torch", "torch_parallel", "triton", "mamba_ssm")
    assert scan.resolve_backend("cuda") == "mamba_ssm"
    assert selective_scan(**_small()) == "from-mamba-ssm"


def test_cuda_order_then_triton(pretend_cuda, no_mamba):
    assert scan.resolve_backend("cuda") == "triton"
    assert scan.available_backends() == ("native", "torch", "torch_parallel", "triton")
    assert scan.backend_status()["mamba_ssm"].startswith("ModuleNotFoundError")


def test_cuda_order_then_torch_parallel(pretend_cuda, no_mamba, no_triton):
    assert scan.resolve_backend("cuda") == "torch_parallel"
    assert scan.available_backends() == ("native", "torch", "torch_parallel")
    assert "triton" in scan.backend_status()["triton"]
    kw = _small()
    assert rel_err(selective_scan(**kw), reference_scan(**kw)) <= 1e-5


def test_cpu_tensors_keep_the_cpu_scan(fake_mamba, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert scan.resolve_backend("cpu") == "native"


def test_forced_triton_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv(scan.BACKEND_ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # too late: triton was imported without it
    with pytest.raises(CmdbError, match="TRITON_INTERPRET=1 before the process starts"):
        selective_scan(**_small())
    monkeypatch.setattr(triton_scan, "interpreter_ready", lambda: True)  # as in a process started with it
    assert scan.resolve_backend("cpu") == "triton"


def test_forced_triton_without_triton_says_why(monkeypatch, no_triton, pretend_cuda):
    monkeypatch.setenv(scan.BACKEND_ENV, "triton")
    with pytest.raises(CmdbError, match=r"triton cannot be imported \((ModuleNotFound|Import)Error"):
        selective_scan(**_small())


def test_bad_backend_name_lists_the_choices(monkeypatch):
    monkeypatch.setenv(scan.BACKEND_ENV, "cuda")
    with pytest.raises(CmdbError, match="auto, native, torch, torch_parallel, triton, mamba_ssm"):
        selective_scan(**_small())


def test_triton_failure_in_forward_falls_back_once(monkeypatch, pretend_cuda, no_mamba):
    monkeypatch.setattr(triton_scan, "kernels", lambda interpret: (BROKEN_KERNEL, BROKEN_KERNEL))
    kw = _small()
    with pytest.warns(RuntimeWarning, match="sm_50.*torch_parallel") as seen:
        out = selective_scan(**kw)
    assert len(seen) == 1 and rel_err(out, reference_scan(**kw)) <= 1e-5
    assert scan.resolve_backend("cuda") == "torch_parallel"
    assert "failed here" in scan.backend_status()["triton"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call neither tries Triton nor warns again
        assert rel_err(selective_scan(**kw), out) == 0


def test_forced_triton_failure_raises(monkeypatch, pretend_cuda):
    _use(monkeypatch, "triton")
    monkeypatch.setattr(triton_scan, "kernels", lambda interpret: (BROKEN_KERNEL, BROKEN_KERNEL))
    with pytest.raises(RuntimeError, match="sm_50"):
        selective_scan(**_small())
    assert not dispatch._TRITON_FAILURE


@pytest.mark.slow
def test_triton_kernels_under_the_interpreter():
    """The kernels' own checks (triton_interpreted.py) in a fresh process: Triton's language
    builtins are jitted when triton is imported, so TRITON_INTERPRET=1 must be set before that."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop(scan.BACKEND_ENV, None)
    here = Path(__file__).parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error::UserWarning",
                           str(here / "triton_interpreted.py")], env=env, capture_output=True, text=True,
                          cwd=here.parent.parent, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.search(r"\b1[0-9] passed", proc.stdout), proc.stdout[-2000:]


class _OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _ops_per_call(l: int) -> int:  # noqa: E741
    kw = make_inputs(1, 4, l, 1, "g2", D=True, bias=True)
    with _OpCount() as count:
        out = selective_scan(**kw, delta_softplus=True)
        torch.autograd.grad(out.sum(), list(kw.values()))
    return count.n


def test_torch_parallel_launches_hardly_grow_with_length(monkeypatch):
    """Forward + backward: three scans of three ops per doubling; nothing per time step."""
    monkeypatch.setenv(scan.BACKEND_ENV, "torch_parallel")
    short, long = _ops_per_call(64), _ops_per_call(4096)
    assert long - short == 3 * 3 * (12 - 6)
    assert short < 200
    monkeypatch.setenv(scan.BACKEND_ENV, "torch")
    assert _ops_per_call(512) > 512  # the chunked scan: an op per step
