"""``cmdb ablation``: parse flags, run every entry, print the table and where it was written."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

import typer

from cmdbnet.cli.common import ConfigOption, JsonFlag, cli_errors, console, err_console, print_json, settings_from
from cmdbnet.errors import CmdbError
from cmdbnet.settings import BASELINES, VARIANTS, TrainSettings


def _split(text: Optional[str], default: tuple[str, ...]) -> list[str]:
    if text is None:
        return list(default)
    return [] if text.strip().lower() in ("", "none") else text.split(",")


def ablation_command(
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Prepared folder (from cmdb prepare) with train, val and test crops."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder of the ablation: one run folder per entry, the tables."),
    config: Optional[Path] = ConfigOption,
    variants: Optional[str] = typer.Option(None, "--variants", help=f"Comma-separated cmdbnet variants, or none (default: {','.join(VARIANTS)})."),
    baselines: Optional[str] = typer.Option(None, "--baselines", help=f"Comma-separated baselines: {','.join(BASELINES)} (needs the extra: pip install 'cmdbnet[baselines]'; default: none)."),
    seeds: int = typer.Option(1, "--seeds", help="Runs per entry (seeds train.seed, +1, ...): mean ± std when > 1."),
    ignore_clutter: bool = typer.Option(False, "--ignore-clutter", help="Means over the five ISPRS classes without clutter."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the training crops (default 300)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps of every entry (overrides --epochs)."),
    batch: Optional[int] = typer.Option(None, "--batch", "-b", help="Micro-batch per device."),
    accum: Optional[int] = typer.Option(None, "--accum", help="Gradient accumulation steps."),
    crop: Optional[int] = typer.Option(None, "--crop", help="Training crop size."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (AdamW)."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Mixed precision."),
    seed: Optional[int] = typer.Option(None, "--seed", help="First seed (default 42)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Data-loader workers."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Start every entry over instead of skipping finished ones."),
    as_json: bool = JsonFlag,
) -> None:
    """Train the design's ablation variants and baselines under one recipe; score each on the test split.

    Every entry is an ordinary run folder under --out (evaluate, predict and count-params accept
    it); running the command again skips finished entries and resumes an interrupted one.
    Writes OUT/ablation.json, OUT/ablation.md and OUT/ablation.png.

    Examples:

      cmdb ablation --data prepared/potsdam --out runs/ablation -c examples/potsdam.yaml --ignore-clutter

      cmdb ablation --data prepared/potsdam --out runs/abl --baselines unet,deeplabv3plus,segformer --seeds 3

      cmdb ablation --data prepared/loveda --out runs/abl --variants full,cnn_only --baselines unet --max-steps 2000

      torchrun --nproc-per-node 4 -m cmdbnet ablation --data prepared/potsdam --out runs/ablation
    """
    settings = settings_from(
        config,
        data={"prepared": data, "crop": crop, "workers": workers},
        train={"out": out, "amp": amp, "batch": batch, "accum": accum, "epochs": epochs, "max_steps": max_steps,
               "lr": lr, "seed": seed, "device": device, "overwrite": overwrite},
    )
    if settings.train.out == TrainSettings().out:  # not set anywhere: not the single-run default folder
        settings = settings.model_copy(update={"train": settings.train.model_copy(update={"out": Path("runs/ablation")})})
    from cmdbnet.data.manifest import read_manifest  # here: rasterio would slow every cmdb start

    if settings.data.prepared is None:
        raise CmdbError("no prepared data: pass --data PREPARED (the output folder of cmdb prepare)")
    read_manifest(settings.data.prepared)
    chosen = _split(baselines, ())
    if chosen and importlib.util.find_spec("segmentation_models_pytorch") is None:
        raise CmdbError("the baselines (unet, deeplabv3plus, segformer) need segmentation_models_pytorch, which is "
                        "not installed: pip install 'cmdbnet[baselines]' (segmentation-models-pytorch)")
    from cmdbnet.ablation import ablation  # here, not at the top: torch loads only once the inputs are checked

    main = int(os.environ.get("RANK", "0")) == 0
    log = (lambda msg: err_console.print(msg, highlight=False)) if main else None
    doc = ablation(settings, _split(variants, VARIANTS), chosen, seeds, ignore_clutter,
                   progress=not as_json and main, log=log)
    if doc is None:
        return
    if as_json:
        print_json(doc)
        return
    console.print(summary_table(doc))
    console.print(doc["protocol_text"], style="dim", highlight=False)
    console.print(f"per-class IoU, MACs, memory: {settings.train.out}/ablation.md; also ablation.json, ablation.png",
                  highlight=False)


def summary_table(doc: dict):
    """The headline columns of ablation.md (percent; mean ± std over seeds)."""
    from rich.table import Table

    def pct(s: dict) -> str:
        if s["mean"] is None:
            return "-"
        return f"{100 * s['mean']:.1f}" + (f" ± {100 * s['std']:.1f}" if s["std"] is not None else "")

    table = Table(title="ablation on the test split")
    for col in ("entry", "mIoU", "OA", "mF1", "Boundary IoU", "Δ mIoU", "params", "train"):
        table.add_column(col, justify="left" if col == "entry" else "right")
    for r in doc["table"]:
        delta = "-" if r["delta_mIoU"] is None or r["name"] == "full" else f"{100 * r['delta_mIoU']:+.1f}"
        table.add_row(r["label"], *(pct(r[k]) for k in ("mIoU", "OA", "mF1", "boundary_iou")), delta,
                      f"{r['params'] / 1e6:.1f} M", f"{r['train_seconds']['mean']:.0f} s")
    return table


def register(app: typer.Typer) -> None:
    app.command("ablation")(cli_errors(ablation_command))
