"""Settings resolved against the prepared data before a run starts (sizes, bands, dataset facts)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from cmdbnet.data.manifest import read_manifest
from cmdbnet.errors import CmdbError
from cmdbnet.settings import DataSettings, Settings
from cmdbnet.utils import remove_partial_files


def dataset_info(manifest: dict, settings: Settings) -> dict[str, Any]:
    """What a checkpoint must carry about the data so predict/evaluate need nothing else."""
    return {"name": manifest["dataset"], "classes": list(manifest["classes"]),
            "palette": [list(c) for c in manifest["palette"]], "ignore_index": int(manifest["ignore_index"]),
            "bands": manifest.get("bands"), "band_count": int(manifest["band_count"]),
            "dtype": manifest.get("dtype", "uint8"), "mean": list(settings.data.mean),
            "std": list(settings.data.std), "excluded_in_means": list(manifest.get("excluded_in_means", [])),
            "eroded": bool(manifest.get("eroded", False)), "crop": int(manifest.get("crop", 0)),
            **{k: manifest[k] for k in ("band_indexes", "dataset_spec") if k in manifest}}


def settings_for_data(settings: Settings, manifest: dict) -> Settings:
    """Fit the model's input and output sizes, and non-8-bit data's statistics, to the prepared data."""
    bands = int(manifest["band_count"])
    dtype = manifest.get("dtype", "uint8")
    defaults = DataSettings()
    if (dtype != "uint8" or manifest.get("mean")) and (settings.data.mean, settings.data.std) == (defaults.mean,
                                                                                                   defaults.std):
        if not manifest.get("mean") or not manifest.get("std"):
            raise CmdbError(f"{settings.data.prepared} holds {dtype} pixels, but data.mean/data.std are 8-bit "
                            "ImageNet statistics: re-run cmdb prepare (it computes them) or set both in your config")
        data = settings.data.model_copy(update={"mean": list(manifest["mean"]), "std": list(manifest["std"])})
        settings = settings.model_copy(update={"data": data})
    if len(settings.data.mean) != bands:
        raise CmdbError(f"data.mean/data.std have {len(settings.data.mean)} values but the prepared data has "
                        f"{bands} bands; set data.mean and data.std (one value per band) in your config")
    model = settings.model.model_copy(update={"num_classes": len(manifest["classes"]), "in_channels": bands})
    return settings.model_copy(update={"model": model})


RUN_FILES = ("best.pt", "last.pt", "settings.yaml")


def check_train_inputs(settings: Settings, is_main: bool = True) -> dict[str, Any]:
    """What a run can check before torch loads (prepared data, run folder); returns the manifest."""
    if settings.data.prepared is None:
        raise CmdbError("no prepared data: pass --data PREPARED (the output folder of cmdb prepare)")
    if is_main:
        check_run_dir(Path(settings.train.out), settings.train.resume is not None, settings.train.overwrite)
    return read_manifest(settings.data.prepared)


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a run folder that cannot be made, or that holds a run this one would replace."""
    parent = run_dir
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise CmdbError(f"--out {run_dir}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CmdbError(f"--out {run_dir}: cannot write in {parent} (permission denied)")
    held = [n for n in RUN_FILES[:2] if (run_dir / n).is_file()]  # settings.yaml alone: nothing to lose
    if held and not resume and not overwrite:
        raise CmdbError(f"{run_dir} already holds a run ({', '.join(held)}): continue it with --resume {run_dir}, "
                        "or start over with --overwrite")
    mine = run_dir / RUN_FILES[2]
    if mine.is_file() and not overwrite and not _run_settings(mine):
        raise CmdbError(f"--out {run_dir}: {mine} is not the settings of a run (a config of yours?) and a run "
                        "would replace it; choose another --out, or pass --overwrite")


def _run_settings(path: Path) -> bool:
    """Whether ``path`` is settings.yaml as a run writes it (every section), which a run may replace."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and {"data", "model", "train", "predict"} <= set(data)


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Create the run folder; drop temporary files a killed run left, and the old run on --overwrite."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        remove_partial_files(run_dir, name)
    if overwrite:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "tb", ignore_errors=True)


# Settings a resumed run may change: where things are and what runs them, not what is computed.
RESUME_FREE = {"train": {"out", "resume", "overwrite", "device", "log_images", "time_limit_min", "fit_vram", "tf32"},
               "data": {"prepared", "root", "workers", "pin_memory", "dataset", "stride", "bands", "eroded"},
               "predict": None}  # None: the whole section
# How long to train: applied on resume (the schedule is stretched to the new length) and said so.
RESUME_APPLIED = {"train": {"epochs", "max_steps", "val_interval"}}


def resume_differences(saved: dict[str, Any], now: Settings) -> tuple[list[str], list[str]]:
    """(refused, applied): ``section.field old -> new`` for each setting ``now`` changes against a checkpoint's.

    Why: the optimizer and schedule state come from the checkpoint, so a changed learning rate (or
    loss weight, crop, batch) would be recorded in settings.yaml but not used; refusing is the honest
    answer. The run's length is the exception: epochs / max_steps / val_interval are applied.
    """
    refused, applied = [], []
    current = now.model_dump(mode="json")
    for section, fields in current.items():
        free = RESUME_FREE.get(section, set())
        if section in RESUME_FREE and free is None:
            continue
        old_fields = saved.get(section) or {}
        for name, value in fields.items():
            if name in free or old_fields.get(name, value) == value:
                continue
            line = f"{section}.{name} {old_fields.get(name)} -> {value}"
            (applied if name in RESUME_APPLIED.get(section, ()) else refused).append(line)
    return refused, applied


def check_resume_settings(src: Path, saved: dict[str, Any], now: Settings) -> str:
    """Refuse a resume whose settings change what is computed; returns a note on what it applies."""
    refused, applied = resume_differences(saved, now)
    if refused:
        what = "model" if any(d.startswith("model.") for d in refused) else "training"
        raise CmdbError(f"--resume {src}: the {what} settings differ from the checkpoint's: {', '.join(refused)}; "
                        "resume with the same config and flags, or start a new run (another --out)")
    return f"resume: applying {', '.join(applied)}" if applied else ""
