"""``cmdb train`` and ``cmdb evaluate``: parse flags, call the engine, print tables."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cmdbnet.cli.common import ConfigOption, JsonFlag, cli_errors, console, err_console, print_json, settings_from
from cmdbnet.errors import CmdbError

VARIANTS = "full, cnn_only, mamba_only, no_fusion, no_boundary"


def _fmt(x: float, pct: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.2f}" if pct else f"{x:.2f}"


def metrics_table(result: dict, title: str) -> Table:
    """Per-class IoU / F1 / Boundary IoU and the means, in percent, as papers print them."""
    table = Table(title=title)
    for col in ("class", "IoU", "F1", "Boundary IoU"):
        table.add_column(col, justify="right" if col != "class" else "left")
    excluded = set(result.get("protocol", {}).get("excluded_from_means", []))
    for name, v in result["per_class"].items():
        label = f"{name} (not in means)" if name in excluded else name
        table.add_row(label, _fmt(v["iou"]), _fmt(v["f1"]), _fmt(v["boundary_iou"]))
    table.add_section()
    table.add_row("[bold]mean[/]", _fmt(result["mIoU"]), _fmt(result["mF1"]), _fmt(result["boundary_iou"]))
    table.caption = (f"OA {_fmt(result['OA'])} | boundary distance (ASSD) {_fmt(result['boundary_distance'], False)} px")
    return table


def protocol_line(p: dict) -> str:
    inc = ", ".join(p.get("included_in_means", []))
    trained, data = p.get("checkpoint_dataset"), f"{p.get('dataset')} {p.get('bands')}"
    data = p.get("dataset") if trained in (None, data) else f"{data} (checkpoint: {trained})"
    return (f"protocol: dataset {data} split {p.get('split')} | means over: {inc} | "
            f"labels {'eroded' if p.get('eroded_labels') else 'full'} | OA over all classes | "
            f"boundary {p.get('boundary_dilation')} | TTA {p.get('tta', 'none')}")


def train_cmd(
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Prepared folder (from cmdb prepare)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder for checkpoints, TensorBoard, settings."),
    config: Optional[Path] = ConfigOption,
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Mixed precision (about half the activation memory)."),
    amp_dtype: Optional[str] = typer.Option(None, "--amp-dtype", help="fp16 (CUDA, with loss scaling) or bf16."),
    batch: Optional[int] = typer.Option(None, "--batch", "-b", help="Micro-batch per device."),
    accum: Optional[int] = typer.Option(None, "--accum", help="Gradient accumulation steps."),
    crop: Optional[int] = typer.Option(None, "--crop", help="Training crop size."),
    checkpointing: Optional[bool] = typer.Option(None, "--checkpointing/--no-checkpointing",
                                                 help="Gradient checkpointing of stages (~30% less memory)."),
    variant: Optional[str] = typer.Option(None, "--variant", help=f"Ablation variant: {VARIANTS}."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the training crops (default 300)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps (overrides --epochs)."),
    val_interval: Optional[int] = typer.Option(None, "--val-interval", help="Validate every K epochs."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Data-loader workers."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (AdamW)."),
    boundary_weight: Optional[float] = typer.Option(None, "--boundary-weight", help="Boundary loss weight (0.3; 0.5 for sharper edges)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Run folder or checkpoint to continue exactly."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite",
                                             help="Start over in a --out folder that holds a run."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed: same seed, same run (default 42)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda."),
    sync_bn: Optional[bool] = typer.Option(None, "--sync-bn/--no-sync-bn", help="SyncBatchNorm across GPUs (DDP)."),
    fit_vram: Optional[str] = typer.Option(None, "--fit-vram", help="Memory budget such as 6GB: apply the fastest recipe that fits."),
    as_json: bool = JsonFlag,
) -> None:
    """Train the network on a prepared dataset.

    Examples:

      cmdb train --data prepared/potsdam --out runs/potsdam --amp --accum 4

      cmdb train -c examples/laptop-6gb.yaml --data prepared/potsdam --out runs/p6

      cmdb train --data prepared/potsdam --out runs/p --resume runs/p

      torchrun --nproc-per-node 2 -m cmdbnet train --data prepared/potsdam --out runs/ddp
    """
    settings = settings_from(
        config,
        data={"prepared": data, "crop": crop, "workers": workers},
        model={"variant": variant, "checkpointing": checkpointing},
        train={"out": out, "amp": amp, "amp_dtype": amp_dtype, "batch": batch, "accum": accum, "epochs": epochs,
               "max_steps": max_steps, "val_interval": val_interval, "lr": lr, "resume": resume, "seed": seed,
               "device": device, "sync_bn": sync_bn, "boundary_weight": boundary_weight, "fit_vram": fit_vram,
               "overwrite": overwrite},
    )
    result = _checked_train(settings, as_json)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports
        return
    m = result.last_metrics or {}
    summary = {"run_dir": str(result.run_dir), "steps": result.steps, "epochs": result.epochs_done,
               "best_mIoU": result.best_miou, "nonfinite_skipped": result.nonfinite_skipped,
               "micro_batch": result.micro_batch, "accum": result.accum,
               "last": {k: m.get(k) for k in ("mIoU", "OA", "mF1", "boundary_iou", "boundary_distance")},
               "checkpoints": {"best": str(result.run_dir / "best.pt"), "last": str(result.run_dir / "last.pt")}}
    if as_json:
        print_json(summary)
        return
    if m:
        console.print(metrics_table({**m, "protocol": {}}, f"validation after {result.steps} steps"))
    console.print(f"best val mIoU {_fmt(result.best_miou)} | checkpoints {result.run_dir}/best.pt, last.pt | "
                  f"TensorBoard: tensorboard --logdir {result.run_dir / 'tb'}")


def check_evaluate_inputs(checkpoint: Path, data: Path, split: str) -> None:
    """The checks that need no torch, so a typo is reported at once."""
    from cmdbnet.data.manifest import read_manifest  # here: rasterio would slow every cmdb start

    if not checkpoint.exists():
        raise CmdbError(f"checkpoint not found: {checkpoint}")
    if checkpoint.is_dir() and not any((checkpoint / n).is_file() for n in ("best.pt", "last.pt")):
        raise CmdbError(f"no best.pt or last.pt in run folder {checkpoint}")
    crops = read_manifest(data)["crops"]
    if not crops.get(split):
        have = ", ".join(s for s, v in crops.items() if v) or "none"
        raise CmdbError(f"--split {split}: {data} has no crops in that split; splits with crops: {have}")


def _checked_train(settings, as_json: bool):
    """Check data and run folder first, then import torch and train: a typo is reported at once."""
    from cmdbnet.training.setup import check_train_inputs  # here: rasterio would slow every cmdb start

    check_train_inputs(settings, int(os.environ.get("RANK", "0")) == 0)
    from cmdbnet.api import train  # here, not at the top: torch loads only once the inputs are checked

    return train(settings, progress=not as_json)


def evaluate_cmd(
    checkpoint: Path = typer.Argument(..., help="Checkpoint file or run folder (best.pt is used)."),
    data: Path = typer.Option(..., "--data", "-d", help="Prepared folder (from cmdb prepare)."),
    split: str = typer.Option("val", "--split", help="Prepared split: val, or test for paper numbers."),
    tta: bool = typer.Option(False, "--tta", help="Test-time augmentation (flips and rotations, d4)."),
    ignore_clutter: bool = typer.Option(False, "--ignore-clutter", help="Means over the five ISPRS classes without clutter (as most papers report)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Crops per forward pass (default 8)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Data-loader workers."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON to this file."),
) -> None:
    """Score a checkpoint on a prepared split: per-class table, means and the protocol used.

    Examples:

      cmdb evaluate runs/potsdam --data prepared/potsdam --split test --ignore-clutter

      cmdb evaluate runs/potsdam/best.pt --data prepared/potsdam --tta --json scores.json
    """
    check_evaluate_inputs(checkpoint, data, split)
    from cmdbnet.evaluation import evaluate  # here, not at the top: torch loads only once the inputs exist

    result = evaluate(checkpoint, data, split=split, tta="d4" if tta else "none", ignore_clutter=ignore_clutter,
                      device=device, batch=batch, workers=workers, json_out=json_file,
                      progress=err_console.is_terminal)
    for warning in result.get("warnings", []):
        typer.echo(f"cmdb: warning: {warning}", err=True)
    console.print(metrics_table(result, f"{Path(checkpoint)} on {split}"))
    console.print(protocol_line(result["protocol"]))
    if json_file:
        console.print(f"wrote {json_file}")


def register(app: typer.Typer) -> None:
    app.command("train")(cli_errors(train_cmd))
    app.command("evaluate")(cli_errors(evaluate_cmd))
