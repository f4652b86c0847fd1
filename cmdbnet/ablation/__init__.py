"""``cmdb ablation``: the design's ablation and baseline tables from one recipe, one protocol, one command.

Why: reproducing a paper's table by hand means scripting a loop of runs, keeping the recipes
equal, scoring each with the same rules and assembling the table; each step is where
reproductions drift (a backbone that silently did not load, clutter counted in one run and
not another). Here every entry is an ordinary run folder under ``out`` trained with the same
settings (:mod:`cmdbnet.ablation.runs`), scored on the test split under one protocol, and the
tables are written from the saved records (:mod:`cmdbnet.ablation.report`). Under torchrun
each entry trains with DDP and rank 0 scores and writes the tables.

The package is callable (``cmdbnet.ablation(settings, ...)``) so the public name works whether
or not the package was imported first.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmdbnet.ablation.report import LABELS, write_tables
from cmdbnet.ablation.runs import (
    ENTRY_FILE,
    PARTIAL_FILE,
    check_folder,
    entry_settings,
    plan,
    read_entry,
    recipe,
    run_entry,
    score_entry,
)
from cmdbnet.api import resolve_fit_vram
from cmdbnet.data.manifest import read_manifest
from cmdbnet.errors import CmdbError
from cmdbnet.models.baselines import check_installed
from cmdbnet.runtime import barrier, init_distributed
from cmdbnet.settings import BASELINES, VARIANTS, Settings
from cmdbnet.utils import callable_package

__all__ = ["ablation", "LABELS", "ENTRY_FILE"]


def _names(given: list[str] | tuple[str, ...], known: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip().lower() for n in given if n.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise CmdbError(f"unknown {what} {bad[0]!r}; use any of {', '.join(known)}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise CmdbError(f"{what} {dupes[0]!r} listed twice")
    return names


def protocol_text(p: dict[str, Any]) -> str:
    return (f"Protocol: {p.get('dataset')} {p.get('bands')}, split {p.get('split')}, checkpoint best.pt of each run "
            f"(chosen on val), means over {', '.join(p.get('included_in_means', []))}, labels "
            f"{'eroded' if p.get('eroded_labels') else 'full'}, ignore index {p.get('ignore_index')}, OA over all "
            f"classes, boundary {p.get('boundary_dilation')}, TTA {p.get('tta')}."
            + (" Boundary IoU is not informative on eroded labels: every class edge there is ignored, and ignored "
               "pixels never form a contour; prepare with full labels to score boundaries."
               if p.get("eroded_labels") else ""))


def recipe_text(s: Settings, seeds: list[int]) -> str:
    t, d = s.train, s.data
    steps = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs} epochs"
    return (f"Recipe (every entry): {steps}, micro-batch {t.batch} x accum {t.accum}, crop {d.crop}, lr {t.lr:g} "
            f"{t.schedule} (warm-up {t.warmup_steps}), augment {d.augment:g}, AMP {'on' if t.amp else 'off'}, "
            f"backbone {s.model.backbone} (pretrained {s.model.pretrained}), seed(s) {', '.join(map(str, seeds))}; "
            f"baselines: the same loss without the auxiliary and boundary terms they have no heads for.")


def ablation(settings: Settings, variants: list[str] | tuple[str, ...] = VARIANTS,
             baselines: list[str] | tuple[str, ...] = (), seeds: int = 1, ignore_clutter: bool = False,
             progress: bool = True, log: Callable[[str], None] | None = None,
             stop_after_steps: int | None = None) -> dict[str, Any] | None:
    """Train every entry under ``settings.train.out`` with one recipe, score each on the test split, write tables.

    ``settings`` is the recipe (``data.prepared`` and ``train.out`` required); entry ``NAME`` of
    ``variants`` and ``baselines`` trains in ``OUT/NAME`` (``OUT/NAME-seedS`` with ``seeds`` > 1,
    seeds ``train.seed``, ``train.seed + 1``, ...). Finished entries are skipped, an interrupted one
    resumes; ``train.overwrite`` starts every entry over. Returns the ``ablation.json`` document
    on rank 0, None on the others. ``stop_after_steps`` interrupts the first entry that trains
    after that many steps, as Ctrl-C would (for tests).
    """
    say = log or (lambda _msg: None)
    variants = _names(list(variants), VARIANTS, "variant")
    baselines = _names(list(baselines), BASELINES, "baseline")
    if not variants and not baselines:
        raise CmdbError("nothing to run: give at least one variant or baseline")
    if seeds < 1:
        raise CmdbError(f"--seeds must be at least 1, got {seeds}")
    if settings.train.resume is not None:
        raise CmdbError("--resume: an ablation resumes by itself; run the same command again")
    if settings.data.prepared is None:
        raise CmdbError("no prepared data: pass --data PREPARED (the output folder of cmdb prepare)")
    if settings.train.out.exists() and not settings.train.out.is_dir():
        raise CmdbError(f"--out {settings.train.out}: a file, not a folder")
    manifest = read_manifest(settings.data.prepared)
    for split in ("train", "val", "test"):
        if not manifest["crops"].get(split):
            raise CmdbError(f"{settings.data.prepared} has no {split} crops; an ablation trains on train, picks "
                            "checkpoints on val and scores on test")
    if baselines:
        check_installed()
    dist = init_distributed(settings.train.device)
    settings, note = resolve_fit_vram(settings)
    if note:
        say(note)
    overwrite = settings.train.overwrite
    seed_list = [settings.train.seed + i for i in range(seeds)]
    entries = plan(Path(settings.train.out), variants, baselines, seed_list, settings.model.variant)
    recipes = {e: entry_settings(settings, e, manifest) for e in entries}
    if not overwrite:
        for e in entries:
            check_folder(e, recipes[e])
    excluded = sorted(manifest.get("excluded_in_means", [])) if ignore_clutter else []
    records = []
    for i, e in enumerate(entries, 1):
        where = f"[{i}/{len(entries)}] {e.name}" + (f" seed {e.seed}" if seeds > 1 else "")
        done = None if overwrite else read_entry(e)
        if done is not None and sorted(done["protocol"].get("excluded_from_means", [])) != excluded:
            say(f"{where}: trained earlier, scored again (means over other classes now)")
            done = score_entry(e, recipes[e], done["steps"], done["train_seconds"], done["peak_memory_bytes"],
                               done["peak_memory_kind"], ignore_clutter) if dist.is_main else done
            barrier(dist)
        if done is not None:
            say(f"{where}: finished earlier, skipped ({e.run_dir / ENTRY_FILE})")
            records.append(done)
            continue
        if overwrite and dist.is_main:
            for name in (ENTRY_FILE, PARTIAL_FILE):
                (e.run_dir / name).unlink(missing_ok=True)
        barrier(dist)
        resuming = not overwrite and (e.run_dir / "last.pt").is_file()
        say(f"{where}: {'resuming' if resuming else 'training'} in {e.run_dir}")
        record = run_entry(e, recipes[e], dist, ignore_clutter, overwrite, progress, stop_after_steps)
        if record is not None:
            say(f"{where}: test mIoU {100 * record['mIoU']:.1f}, Boundary IoU {100 * record['boundary_iou']:.1f}, "
                f"{record['train_seconds']:.0f} s")
            records.append(record)
    if not dist.is_main:
        return None
    protocol = {k: v for k, v in records[0]["protocol"].items() if k != "checkpoint"}
    shared = recipe(recipes[entries[0]])
    for section in ("model", "train"):
        shared[section] = {k: v for k, v in shared[section].items() if k not in ("arch", "variant", "seed")}
    return write_tables(Path(settings.train.out), records, protocol, protocol_text(protocol), shared,
                        recipe_text(settings, seed_list))


callable_package(__name__, ablation)
