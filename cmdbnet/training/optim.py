"""AdamW with warm-up then poly or cosine decay, stepped per optimizer step."""

from __future__ import annotations

import math

import torch

from cmdbnet.settings import TrainSettings


def build_optimizer(model: torch.nn.Module, cfg: TrainSettings) -> torch.optim.Optimizer:
    """AdamW; norms, biases and SSM parameters (A_log, D) get no weight decay.

    Why: decaying the SSM's A_log or D pulls the state-space model towards no memory,
    and decaying norm scales fights the normalisation; VMamba and Mamba exclude them too.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim <= 1 or leaf in {"A_log", "D", "Ds", "A_logs"}:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # One fused kernel per step instead of several ops per parameter tensor: on CPU the
    # per-tensor loop costs more than the arithmetic (numbers: benchmarks/RESULTS.md).
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in decay + no_decay)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, fused=fused or None)


def lr_factor(step: int, total: int, warmup: int, schedule: str, power: float = 0.9,
              floor: float = 0.01) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    warmup = min(warmup, max(total - 1, 0))
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    if schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        decay = (1 - progress) ** power
    return floor + (1 - floor) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainSettings, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg.warmup_steps, cfg.schedule))
