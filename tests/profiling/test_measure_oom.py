"""profile-vram's measurement when a recipe runs out of memory mid-forward (CUDA-only code, run on CPU)."""

from __future__ import annotations

import types
import weakref

import pytest
import torch

from cmdbnet.errors import CmdbError
from cmdbnet.profiling import budget
from cmdbnet.settings import load_settings
from memory_recipes import TINY_MODEL  # tests/memory_recipes.py


def test_out_of_memory_mid_forward_releases_the_activations_before_the_error(monkeypatch):
    # no GPU here: the allocator's counters are stand-ins; the model, step and error path are real
    monkeypatch.setattr(budget, "pick_device", lambda name: torch.device("cpu"))
    for name in ("empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: types.SimpleNamespace(total_memory=2**33))
    refs: list[weakref.ref] = []

    def hook(module, args, output):
        refs.append(weakref.ref(output))
        raise torch.OutOfMemoryError("CUDA out of memory (injected after the stage ran)")

    build = budget.build_model

    def build_hooked(ms):
        net = build(ms)
        net.cnn.layer1.register_forward_hook(hook)
        return net

    monkeypatch.setattr(budget, "build_model", build_hooked)
    s = load_settings(None, {"model": TINY_MODEL, "data": {"crop": 64},
                             "train": {"batch": 2, "accum": 1, "amp": False}})
    with pytest.raises(CmdbError, match="does not fit on this GPU .*out of memory") as err:
        budget.measure_cuda(s)
    assert refs and refs[0]() is None  # before: the OOM's traceback, the error's context, kept it alive
    assert err.value.__context__ is None
