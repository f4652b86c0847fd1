"""The peak-memory estimate and the search for a recipe that fits a budget."""

from __future__ import annotations

import pytest

from cmdbnet.errors import CmdbError
from cmdbnet.models import scan
from cmdbnet.profiling import budget as fitmod
from cmdbnet.profiling.budget import CONTEXT_RESERVE, MemoryConfig, estimate, fit_settings
from cmdbnet.profiling.tracing import (
    trace_forward,
    trace_loss,
)
from cmdbnet.settings import load_settings
from memory_recipes import TINY_MODEL, GiB, MiB, tiny  # noqa: F401 - tests/memory_recipes.py


def test_batch_and_crop_extrapolation_matches_direct_traces():
    s = tiny()
    surface = fitmod._Surface(s, True, "fp16", False, 64)
    for batch, crop in ((8, 64), (6, 96)):
        fwd, signature = trace_forward(s, batch, crop, True)
        loss = trace_loss(s, signature, crop, batch)
        direct = fwd.linear + sum(scan.state_bytes(*sc) for sc in fwd.scans) + loss.linear
        extrapolated = surface.at(batch, crop)["activations"]
        assert extrapolated == pytest.approx(direct, rel=1e-3), (batch, crop)
    assert len(surface.traces) == 3  # (2, 64), (4, 64) and (2, 128) served both


@pytest.fixture(scope="module")
def default_estimates():
    s = load_settings()
    return {name: estimate(MemoryConfig(4, 4, 256, amp, "fp16", ckpt).apply(s))
            for name, amp, ckpt in (("recipe", True, False), ("fp32", False, False), ("ckpt", True, True))}


def test_default_recipe_fits_a_6gb_card(default_estimates):
    r = default_estimates["recipe"]
    assert r.device == "estimate" and r.config == MemoryConfig(4, 4, 256, True, "fp16", False)
    assert r.peak <= 4.5 * GiB
    assert r.peak == sum(r.parts.values()) + sum(r.overheads.values())
    assert r.weights == pytest.approx(4 * 32.65e6, rel=0.01)  # 32.65 M fp32 parameters
    assert r.gradients <= r.weights and r.optimizer == 2 * r.gradients
    assert r.fits(6 * GiB) and r.peak + CONTEXT_RESERVE <= 6 * GiB


def test_amp_and_checkpointing_lower_the_estimate(default_estimates):
    recipe, fp32, ckpt = (default_estimates[k] for k in ("recipe", "fp32", "ckpt"))
    assert recipe.activations < 0.85 * fp32.activations and recipe.peak < fp32.peak
    assert ckpt.activations < 0.6 * recipe.activations and ckpt.peak < recipe.peak
    assert ckpt.overheads["backward_transient"] > recipe.overheads["backward_transient"]  # a stage is recomputed


def test_fit_settings_keeps_the_effective_batch_and_fits():
    s = tiny()
    second = estimate(MemoryConfig(4, 4, 128, True, "fp16", False).apply(s))
    first = estimate(MemoryConfig(8, 2, 128, True, "fp16", False).apply(s))
    assert first.peak > second.peak
    budget = second.peak + CONTEXT_RESERVE + 1
    fitted, message = fit_settings(s, budget)
    assert (fitted.train.batch, fitted.train.accum, fitted.data.crop) == (4, 4, 128)
    assert fitted.train.amp and not fitted.model.checkpointing
    assert estimate(fitted).fits(budget)
    assert "batch 4 x accum 4" in message and "\n" not in message

    fitted, _ = fit_settings(s, first.peak + CONTEXT_RESERVE)
    assert fitted.train.batch * fitted.train.accum == 16 and fitted.train.batch == 8


def test_fit_settings_says_what_the_smallest_peak_is_when_nothing_fits():
    s = tiny(batch=2, accum=1)
    with pytest.raises(CmdbError, match=r"no recipe fits .*smallest estimated peak is [\d.]+ MiB \(batch 1 x accum 2"):
        fit_settings(s, CONTEXT_RESERVE + 8 * MiB)
