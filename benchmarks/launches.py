"""Kernel launches of one training step on the route a CUDA tensor takes, counted on CPU.

On a GPU every aten op is (at least) one kernel launch of roughly 5-10 us, so a step that
dispatches tens of thousands of ops spends a large share of its time launching. This counts
the aten ops one training step dispatches (``TorchDispatchMode``; batch 4, crop 256, the
trainer's own ``run_step_group``: forward, losses, backward, gradient clipping, foreach AdamW,
one thread) of the default network, per part, for each scan route:

  * ``torch``: today's chunked scan, what CPU tensors run (one op per time step);
  * ``torch_parallel``: the log-depth torch scan (CUDA without Triton);
  * ``triton``: our Triton kernels; each kernel launch counts one op (the kernels are
    replaced by stand-ins that count their launches and write zeros, since they cannot run
    on CPU at this size).

Ops are attributed to the part that owns the autograd node running them (backward) or the
module running them (forward); the scan is counted apart from the rest of the Mamba branch.
Targets: at most 8,000 ops per step on the CUDA routes, the scan at most 35% of them.

It also counts the host syncs of an optimizer step (``--syncs``): the aten ops that read a
value back to the host on CUDA (``_local_scalar_dense``, ``nonzero``, ``masked_select``,
boolean indexing) and Python-level reads (``item``, ``tolist``, ``bool``/``float`` of a
tensor), over ``run_step_group`` and the loss read the trainer does after it, at accumulation
1 and 4. Target: at most 2 per optimizer step whatever the accumulation.

    python benchmarks/launches.py            # batch 4, crop 256 (about a minute on 2 cores)
    python benchmarks/launches.py --smoke    # batch 1, crop 64: seconds
    python benchmarks/launches.py --syncs    # host syncs per optimizer step, accum 1 and 4
"""

from __future__ import annotations

import argparse
import os
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cmdbnet.losses import CMDBLoss
from cmdbnet.models import build_model, scan
from cmdbnet.models.scan import triton as triton_scan
from cmdbnet.models.vss import SelectiveScan
from cmdbnet.runtime import Precision
from cmdbnet.settings import Settings
from cmdbnet.training.optim import build_optimizer
from cmdbnet.training.step import run_step_group

PARTS = ("cnn", "mamba", "scan", "fusion", "boundary", "heads", "net", "loss", "optimizer")
LABELS = {"cnn": "CNN branch", "mamba": "Mamba branch (less the scan)", "scan": "  scan",
          "fusion": "fusion", "boundary": "boundary", "heads": "heads", "net": "network glue (pad, crop)",
          "loss": "losses", "optimizer": "clip + AdamW + zero_grad"}
TOTAL_TARGET, SCAN_SHARE_TARGET = 8000, 0.35
# Ops that only make a view or allocate: dispatched, but no kernel runs on a GPU.
NO_KERNEL = {"view", "_unsafe_view", "select", "slice", "t", "transpose", "expand", "permute", "detach", "alias",
             "unsqueeze", "squeeze", "as_strided", "lift_fresh", "empty", "new_empty", "empty_like", "empty_strided",
             "split", "split_with_sizes", "unbind", "_reshape_alias", "unfold", "diagonal", "narrow"}


class OpCounter(TorchDispatchMode):
    """Counts aten ops by part: forward by the running module, backward by the autograd node."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.kernels: Counter = Counter()  # the ops that launch a kernel on a GPU
        self.part = "optimizer"  # outside forward and loss: clip, step, zero_grad
        self.tags: dict = {}     # autograd node -> part
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            node = torch._C._current_autograd_node()
            part = self.part if node is None else self.tags.get(node, "loss")
            self.counts[part] += 1
            name = func.overloadpacket.__name__
            # AdamW reads its per-parameter step counters with .item(): they stay on the CPU for
            # CUDA parameters too (unless capturable/fused), so those reads launch nothing
            self.kernels[part] += name not in NO_KERNEL and not (part == "optimizer" and name == "_local_scalar_dense")
        return func(*args, **(kwargs or {}))

    def tag(self, outputs, part: str, stop=frozenset()) -> None:
        """Give ``part`` every not yet tagged autograd node that produced ``outputs`` from the
        nodes in ``stop`` (those of the part's inputs)."""
        todo, seen = [t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None], set()
        while todo:
            node = todo.pop()
            if node is None or node in seen or node in stop:
                continue
            seen.add(node)
            self.tags.setdefault(node, part)  # a nested part (the scan) tagged its own nodes first
            todo.extend(n for n, _ in node.next_functions)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


def _attribute(model, counter: OpCounter) -> None:
    """Forward hooks that set the running part and tag its autograd nodes as it returns."""
    def enter(part):
        def hook(module, args):
            module._prev_part, counter.part = counter.part, part
            module._stop = {t.grad_fn for t in _tensors(args) if t.grad_fn is not None}
        return hook

    def leave(part):
        def hook(module, args, out):
            counter.tag(out, part, module._stop)
            counter.part = module._prev_part
        return hook

    mods = [("net", model)] + [(p, getattr(model, p)) for p in ("cnn", "mamba", "fusion", "boundary", "heads")]
    mods += [("scan", m) for m in model.modules() if isinstance(m, SelectiveScan)]
    for part, m in mods:
        if m is not None:
            m.register_forward_pre_hook(enter(part))
            m.register_forward_hook(leave(part))


class _CountedLaunch:
    """Stands in for a Triton kernel: one op per launch, outputs zeroed (not counted)."""

    OUTPUTS = {0: range(8, 11), 1: range(11, 19)}  # positions of the output tensors in _fwd / _bwd

    def __init__(self, counter: OpCounter, which: int):
        self.counter, self.which = counter, which

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            c = self.counter
            node = torch._C._current_autograd_node()
            part = c.part if node is None else c.tags.get(node, "loss")
            c.counts[part] += 1
            c.kernels[part] += 1
            c.paused = True
            for i in self.OUTPUTS[self.which]:
                if args[i] is not args[0]:  # u stands in for an absent gradient (dz without z)
                    args[i].zero_()
            c.paused = False
        return launch


def _training_parts(batch: int, crop: int, accum: int):
    """The default network, its loss, AdamW, the train settings and ``accum`` random micro-batches."""
    torch.manual_seed(0)
    s = Settings()
    model = build_model(s.model.model_copy(update={"pretrained": "off", "backbone_weights": None})).train()
    t = s.train
    loss_fn = CMDBLoss(s.model.num_classes, 255, t.aux_weight, t.boundary_weight, t.boundary_width,
                       t.dice_weight, t.class_weights)
    batches = [{"image": torch.randn(batch, s.model.in_channels, crop, crop),
                "label": torch.randint(0, s.model.num_classes, (batch, crop, crop))} for _ in range(accum)]
    return model, loss_fn, build_optimizer(model, t), t, batches


def count_step(route: str, batch: int, crop: int) -> tuple[Counter, Counter]:
    """Aten ops and kernel-launching ops of one training step (forward, losses, backward, clip,
    AdamW) per part: the second step, as every later one (the first also creates AdamW's state)."""
    model, loss_fn, opt, t, batches = _training_parts(batch, crop, 1)
    for group in opt.param_groups:
        group["foreach"] = True  # what AdamW picks for CUDA parameters
    counter = OpCounter()
    _attribute(model, counter)

    def counted_loss(out, label):
        counter.part = "loss"
        losses = loss_fn(out, label)
        counter.tag(losses["total"], "loss")
        counter.part = "optimizer"
        return losses

    os.environ[scan.BACKEND_ENV] = route
    saved = triton_scan.kernels, triton_scan.interpreter_ready
    triton_scan.kernels = lambda interpret: (_CountedLaunch(counter, 0), _CountedLaunch(counter, 1))
    triton_scan.interpreter_ready = lambda: True  # lets CPU tensors through the dispatch to the stand-ins
    def step():
        return run_step_group(model, counted_loss, batches, [1.0], opt, None, Precision(False, torch.float32),
                              torch.device("cpu"), t.grad_clip)[1]

    try:
        step()
        counter.tags.clear()
        with counter:
            took = step()
    finally:
        triton_scan.kernels, triton_scan.interpreter_ready = saved
        os.environ.pop(scan.BACKEND_ENV, None)
    assert took, "the step was not taken: a non-finite loss would skip AdamW and undercount"
    return counter.counts, counter.kernels


SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero"}
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")
SYNC_TARGET = 2


class SyncCounter(TorchDispatchMode):
    """Host syncs a CUDA run would make, counted on CPU tensors (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.n, self.paused = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1])
        if not self.paused and (name in SYNC_OPS or bool_index):
            self.n += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in READS}
        for name, real in self.saved.items():
            def counted(t, *a, _real=real, **k):
                self.n += not self.paused
                self.paused += 1
                try:
                    return _real(t, *a, **k)
                finally:
                    self.paused -= 1
            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, real in self.saved.items():
            setattr(torch.Tensor, name, real)
        return super().__exit__(*exc)


def count_syncs(accum: int, batch: int, crop: int) -> int:
    """Host syncs of one optimizer step of ``accum`` micro-batches (the second step), plus the trainer's loss read."""
    model, loss_fn, opt, t, batches = _training_parts(batch, crop, accum)
    counter = SyncCounter()  # AdamW is fused (build_optimizer): its step counters live beside the parameters

    def step() -> bool:
        losses, took = run_step_group(model, loss_fn, batches, [1 / accum] * accum, opt, None,
                                      Precision(False, torch.float32), torch.device("cpu"), t.grad_clip)
        values = list(losses.values())
        if values and isinstance(values[0], torch.Tensor):  # the trainer reads them once per step
            torch.stack(values).tolist()
        return took

    step()
    with counter:
        took = step()
    assert took, "the step was not taken"
    return counter.n


def table(results: dict[str, tuple[Counter, Counter]]) -> str:
    """Per part and route: aten ops (of which launch a kernel)."""
    routes = list(results)
    kernels = {r: results[r][1] for r in routes}
    results = {r: results[r][0] for r in routes}
    lines = ["| part | " + " | ".join(f"`{r}`" for r in routes) + " |", "|---" * (len(routes) + 1) + "|"]
    for p in PARTS:
        lines.append(f"| {LABELS[p]} | " + " | ".join(f"{results[r][p]:,} ({kernels[r][p]:,})" for r in routes) + " |")
    totals = {r: sum(results[r].values()) for r in routes}
    lines.append("| **total** | " + " | ".join(f"**{totals[r]:,}** ({sum(kernels[r].values()):,})"
                                             for r in routes) + " |")
    lines.append("| scan share | " + " | ".join(f"{results[r]['scan'] / totals[r]:.0%}" for r in routes) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="batch 1, crop 64: checks the script, not the figures")
    ap.add_argument("--syncs", action="store_true", help="host syncs per optimizer step at accum 1 and 4 only")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=256)
    args = ap.parse_args()
    batch, crop = (1, 64) if args.smoke else (args.batch, args.crop)
    torch.set_num_threads(1)  # the dispatch mode is per thread: the scan's worker threads would escape it
    if args.syncs:
        b, c = (1, 64) if args.smoke else (2, 128)
        counts = {a: count_syncs(a, b, c) for a in (1, 4)}
        print(f"host syncs per optimizer step (run_step_group + the trainer's loss read), batch {b}, crop {c}:")
        for a, n in counts.items():
            print(f"  --accum {a}: {n} (target <= {SYNC_TARGET}): {'met' if n <= SYNC_TARGET else 'NOT met'}")
        return
    results = {route: count_step(route, batch, crop) for route in ("torch", "torch_parallel", "triton")}
    print(f"aten ops (of which launch a kernel) of one training step, batch {batch}, crop {crop}, "
          f"default network, foreach AdamW\n")
    print(table(results))
    print()
    for route in ("torch_parallel", "triton"):
        total = sum(results[route][0].values())
        share = results[route][0]["scan"] / total
        ok = total <= TOTAL_TARGET and share <= SCAN_SHARE_TARGET
        print(f"{route}: total {total:,} (target <= {TOTAL_TARGET:,}), scan share {share:.0%} "
              f"(target <= {SCAN_SHARE_TARGET:.0%}): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
