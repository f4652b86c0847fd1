"""Optimizer parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cmdbnet.settings import TrainSettings
from cmdbnet.training.optim import build_optimizer, build_scheduler, lr_factor


@pytest.mark.parametrize("schedule", ["poly", "cosine"])
def test_warmup_is_linear_then_decay_ends_at_the_floor(schedule):
    total, warmup, floor = 100, 10, 0.01
    f = [lr_factor(s, total, warmup, schedule, floor=floor) for s in range(total + 5)]
    assert f[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert f[warmup] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1:]))  # never rises after warm-up
    assert f[total] == pytest.approx(floor) and f[-1] == pytest.approx(floor)  # clamped past the end


def test_poly_and_cosine_midpoints():
    # halfway through the decay: poly (1 - 0.5)^0.9, cosine 0.5; both mapped onto [floor, 1]
    assert lr_factor(50, 100, 0, "poly", power=0.9, floor=0.0) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(50, 100, 0, "cosine", floor=0.0) == pytest.approx(0.5)
    assert lr_factor(50, 100, 0, "cosine", floor=0.2) == pytest.approx(0.2 + 0.8 * 0.5)


def test_warmup_never_swallows_a_short_run():
    # 3 steps with 10 warm-up steps: the last step still reaches the full rate
    assert lr_factor(1, 3, 10, "poly") == pytest.approx(1.0)
    assert lr_factor(0, 1, 10, "poly") == pytest.approx(1.0)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.LayerNorm(4)
        self.A_log = nn.Parameter(torch.zeros(4, 2))
        self.D = nn.Parameter(torch.ones(4))
        self.frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)


def test_no_weight_decay_on_norms_biases_and_ssm_parameters():
    model = _Tiny()
    opt = build_optimizer(model, TrainSettings(lr=3e-4, weight_decay=0.05))
    groups = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert groups[0.05] == {id(model.conv.weight)}
    assert groups[0.0] == {id(p) for p in (model.conv.bias, model.norm.weight, model.norm.bias,
                                             model.A_log, model.D)}
    assert all(g["lr"] == 3e-4 for g in opt.param_groups)


def test_scheduler_scales_every_group_per_optimizer_step():
    model = _Tiny()
    cfg = TrainSettings(lr=1e-3, warmup_steps=2, schedule="cosine")
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=10)
    seen = []
    for _ in range(4):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    want = [1e-3 * lr_factor(s, 10, 2, "cosine") for s in range(4)]
    assert [row[0] for row in seen] == pytest.approx(want) and all(len(set(r)) == 1 for r in seen)
    assert not any(math.isnan(v) for row in seen for v in row)
