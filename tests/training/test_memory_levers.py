"""Training under memory pressure: OOM back-off and --fit-vram applied before the run."""

from __future__ import annotations

import math

import pytest
import torch

from cmdbnet.errors import CmdbError
from cmdbnet.profiling.budget import CONTEXT_RESERVE, MemoryConfig, estimate
from cmdbnet.settings import load_settings
from memory_recipes import TINY_MODEL, GiB, MiB, tiny  # noqa: F401 - tests/memory_recipes.py


def test_oom_back_off_halves_the_micro_batch_and_logs_it(prepared_potsdam, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cmdbnet.api import train

    calls = []

    def fault(step, micro_batch):
        calls.append((step, micro_batch))
        if step == 1 and micro_batch == 4 and not any(c == (1, 4) for c in calls[:-1]):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    s = load_settings(None, {"data": {"prepared": prepared_potsdam, "crop": 64, "workers": 0},
                             "model": TINY_MODEL,
                             "train": {"out": tmp_path / "run", "batch": 4, "accum": 2, "max_steps": 3, "amp": False,
                                       "device": "cpu", "warmup_steps": 1, "log_images": 0}})
    result = train(s, progress=False, fault_hook=fault)
    assert result.steps == 3
    assert (result.micro_batch, result.accum) == (2, 4)
    after = calls[calls.index((1, 4)) + 1:]
    assert after[0] == (1, 2) and {mb for _, mb in after} == {2}  # step 1 redone with half the micro-batch
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    events = acc.Scalars("memory/micro_batch")
    assert [(e.step, e.value) for e in events] == [(1, 2.0)]
    assert [e.value for e in acc.Scalars("memory/accum")] == [4.0]
    assert math.isfinite(result.best_miou)


def test_train_fit_vram_applies_the_fitted_recipe(prepared_potsdam, tmp_path):
    from cmdbnet.api import resolve_fit_vram
    from cmdbnet.training.loop import Trainer

    s = load_settings(None, {"data": {"prepared": prepared_potsdam, "crop": 64, "workers": 0}, "model": TINY_MODEL,
                             "train": {"out": tmp_path / "run", "batch": 4, "accum": 4, "device": "cpu"}})
    half = estimate(MemoryConfig(2, 8, 64, True, "fp16", False).apply(s))
    assert estimate(MemoryConfig(4, 4, 64, True, "fp16", False).apply(s)).peak > half.peak
    s.train.fit_vram = f"{(half.peak + CONTEXT_RESERVE) / MiB + 0.5:.1f}MB"
    with pytest.raises(CmdbError, match="resolved before the run starts"):
        Trainer(s, progress=False)  # the loop never configures itself
    resolved, note = resolve_fit_vram(s)
    trainer = Trainer(resolved, progress=False, fit_note=note)
    assert (trainer.micro_batch, trainer.accum) == (2, 8)
    assert trainer.settings.train.amp and trainer.fit_note.startswith("--fit-vram")
