"""Activation tracing on a fake CUDA device: what is counted is what stays alive."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from cmdbnet.models import build_model, scan
from cmdbnet.models.scan import selective_scan
from cmdbnet.profiling.tracing import (
    ActivationCounter,
    cuda_autocast,
    cuda_scan_backend,
    fake_cuda_copy,
    gpu_kernels,
)
from cmdbnet.settings import load_settings
from memory_recipes import TINY_MODEL, GiB, MiB, tiny  # noqa: F401 - tests/memory_recipes.py


def _param_keys(model: nn.Module) -> set[int]:
    return {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}


def _conv_bn_relu() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())


# Saved for backward, by hand, for a (2, 3, 16, 16) fp32 input: conv1 its input (6144 B); each BN its
# input (16384 B) and batch mean and inverse std (32 B each); each ReLU its result (16384 B, the
# second conv's input is the first ReLU's result). Weights and running stats are parameters/buffers.
BY_HAND = 2 * 3 * 16 * 16 * 4 + 4 * 2 * 8 * 16 * 16 * 4 + 4 * 8 * 4


def _saved_by_graph_walk(outputs, exclude: set[int]) -> int:
    """Independent count: walk grad_fn and read every ``_saved_*`` attribute and custom ``saved_tensors``."""
    seen, stack, storages = set(), [t.grad_fn for t in outputs], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        values = [getattr(node, a) for a in dir(node) if a.startswith("_saved_")]
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            values += list(node.saved_tensors)
        for v in values:
            for t in v if isinstance(v, (list, tuple)) else [v]:
                if isinstance(t, torch.Tensor) and not (t.dim() == 0 and t.dtype == torch.float64):
                    s = t.untyped_storage()  # (0-dim float64: a Python number autograd wrapped; it stays on CPU)
                    if s._cdata not in exclude:
                        storages[s.data_ptr() or s._cdata] = s.nbytes()
        stack.extend(n for n, _ in node.next_functions)
    return sum(storages.values())


def test_activations_of_a_conv_bn_relu_stack_match_hand_count_and_graph_walk():
    torch.manual_seed(0)
    net = _conv_bn_relu().train()
    counter = ActivationCounter(_param_keys(net))
    with counter.track(net):
        y = net(torch.randn(2, 3, 16, 16))
    counter.walk(y)
    assert sum(counter.sizes()) == BY_HAND == 71808
    assert _saved_by_graph_walk([y], _param_keys(net)) == BY_HAND

    mode = FakeTensorMode()  # the same network traced on a fake CUDA device saves the same
    fake = fake_cuda_copy(_conv_bn_relu(), mode)
    with gpu_kernels(), mode:
        counter = ActivationCounter(_param_keys(fake))
        with counter.track(fake):
            y = fake(torch.empty(2, 3, 16, 16, device="cuda"))
        counter.walk(y)
        assert y.device.type == "cuda"
        assert sum(counter.sizes()) == BY_HAND


def test_cuda_autocast_rules_differ_from_cpu_autocast():
    """Why the estimate traces fake CUDA: CPU fp16 autocast keeps LayerNorm in fp16, CUDA's runs it in fp32."""
    x = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.float16):
        assert F.layer_norm(x.half(), (16,)).dtype == torch.float16
    with FakeTensorMode(), cuda_autocast(torch.float16):
        xc = torch.empty(2, 8, 16, device="cuda")
        assert F.layer_norm(xc.half(), (16,)).dtype == torch.float32
        assert F.linear(xc, torch.empty(4, 16, device="cuda")).dtype == torch.float16


def _scan_census(b, d, l, n, g, dtype):  # noqa: E741
    torch.manual_seed(0)
    u, delta, z = (torch.randn(b, d, l, dtype=dtype, requires_grad=True) for _ in range(3))
    A = -torch.rand(d, n, requires_grad=True)  # noqa: N806
    B, C = (torch.randn(b, g, n, l, dtype=dtype, requires_grad=True) for _ in range(2))  # noqa: N806
    D, bias = torch.rand(d, requires_grad=True), torch.rand(d, requires_grad=True)  # noqa: N806
    counter = ActivationCounter({t.untyped_storage()._cdata for t in (u, delta, z, A, B, C, D, bias)})
    with counter.track():
        out = selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, return_last_state=True)
    counter.walk(out)
    return counter.by_reason()


@pytest.mark.parametrize("b,d,l,n,g,dtype", [(2, 8, 50, 4, 4, torch.float32), (1, 16, 300, 1, 4, torch.float32),
                                             (3, 8, 40, 2, 1, torch.float16)])
def test_scan_stand_in_keeps_what_the_real_scan_keeps(monkeypatch, b, d, l, n, g, dtype):  # noqa: E741
    monkeypatch.setenv(scan.BACKEND_ENV, "torch")  # the CUDA route modelled is the scan that runs here
    real = _scan_census(b, d, l, n, g, dtype)
    assert cuda_scan_backend() == "torch"
    with gpu_kernels():
        stand_in = _scan_census(b, d, l, n, g, dtype)
    assert stand_in == real
    # the chunk states live on ctx (or, when the last state is a view of them, as an output);
    # at d_state <= 2 every state is kept too (b * l * d * n fp32)
    kept = b * d * l * n * 4 if n <= scan.KEEP_ALL_MAX_N else 0
    assert scan.state_bytes(b, d, l, n) + kept in (real.get("ctx attribute"),
                                                   real["output"] - b * d * l * dtype.itemsize + kept)


@pytest.mark.parametrize("backend, per_call", [("triton", lambda b, d, l, n: b * d * n * -(-l // 32) * 4),
                                               ("torch_parallel", lambda b, d, l, n: 0)])
def test_estimate_models_the_scan_a_cuda_run_would_use(monkeypatch, backend, per_call):
    monkeypatch.setenv(scan.BACKEND_ENV, backend)
    b, d, l, n = 2, 8, 100, 1  # noqa: E741
    assert cuda_scan_backend() == backend
    with gpu_kernels():
        stand_in = _scan_census(b, d, l, n, 1, torch.float32)
    assert stand_in.get("ctx attribute", 0) == per_call(b, d, l, n) == scan.saved_state_bytes(backend, b, d, l, n)


def test_an_unavailable_forced_backend_estimates_the_automatic_choice(monkeypatch):
    monkeypatch.setenv(scan.BACKEND_ENV, "mamba_ssm")  # not importable here
    assert cuda_scan_backend() in ("triton", "torch_parallel")
    assert os.environ[scan.BACKEND_ENV] == "mamba_ssm"


class _Census(TorchDispatchMode):
    """Third method: every storage any op creates, alive or not at the end (no autograd involved)."""

    def __init__(self):
        super().__init__()
        self.made = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                self.made.setdefault(s._cdata, (StorageWeakRef(s), s.nbytes()))
        return out


@pytest.mark.parametrize(("checkpointing", "backend"), [(False, "torch"), (True, "torch"), (False, "native")])
def test_counted_activations_are_all_that_stays_alive(monkeypatch, checkpointing, backend):
    """On the real network (real scan, real checkpointing) the counter finds every storage alive after forward."""
    monkeypatch.setenv(scan.BACKEND_ENV, backend)
    torch.manual_seed(0)
    net = build_model(load_settings(None, {"model": TINY_MODEL}).model).train()
    net.set_checkpointing(checkpointing)
    x = torch.randn(2, 3, 32, 32)
    census = _Census()
    with census:
        out = net(x)
    params = _param_keys(net)
    alive = sum(n for k, (ref, n) in census.made.items() if not ref.expired() and k not in params)
    del out

    counter = ActivationCounter(params)
    counter.add(x, "batch")
    with counter.track(net):
        out = net(x)
    counter.walk(out)
    reasons = counter.by_reason()
    assert sum(counter.sizes()) == alive + x.untyped_storage().nbytes()
    # the torch scan's chunk states: invisible to saved-tensor hooks; the C scan keeps none
    assert reasons.get("ctx attribute", 0) > 0 if backend == "torch" else "ctx attribute" not in reasons
    if checkpointing:
        assert len(counter.regions) == 8  # four stages per branch; each keeps its input, saves nothing else
        assert all(k in counter.held for r in counter.regions for k in r["inputs"])
        assert all(sum(r["saved"].values()) > 0 for r in counter.regions)  # what recomputing it costs
    else:  # what the hooks saw being saved is what the grad_fn graph says it saved
        hooks_only = ActivationCounter(params)
        with hooks_only.track(net):
            out = net(x)
        outputs = list(out["aux"]) + [out["seg"], out["boundary"]]
        assert _saved_by_graph_walk(outputs, params) == sum(hooks_only.sizes()) == hooks_only.by_reason()["saved"]
