"""One optimizer step over a group of micro-batches: what training runs and profiling measures."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

import torch

from cmdbnet.runtime import DistInfo, Precision, all_reduce_sum


@contextlib.contextmanager
def deferred_sigint() -> Iterator[None]:
    """Hold Ctrl-C back until the block ends, so an optimizer step is never left half applied."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _restore_buffers(model, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buf, old in zip(model.buffers(), saved):
            buf.copy_(old)


def run_step_group(model, loss_fn, batches: list[dict], weights: list[float], optimizer, scaler,
                   precision: Precision, device: torch.device, grad_clip: float | None,
                   dist_info: DistInfo = DistInfo(), before_forward: Callable[[], None] | None = None,
                   commit: Callable[[bool], None] | None = None) -> tuple[dict[str, float], bool]:
    """Forward/backward a group of micro-batches and take one optimizer step.

    ``weights`` are each micro-batch's share of the group's samples, so the summed
    gradient equals that of one batch of the whole group, also for a short last group.
    Returns the weighted losses and whether the step was taken (False: non-finite loss on
    some rank, gradients dropped). A step that is skipped or interrupted (Ctrl-C, out of
    memory) leaves the model as it found it: BatchNorm statistics included. Ctrl-C during the
    optimizer step and ``commit(stepped)`` (the caller's bookkeeping) waits until both are done.
    """
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        totals, finite = _forward_backward(model, loss_fn, batches, weights, scaler, precision, device,
                                           dist_info, before_forward)
    except BaseException:
        optimizer.zero_grad(set_to_none=True)
        _restore_buffers(model, saved)
        raise
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        _restore_buffers(model, saved)
        with deferred_sigint():
            if scaler is not None:
                scaler.update()
            if commit:
                commit(False)
        return totals, False
    with deferred_sigint():
        if scaler is not None:
            scaler.unscale_(optimizer)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if commit:
            commit(True)
    return totals, True


def _forward_backward(model, loss_fn, batches, weights, scaler, precision, device, dist_info,
                      before_forward) -> tuple[dict[str, float], bool]:
    """Accumulate the group's gradients; whether every rank's loss was finite."""
    totals: dict[str, float] = {}
    finite = torch.ones((), device=device)
    for i, (batch, w) in enumerate(zip(batches, weights)):
        sync = i == len(batches) - 1 or not dist_info.enabled
        ctx = contextlib.nullcontext() if sync else model.no_sync()
        with ctx:
            if before_forward:
                before_forward()
            image = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            with precision.autocast(device):
                out = model(image)
            losses = loss_fn(out, label)
            loss = losses["total"] * w
            if not torch.isfinite(losses["total"]):
                finite.zero_()
            (scaler.scale(loss) if scaler is not None else loss).backward()
        for k, v in losses.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach()) * w
    if dist_info.enabled:
        flag = all_reduce_sum(finite.clone(), dist_info)
        finite = (flag == dist_info.world_size).float()
    return totals, bool(finite)
