"""Activations of one training step, traced without a GPU, for the peak-memory estimate.

Forward runs on ``FakeTensorMode`` tensors on a fake CUDA device (shapes, dtypes and storages,
no data) under CUDA's own autocast rules: CPU autocast keeps different ops in fp16, so it is
no stand-in. Two kernels a fake device cannot choose are swapped, through public seams, for
stand-ins with the same footprint: the torch selective scan (``scan.override_function``; its
time loop is slow on fake tensors) and attention (a GPU runs the memory-efficient kernel).
The loss runs on real CPU tensors of the outputs' shapes (fp32, autocast off, so CPU and CUDA
save the same). Every storage alive when forward and loss end counts once; ``budget`` turns
the traces into a peak (weights, gradients, AdamW state, transients, fragmentation) and
extrapolates them over batch and crop.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cmdbnet.data.registry import IGNORE_INDEX
from cmdbnet.losses import CMDBLoss
from cmdbnet.models import build_model, scan
from cmdbnet.settings import ModelSettings, Settings, TrainSettings

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- counting
def _storage(t: torch.Tensor) -> tuple[int, int, Any]:
    """(identity, bytes, weak reference) of the memory block behind ``t``; works on fake tensors too."""
    from torch.multiprocessing.reductions import StorageWeakRef

    s = t.untyped_storage()
    return s._cdata, s.nbytes(), StorageWeakRef(s)


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


class ActivationCounter:
    """Storages a training step keeps alive after forward, each counted once, with who holds them.

    ``track(model)`` installs saved-tensor hooks and, on every module, hooks that notice a
    gradient-checkpointed region (its saved-tensor hooks replace ours): the region's inputs are
    held by the checkpoint; what the region would save is recorded as the cost of recomputing
    it in backward, then dropped, as the checkpoint drops it.
    """

    def __init__(self, exclude: set[int] = frozenset()):
        self.exclude = set(exclude)
        self.held: dict[int, tuple[int, Any, str]] = {}
        self.regions: list[dict] = []
        self.scans: list[tuple] = []
        self._by_hook: dict[int, dict] = {}
        self._pushed: list[tuple[nn.Module, dict]] = []

    def add(self, t: torch.Tensor, why: str) -> None:
        key, nbytes, ref = _storage(t)
        seen = self.held.get(key)
        if key not in self.exclude and (seen is None or seen[1].expired()):  # (an address can be reused)
            self.held[key] = (nbytes, ref, why)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t, "saved")
        return t

    def _region_pre(self, module: nn.Module, args: tuple) -> None:
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if top is None or top[0] == self._pack or any(r["pack"] is top[0] for _, r in self._pushed):
            return
        region = self._by_hook.get(id(top[0]))
        if region is None:  # first module of a new checkpointed region: its inputs stay alive
            region = {"hook": top[0], "saved": {}, "scans": [], "inputs": set(), "keep": []}
            for t in _tensors(args):
                self.add(t, "checkpoint input")
                region["inputs"].add(_storage(t)[0])

            def pack(t: torch.Tensor, r: dict = region) -> None:
                key, nbytes, _ = _storage(t)
                if key not in self.exclude and key not in r["inputs"]:
                    r["saved"][key] = nbytes
                    r["keep"].append(t.untyped_storage())  # alive until counted, or its address is reused
            region["pack"] = pack
            self._by_hook[id(top[0])] = region
            self.regions.append(region)
        torch._C._autograd._push_saved_tensors_default_hooks(region["pack"], lambda _: None)
        self._pushed.append((module, region))

    def _region_post(self, module: nn.Module, args: tuple, out: Any) -> None:
        if self._pushed and self._pushed[-1][0] is module:
            self._pushed.pop()
            torch._C._autograd._pop_saved_tensors_default_hooks()

    def on_scan(self, footprint: tuple) -> None:
        self.scans.append(footprint)
        if self._pushed:
            self._pushed[-1][1]["scans"].append(footprint)

    @contextlib.contextmanager
    def track(self, model: nn.Module | None = None):
        handles = []
        for m in model.modules() if model is not None else ():
            handles.append(m.register_forward_pre_hook(self._region_pre))
            handles.append(m.register_forward_hook(self._region_post, always_call=True))
        _SCAN_LISTENERS.append(self)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            _SCAN_LISTENERS.remove(self)
            while self._pushed:
                self._pushed.pop()
                torch._C._autograd._pop_saved_tensors_default_hooks()
            for h in handles:
                h.remove()

    def walk(self, outputs: Any) -> None:
        """Hold the outputs and the tensors custom Functions keep on ``ctx`` outside save_for_backward."""
        seen, stack = set(), []
        for t in _tensors(outputs):
            self.add(t, "output")
            stack.append(t.grad_fn)
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if isinstance(node, torch.autograd.function.BackwardCFunction):
                for t in _tensors(list(vars(node).values())):
                    self.add(t, "ctx attribute")
            stack.extend(n for n, _ in node.next_functions)

    def sizes(self) -> list[int]:
        """Bytes of each storage still alive (a saved tensor whose graph was dropped is not)."""
        return [n for n, ref, _ in self.held.values() if not ref.expired()]

    def by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n, ref, why in self.held.values():
            if not ref.expired():
                out[why] = out.get(why, 0) + n
        return out


# ----------------------------------------------------------------------------- GPU stand-ins
_SCAN_LISTENERS: list[ActivationCounter] = []


# The scan backend a CUDA run would use, whose saved state the stand-in allocates.
_CUDA_SCAN: list[str] = ["torch"]


def cuda_scan_backend() -> str:
    """The backend CUDA tensors would get here (``CMDB_SCAN_BACKEND`` honoured where it can run)."""
    try:
        return scan.resolve_backend("cuda")
    except scan.ScanBackendError:  # asked for one that cannot run here: estimate the automatic choice
        saved = os.environ.pop(scan.BACKEND_ENV)
        try:
            return scan.resolve_backend("cuda")
        finally:
            os.environ[scan.BACKEND_ENV] = saved


class ScanFootprint(torch.autograd.Function):
    """A scan's memory without its time loop: the inputs it saves, its saved state and outputs."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):  # noqa: N803
        b, d, l = u.shape  # noqa: E741
        g, n = B.shape[1], A.shape[1]
        training = any(ctx.needs_input_grad)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        if training:
            for listener in _SCAN_LISTENERS[-1:]:
                listener.on_scan((b, d, l, n))
        if _CUDA_SCAN[-1] != "torch":  # the kernels: one block of saved state, a new last state
            ctx.state = u.new_empty(scan.saved_state_bytes(_CUDA_SCAN[-1], b, d, l, n) // 4 if training else 0)
            return u.new_empty((b, d, l)), u.new_empty((b, d, n))
        # the chunked scan, tensor for tensor: chunk-start states (the last state is made from
        # them) and, at small d_state, every state
        chunks = scan.state_bytes(b, d, l, n) // (b * d * n * 4)
        ctx.states = u.new_empty((chunks, b, g, n, d // g))
        ctx.full = (u.new_empty((l, b, g, n, d // g))
                    if n <= scan.KEEP_ALL_MAX_N and training else None)
        return u.new_empty((b, d, l)), ctx.states[-1].transpose(-1, -2).reshape(b, d, n)

    @staticmethod
    def backward(ctx, *grads):  # pragma: no cover - traced for memory, never differentiated
        raise RuntimeError("ScanFootprint only measures memory")


_MATH_SDPA = F.scaled_dot_product_attention


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as a GPU runs it: the memory-efficient kernel (saves q, k, v, out, log-sum-exp)."""
    if attn_mask is not None or enable_gqa:
        return _MATH_SDPA(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    if torch.is_autocast_enabled("cuda"):  # SDPA is on CUDA autocast's lower-precision list
        q, k, v = (t.to(torch.get_autocast_dtype("cuda")) for t in (q, k, v))
    with torch.autocast("cuda", enabled=False):
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, dropout_p, is_causal, scale=scale)[0]


@contextlib.contextmanager
def gpu_kernels():
    """Swap in the scan and attention stand-ins (and the torch scan backend) while tracing."""
    _CUDA_SCAN.append(cuda_scan_backend())
    saved = F.scaled_dot_product_attention, os.environ.get(scan.BACKEND_ENV)
    F.scaled_dot_product_attention = _fused_attention
    os.environ[scan.BACKEND_ENV] = "torch"
    try:  # cuDNN batch norm has no fake kernel (its decomposition is slow); native saves the same
        with torch.backends.cudnn.flags(enabled=False), scan.override_function(ScanFootprint):
            yield
    finally:
        F.scaled_dot_product_attention = saved[0]
        _CUDA_SCAN.pop()
        if saved[1] is None:
            os.environ.pop(scan.BACKEND_ENV, None)
        else:
            os.environ[scan.BACKEND_ENV] = saved[1]


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype):
    """``torch.autocast("cuda")`` minus its "is there a GPU" check, for fake CUDA tensors."""
    prev = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"), torch.is_autocast_cache_enabled())
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    torch.set_autocast_cache_enabled(True)
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", prev[0])
        torch.set_autocast_dtype("cuda", prev[1])
        torch.set_autocast_cache_enabled(prev[2])


def fake_cuda_copy(module: nn.Module, mode) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are fake CUDA tensors of ``mode`` (ties kept)."""
    out, memo = copy.deepcopy(module), {}
    with mode:
        for m in out.modules():
            for store, is_param in ((m._parameters, True), (m._buffers, False)):
                for name, t in list(store.items()):
                    if t is not None and id(t) not in memo:
                        e = torch.empty(t.shape, dtype=t.dtype, device="cuda")
                        memo[id(t)] = nn.Parameter(e, requires_grad=t.requires_grad) if is_param else e
                    if t is not None:
                        store[name] = memo[id(t)]
    return out


# ----------------------------------------------------------------------------- one traced step
@functools.lru_cache(maxsize=4)
def skeleton(model_json: str) -> nn.Module:
    """The network on the meta device, built once per model settings (no weights are loaded)."""
    ms = ModelSettings.model_validate_json(model_json)
    return build_model(ms.model_copy(update={"pretrained": "off", "backbone_weights": None})).to("meta")


@dataclass
class StepTrace:
    """Activation storages of one traced forward (or loss), split by how they scale."""

    batch: int
    crop: int
    linear: int                     # bytes alive at the end, less the scans' saved states
    scans: list[tuple]              # (b, d, l, n) of every scan call: its states are computed exactly
    largest: int                    # the largest single storage
    stages: list[tuple[int, list]]  # per checkpointed stage: (bytes it saves when recomputed, its scans)
    rounding: int                   # 512-byte allocator rounding over all storages
    by_reason: dict[str, int]
    scan_backend: str = "torch"     # whose saved state ``scans`` stand for (see cuda_scan_backend)

    def scan_state_bytes(self, b: int, d: int, l: int, n: int) -> int:  # noqa: E741
        return scan.saved_state_bytes(self.scan_backend, b, d, l, n)


def _summarise(counter: ActivationCounter, batch: int, crop: int) -> StepTrace:
    sizes = counter.sizes()
    backend = _CUDA_SCAN[-1]
    states = sum(scan.saved_state_bytes(backend, *s) for s in counter.scans)
    stages = [(sum(r["saved"].values()), r["scans"]) for r in counter.regions]
    return StepTrace(batch, crop, sum(sizes) - states, list(counter.scans), max(sizes, default=0), stages,
                     sum(-n % 512 for n in sizes), counter.by_reason(), backend)


def trace_forward(settings: Settings, batch: int, crop: int, amp: bool, amp_dtype: str = "fp16",
                  checkpointing: bool = False) -> tuple[StepTrace, tuple]:
    """Trace the network's training forward on a fake CUDA device; also return the outputs' signature."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ms = settings.model
    net = skeleton(ms.model_copy(update={"checkpointing": False}).model_dump_json())
    mode = FakeTensorMode()
    counter = ActivationCounter()
    with gpu_kernels():
        model = fake_cuda_copy(net, mode)
        with mode:
            model.set_checkpointing(checkpointing)
            model.train()
            counter.exclude = {_storage(p)[0] for p in [*model.parameters(), *model.buffers()]}
            x = torch.empty(batch, ms.in_channels, crop, crop, device="cuda")
            counter.add(x, "batch")
            with counter.track(model), cuda_autocast(_DTYPES[amp_dtype]) if amp else contextlib.nullcontext():
                out = model(x)
            counter.walk(out)
            trace = _summarise(counter, batch, crop)
    signature = tuple((k, i, tuple(t.shape[1:]), t.dtype) for k, v in out.items()
                      for i, t in enumerate(v if isinstance(v, list) else [v]) if t is not None)
    return trace, signature


@functools.lru_cache(maxsize=32)
def _loss_trace(loss_json: str, num_classes: int, signature: tuple, crop: int, batch: int) -> StepTrace:
    t = TrainSettings.model_validate_json(loss_json)
    out: dict[str, Any] = {"seg": None, "aux": [], "boundary": None}
    for key, _, shape, dtype in signature:
        x = torch.zeros((batch, *shape), dtype=dtype, requires_grad=True)
        out[key] = [*out[key], x] if key == "aux" else x
    labels = torch.randint(0, num_classes, (batch, crop, crop), generator=torch.Generator().manual_seed(0))
    loss_fn = CMDBLoss.from_settings(t, num_classes, IGNORE_INDEX)
    counter = ActivationCounter(exclude={_storage(x)[0] for x in _tensors(out)})  # counted as outputs
    counter.add(labels, "batch")
    with counter.track():
        losses = loss_fn(out, labels)
    counter.walk([losses["total"]])
    return _summarise(counter, batch, crop)


def trace_loss(settings: Settings, signature: tuple, crop: int, batch: int = 1) -> StepTrace:
    """The loss's activations and the labels, on real CPU tensors shaped like the outputs at ``crop``.

    The loss is fp32 with autocast off, so CPU and CUDA save the same; everything it keeps has
    the batch and the label pixels as factors, so one small trace scales to any recipe.
    """
    return _loss_trace(settings.train.model_dump_json(), settings.model.num_classes, signature, crop, batch)
