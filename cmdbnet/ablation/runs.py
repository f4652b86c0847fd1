"""The entries of an ablation: one ordinary run folder each, trained under one recipe, scored once.

An entry is a network (a cmdbnet variant or a baseline) and a seed. Its settings are the
ablation's settings with only ``model.arch``, ``model.variant``, ``train.seed`` (one per seed)
and ``train.out`` changed, so the recipes saved in the run folders differ in nothing else.
An entry is finished when its ``ablation-entry.json`` (test scores, complexity, cost) exists;
re-running skips it. A run folder with ``last.pt`` but no scores resumes exactly as
``cmdb train --resume`` does. A run folder whose saved recipe differs is refused, never mixed in.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from cmdbnet.api import train
from cmdbnet.errors import CmdbError
from cmdbnet.evaluation import evaluate
from cmdbnet.models import build_model
from cmdbnet.profiling.complexity import count_complexity
from cmdbnet.runtime import DistInfo, barrier, pick_device
from cmdbnet.settings import Settings
from cmdbnet.training.setup import settings_for_data
from cmdbnet.utils import peak_rss_bytes, write_text_atomic

ENTRY_FILE = "ablation-entry.json"
PARTIAL_FILE = "ablation-partial.json"  # training seconds spent before an interruption
# What may differ between the saved recipes of two entries (besides model.arch / model.variant / train.seed).
RUN_KEYS = {("train", "out"), ("train", "resume"), ("train", "overwrite")}


@dataclass(frozen=True)
class Entry:
    name: str  # variant or baseline name
    arch: str
    variant: str
    seed: int
    run_dir: Path


def plan(out: Path, variants: list[str], baselines: list[str], seeds: list[int], default_variant: str) -> list[Entry]:
    """Every entry, seed by seed, in table order; one run folder each (``NAME`` or ``NAME-seedS``)."""
    entries = []
    for seed in seeds:
        suffix = f"-seed{seed}" if len(seeds) > 1 else ""
        entries += [Entry(v, "cmdbnet", v, seed, out / f"{v}{suffix}") for v in variants]
        entries += [Entry(b, b, default_variant, seed, out / f"{b}{suffix}") for b in baselines]
    return entries


def entry_settings(base: Settings, entry: Entry, manifest: dict) -> Settings:
    """The recipe of one entry: the ablation's settings with the entry's network, seed and folder."""
    model = base.model.model_copy(update={"arch": entry.arch, "variant": entry.variant})
    run = base.train.model_copy(update={"out": entry.run_dir, "seed": entry.seed, "resume": None, "overwrite": False})
    return settings_for_data(base.model_copy(update={"model": model, "train": run}), manifest)


def recipe(settings: Settings | dict) -> dict[str, Any]:
    """The saved settings less the run's own folder and resume state: what must match across entries."""
    data = settings.model_dump(mode="json") if isinstance(settings, Settings) else settings
    return {section: {k: v for k, v in values.items() if (section, k) not in RUN_KEYS}
            for section, values in data.items() if isinstance(values, dict)}


def first_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    """The first dotted key whose value differs between two nested mappings."""
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            found = first_difference(x, y, f"{prefix}{key}.")
            if found:
                return found
        elif x != y:
            return f"{prefix}{key} ({y!r} there, {x!r} now)"
    return None


def check_folder(entry: Entry, settings: Settings) -> None:
    """Refuse a run folder that holds a run of another recipe (continuing it would mix two recipes)."""
    saved = entry.run_dir / "settings.yaml"
    if not saved.is_file() or not any((entry.run_dir / n).is_file() for n in ("last.pt", ENTRY_FILE)):
        return
    try:
        old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise CmdbError(f"{saved}: not valid YAML; remove {entry.run_dir} or use --overwrite") from None
    diff = first_difference(recipe(settings), recipe(old))
    if diff:
        raise CmdbError(f"{entry.run_dir} holds a run of another recipe: {diff}; use another --out, "
                        "or --overwrite to start every entry over")


def read_entry(entry: Entry) -> dict[str, Any] | None:
    path = entry.run_dir / ENTRY_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # written atomically, so only a hand edit gets here: score it again


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak(device: torch.device) -> tuple[int, str]:
    """Peak memory of this entry's training: CUDA allocated on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "cpu_peak_rss"
    except OSError:
        pass
    return peak_rss_bytes(), "cpu_peak_rss_process"


def _partial_seconds(entry: Entry) -> float:
    try:
        return float(json.loads((entry.run_dir / PARTIAL_FILE).read_text())["train_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def run_entry(entry: Entry, settings: Settings, dist: DistInfo, ignore_clutter: bool, overwrite: bool,
              progress: bool, stop_after_steps: int | None = None) -> dict[str, Any] | None:
    """Train (or resume) and score one entry; returns its record (rank 0) or None (other ranks).

    ``stop_after_steps`` interrupts training as Ctrl-C would (for tests of resuming).
    """
    resume = not overwrite and (entry.run_dir / "last.pt").is_file()
    run = settings.train.model_copy(update={"resume": entry.run_dir if resume else None, "overwrite": overwrite})
    s = settings.model_copy(update={"train": run})
    device = pick_device(s.train.device, dist.local_rank)
    spent = _partial_seconds(entry) if resume else 0.0
    _reset_peak(device)
    t0 = time.monotonic()
    try:
        result = train(s, progress=progress, stop_after_steps=stop_after_steps)
    except KeyboardInterrupt:
        if dist.is_main and entry.run_dir.is_dir():
            write_text_atomic(entry.run_dir / PARTIAL_FILE,
                              json.dumps({"train_seconds": spent + time.monotonic() - t0}) + "\n")
        raise
    seconds = spent + time.monotonic() - t0
    peak, peak_kind = _peak(device)
    record = None
    if dist.is_main:
        record = score_entry(entry, s, result.steps, seconds, peak, peak_kind, ignore_clutter)
    barrier(dist)
    return record


def score_entry(entry: Entry, s: Settings, steps: int, seconds: float, peak: int, peak_kind: str,
                ignore_clutter: bool) -> dict[str, Any]:
    """Evaluate an entry's best checkpoint on the test split; count its parameters and MACs; save the record."""
    scores = evaluate(entry.run_dir, s.data.prepared, split="test", ignore_clutter=ignore_clutter,
                      device=s.train.device, workers=s.data.workers, progress=False)
    net = build_model(s.model.model_copy(update={"pretrained": "off", "backbone_weights": None}))
    size = count_complexity(net, s.data.crop, s.model.in_channels, entry.name)["total"]
    record = {
        "name": entry.name, "arch": entry.arch, "variant": entry.variant if entry.arch == "cmdbnet" else None,
        "seed": entry.seed, "backbone": s.model.backbone, "run_dir": str(entry.run_dir), "steps": steps,
        "mIoU": scores["mIoU"], "OA": scores["OA"], "mF1": scores["mF1"], "boundary_iou": scores["boundary_iou"],
        "per_class_iou": {name: v["iou"] for name, v in scores["per_class"].items()},
        "params": int(size["params"]), "macs": int(size["macs"]), "macs_crop": s.data.crop,
        "train_seconds": seconds, "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
        "protocol": scores["protocol"],
    }
    write_text_atomic(entry.run_dir / ENTRY_FILE, json.dumps(record, indent=2, default=_plain) + "\n")
    (entry.run_dir / PARTIAL_FILE).unlink(missing_ok=True)
    return record


def _plain(x: Any) -> Any:
    return float(x) if isinstance(x, torch.Tensor) else str(x)
