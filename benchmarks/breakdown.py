"""Where a training step's time goes, per module, against each module's share of the FLOPs.

One forward + backward of the full network (``benchmarks/model.py --breakdown`` runs it) under
the autograd profiler. Forward: every labelled module (and the cross-scan / cross-merge
functions of each SS2D) is a ``record_function`` range and keeps its self time (its time less
that of labelled ranges inside it). Backward: each autograd node is charged to the label of the
forward op that created it (matched by sequence number). FLOPs: ``FlopCounterMode`` per
module, plus ``SelectiveScan.macs`` for the scans, forward only (backward costs about twice as much in
the same proportions). Profiling adds a few us per op, so shares, not absolute times, are the
figure.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from cmdbnet.models import vss

_PREFIX = "bd::"
_BWD = "autograd::engine::evaluate_function: "


def label_of(fqn: str) -> str | None:
    """Breakdown row of a module's qualified name, or None when it only nests in its parent's row."""
    m = re.match(r"mamba\.stages\.(\d)\.(.*)", fqn)
    if m:
        stage, rest = f"mamba s{int(m.group(1)) + 1}", m.group(2)
        if rest == "down":
            return f"{stage} downsample"
        if re.fullmatch(r"blocks\.\d+\.op", rest):
            return f"{stage} projections"
        if re.fullmatch(r"blocks\.\d+\.op\.scan", rest):
            return f"{stage} scan"
        if re.fullmatch(r"blocks\.\d+\.(norm|norm2|mlp)|norm", rest):
            return f"{stage} mlp + norms"
        return None
    return fqn if fqn in ("cnn", "mamba", "fusion", "boundary", "heads") else None


@contextlib.contextmanager
def _ranges(model):
    """Label every breakdown module (and each SS2D's cross-scan and merge) with a profiler range."""
    handles, originals = [], (vss._cross_scan, vss._cross_merge)
    for fqn, module in model.named_modules():
        label = label_of(fqn)
        if label is None:
            continue
        stack = []

        def pre(_m, _a, label=label, stack=stack):
            stack.append(torch.autograd.profiler.record_function(_PREFIX + label).__enter__())

        def post(_m, _a, _o, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    current = {"stage": "s?"}
    for fqn, module in model.named_modules():
        if re.fullmatch(r"mamba\.stages\.\d\.blocks\.\d+\.op", fqn):
            stage = label_of(fqn).split(" ")[1]
            handles.append(module.register_forward_pre_hook(lambda m, a, s=stage: current.update(stage=s)))

    def wrap(fn, part):
        def inner(*args):
            with torch.autograd.profiler.record_function(f"{_PREFIX}mamba {current['stage']} {part}"):
                return fn(*args)
        return inner

    vss._cross_scan, vss._cross_merge = wrap(originals[0], "cross-scan"), wrap(originals[1], "merge")
    try:
        yield
    finally:
        vss._cross_scan, vss._cross_merge = originals
        for h in handles:
            h.remove()


def _label_above(event) -> str:
    while event is not None:
        if event.name.startswith(_PREFIX):
            return event.name[len(_PREFIX):]
        event = event.cpu_parent
    return "other (loss, pad, interpolate)"


def time_breakdown(model, loss_fn, x, y) -> tuple[dict[str, float], dict[str, float], float]:
    """({label: forward ms}, {label: backward ms}, step wall ms) of one profiled forward + backward."""
    model.zero_grad(set_to_none=True)
    with _ranges(model), torch.autograd.profiler.profile() as prof:
        t0 = time.perf_counter()
        loss_fn(model(x), y).backward()
        wall = (time.perf_counter() - t0) * 1e3
    fwd, bwd, seq = defaultdict(float), defaultdict(float), {}
    for ev in prof.function_events:
        if ev.name.startswith(_PREFIX):
            inner = sum(c.cpu_time_total for c in _labelled_children(ev))
            fwd[ev.name[len(_PREFIX):]] += (ev.cpu_time_total - inner) / 1e3
        elif ev.sequence_nr >= 0 and _top_backward(ev) and not ev.name.startswith(_BWD):
            # Ops that create no node report the next number too: the creator is the last one.
            seq[ev.sequence_nr] = _label_above(ev.cpu_parent)
    for ev in prof.function_events:
        if ev.name.startswith(_BWD) and _top_backward(ev):
            bwd[seq.get(ev.sequence_nr, "other (loss, pad, interpolate)")] += ev.cpu_time_total / 1e3
    return dict(fwd), dict(bwd), wall


def _labelled_children(ev):
    """Labelled ranges directly inside ``ev`` (through unlabelled ones)."""
    out = []
    for c in ev.cpu_children:
        out += [c] if c.name.startswith(_PREFIX) else _labelled_children(c)
    return out


def _top_backward(ev) -> bool:
    p = ev.cpu_parent
    while p is not None:
        if p.name.startswith(_BWD):
            return False
        p = p.cpu_parent
    return True


def flop_shares(model, x) -> dict[str, float]:
    """{label: forward GFLOPs (MACs x 2)} in training mode at ``x``'s shape."""
    flops: dict[str, float] = defaultdict(float)
    root = type(model).__name__
    names = {f"{root}.{fqn}": label_of(fqn) for fqn, _ in model.named_modules() if label_of(fqn)}
    scans: list[tuple[str, int]] = []
    hooks = [m.register_forward_hook(lambda m, a, kw, o, lab=label_of(fqn): scans.append((lab, m.macs(a, kw))),
                                     with_kwargs=True)
             for fqn, m in model.named_modules() if isinstance(m, vss.SelectiveScan)]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    for key, label in names.items():  # innermost labelled module: own count less labelled children
        inner = sum(c for k, c in counts.items() if k.startswith(key + ".") and k in names
                    and not any(k.startswith(o + ".") for o in names if o.startswith(key + ".") and o != k))
        flops[label] += (counts.get(key, 0) - inner) / 1e9
    for label, macs in scans:
        flops[label] += 2 * macs / 1e9
    return dict(flops)


def print_table(fwd, bwd, flops, wall) -> None:
    labels = sorted(set(fwd) | set(bwd) | set(flops), key=_order)
    total_t = sum(fwd.values()) + sum(bwd.values())
    total_f = sum(flops.values())
    print(f"{'module':32s} {'fwd ms':>8s} {'bwd ms':>8s} {'time %':>7s} {'FLOP %':>7s} {'time/FLOP':>9s}")
    for lab in labels:
        t = fwd.get(lab, 0.0) + bwd.get(lab, 0.0)
        f = flops.get(lab, 0.0)
        share_t, share_f = t / total_t, f / total_f
        rel = f"{share_t / share_f:9.1f}" if share_f > 1e-4 else f"{'-':>9s}"
        print(f"{lab:32s} {fwd.get(lab, 0):8.0f} {bwd.get(lab, 0):8.0f} {share_t:7.1%} {share_f:7.1%} {rel}")
    print(f"{'total':32s} {sum(fwd.values()):8.0f} {sum(bwd.values()):8.0f}   (profiled step wall {wall:.0f} ms, "
          f"forward {total_f:.2f} GFLOP)")


def _order(label: str):
    top = ["cnn", "mamba", "fusion", "boundary", "heads"]
    head = next((i for i, t in enumerate(top) if label.startswith(t)), len(top))
    return head, label


class _CountOps(TorchDispatchMode):
    """Counts every aten op dispatched in this thread: a load-independent measure of overhead."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(model, loss_fn, x, y) -> tuple[int, int]:
    """(aten ops of one training forward + backward, of one eval forward under inference_mode).

    Runs with one torch thread, so that the scan runs in this thread where the mode sees it.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _CountOps() as train:
            loss_fn(model(x), y).backward()
        model.eval()
        with _CountOps() as infer, torch.inference_mode():
            model(x)
    finally:
        model.train()
        torch.set_num_threads(threads)
    return train.count, infer.count
