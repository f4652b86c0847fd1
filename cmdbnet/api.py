"""The public Python API: one function per command, resolving settings exactly as the CLI does."""

from __future__ import annotations

from collections.abc import Callable

from cmdbnet.profiling.budget import fit_settings
from cmdbnet.settings import Settings
from cmdbnet.training.loop import TrainResult
from cmdbnet.training.loop import train as run_training


def train(settings: Settings, progress: bool = True, stop_after_steps: int | None = None,
          fault_hook: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train as ``cmdb train`` does: ``--fit-vram`` is resolved into a recipe before the run starts.

    See :func:`cmdbnet.training.loop.train` for ``stop_after_steps`` and ``fault_hook``.
    """
    settings, note = resolve_fit_vram(settings)
    return run_training(settings, progress, stop_after_steps, fault_hook, note)


def resolve_fit_vram(settings: Settings) -> tuple[Settings, str]:
    """``settings`` with ``train.fit_vram`` replaced by the recipe it selects, and a one-line note."""
    if not settings.train.fit_vram:
        return settings, ""
    settings, note = fit_settings(settings, settings.train.fit_vram)
    return settings.model_copy(update={"train": settings.train.model_copy(update={"fit_vram": None})}), note
