"""One optimizer step over a group of micro-batches: what training runs and profiling measures.

The step runs in three phases so that ranks can never disagree about what comes next:
every rank runs its micro-batches locally (no collective), then all ranks exchange one small
status tensor (non-finite loss? out of memory?) and read it once, then, when all are fine,
the gradients are averaged across ranks and the optimizer steps. An out-of-memory error in a
forward or backward is therefore recoverable on every rank at once: the failed rank drops
its step's tensors, still joins the exchange, and every rank raises :class:`StepOutOfMemory`
together. The price is that the gradient all-reduce no longer overlaps the backward.

Host syncs: the status read is the only one (the loss values stay on the device).
"""

from __future__ import annotations

import contextlib
import gc
import signal
import threading
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from cmdbnet.errors import CmdbError
from cmdbnet.runtime import DistInfo, Precision, all_reduce_sum, release_cached_memory

BUCKET_BYTES = 25 * 2**20  # gradients all-reduced in flat buckets of about this size, as DDP does


class StepOutOfMemory(RuntimeError):
    """Some rank ran out of memory in this step's forward/backward; every rank raises it.

    Raised outside any ``except`` block, after the failed step's tensors were released.
    """


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


def all_reduce_grads(params, info: DistInfo) -> None:
    """Average the gradients across ranks, in flat buckets (one collective per bucket)."""
    if not (info.enabled and dist.is_initialized()):
        return
    params = [p for p in params if p.requires_grad]
    for p in params:  # a parameter this rank's step left without a gradient: every rank sends the same buckets
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    bucket: list[torch.Tensor] = []
    size = 0
    for i, g in enumerate(grads):
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= BUCKET_BYTES or i == len(grads) - 1:
            flat = torch.cat([b.reshape(-1) for b in bucket]).div_(info.world_size)
            dist.all_reduce(flat)
            for b, part in zip(bucket, flat.split([b.numel() for b in bucket])):
                b.copy_(part.view_as(b))
            bucket, size = [], 0


def run_step_group(model, loss_fn, batches: list[dict], weights: list[float], optimizer, scaler,
                   precision: Precision, device: torch.device, grad_clip: float | None,
                   dist_info: DistInfo = DistInfo(), before_forward: Callable[[], None] | None = None,
                   commit: Callable[[bool], None] | None = None) -> tuple[dict[str, torch.Tensor], bool]:
    """Forward/backward a group of micro-batches and take one optimizer step.

    ``weights`` are each micro-batch's share of the group's samples, so the summed
    gradient equals that of one batch of the whole group, also for a short last group.
    Returns the weighted losses (0-d tensors on ``device``: read them when logging) and
    whether the step was taken (False: non-finite loss on some rank, gradients dropped; a
    GradScaler's scale backs off). A step that is skipped or interrupted (Ctrl-C, out of
    memory) leaves the model as it found it: BatchNorm statistics included. Raises
    :class:`StepOutOfMemory` on every rank when any rank ran out of memory before the
    exchange. Ctrl-C during the optimizer step and ``commit(stepped)`` (the caller's
    bookkeeping) waits until both are done.
    """
    saved = [b.detach().clone() for b in model.buffers()]
    oom = False
    try:
        totals, finite = _forward_backward(model, loss_fn, batches, weights, scaler, precision, device,
                                           before_forward)
    except torch.OutOfMemoryError:
        oom = True  # handled below, once this block has dropped the traceback and its frames
    except BaseException:
        optimizer.zero_grad(set_to_none=True)
        _restore_buffers(model, saved)
        raise
    if oom and dist_info.enabled and any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()):
        # SyncBatchNorm exchanges statistics inside the forward: the other ranks wait there, not at
        # the status exchange. This rank stops; torchrun then stops the others.
        raise CmdbError(f"out of memory on rank {dist_info.rank} with synchronised BatchNorm: lower --batch, "
                        "or use --checkpointing / --amp, then --resume from the last checkpoint")
    if oom:
        totals, finite = {}, torch.zeros((), device=device)
        optimizer.zero_grad(set_to_none=True)
        _restore_buffers(model, saved)
        gc.collect()  # frames of the failed forward can sit in reference cycles
        release_cached_memory(device)
    found_inf = torch.zeros((), device=device)
    unscaled = scaler is not None and scaler.is_enabled() and not oom
    if unscaled:
        scaler.unscale_(optimizer)  # records the inf checks update() needs, also for a skipped step
        found = scaler._found_inf_per_device(optimizer).values()
        unscaled = bool(found)
        found_inf = sum((f.to(device) for f in found), found_inf)
    status = torch.stack([(finite < 1).float(), torch.full((), float(oom), device=device), found_inf])
    nonfinite, any_oom, inf_grads = all_reduce_sum(status, dist_info).tolist()  # the step's one host sync
    if any_oom:
        _keep_scale(scaler)
        del saved, totals, finite, status
        raise StepOutOfMemory("out of memory in a forward or backward pass")
    if nonfinite:
        optimizer.zero_grad(set_to_none=True)
        _restore_buffers(model, saved)
        with deferred_sigint():
            _update_scale(scaler, unscaled)
            if commit:
                commit(False)
        return totals, False
    with deferred_sigint():
        all_reduce_grads(model.parameters(), dist_info)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if not inf_grads:  # inf gradients of a finite loss (fp16 overflow): skipped, as GradScaler.step does
            optimizer.step()
        _update_scale(scaler, unscaled)
        optimizer.zero_grad(set_to_none=True)
        if commit:
            commit(True)
    return totals, True


def _update_scale(scaler, unscaled: bool) -> None:
    """GradScaler.update from the inf checks unscale_ recorded (no GradScaler.step needed)."""
    if unscaled:
        scaler.update()  # backs the scale off after inf/NaN gradients, grows it after enough good steps
    else:
        _keep_scale(scaler)


def _keep_scale(scaler) -> None:
    """End the scaler's iteration without touching its scale (no gradients, or a step abandoned)."""
    if scaler is not None and scaler.is_enabled():
        scaler.update(new_scale=scaler.get_scale())


def _forward_backward(model, loss_fn, batches, weights, scaler, precision, device,
                      before_forward) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Accumulate the group's gradients locally; the weighted losses and whether all were finite (on device)."""
    totals: dict[str, torch.Tensor] = {}
    finite = torch.ones((), device=device)
    for batch, w in zip(batches, weights):
        if before_forward:
            before_forward()
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        with precision.autocast(device):
            out = model(image)
        losses = loss_fn(out, label)
        loss = losses["total"] * w
        finite = finite * torch.isfinite(losses["total"])
        (scaler.scale(loss) if scaler is not None else loss).backward()
        for k, v in losses.items():
            v = v.detach().float() * w
            totals[k] = totals[k] + v if k in totals else v
    return totals, finite
