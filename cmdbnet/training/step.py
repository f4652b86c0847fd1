"""One optimizer step over a group of micro-batches: what training runs and profiling measures."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from cmdbnet.runtime import DistInfo, Precision, all_reduce_sum


def run_step_group(model, loss_fn, batches: list[dict], weights: list[float], optimizer, scaler,
                   precision: Precision, device: torch.device, grad_clip: float | None,
                   dist_info: DistInfo = DistInfo(), before_forward: Callable[[], None] | None = None
                   ) -> tuple[dict[str, float], bool]:
    """Forward/backward a group of micro-batches and take one optimizer step.

    ``weights`` are each micro-batch's share of the group's samples, so the summed
    gradient equals that of one batch of the whole group, also for a short last group.
    Returns the weighted losses and whether the step was taken (False: non-finite loss on
    some rank, gradients dropped).
    """
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
    if not bool(finite):
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        return totals, False
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
    return totals, True
