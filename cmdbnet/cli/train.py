"""``cmdb train``: parse flags, train, print the validation table."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Optional

import typer

from cmdbnet.cli.common import ConfigOption, JsonFlag, cli_errors, console, print_json, settings_from
from cmdbnet.cli.tables import fmt, metrics_table
from cmdbnet.settings import VARIANTS


# Long only by its signature: typer declares one parameter per flag.
def train_command(
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
    variant: Optional[str] = typer.Option(None, "--variant", help=f"Ablation variant: {', '.join(VARIANTS)}."),
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
    console.print(f"best val mIoU {fmt(result.best_miou)} | checkpoints {result.run_dir}/best.pt, last.pt | "
                  f"TensorBoard: {tensorboard_command(result.run_dir)}")


def tensorboard_command(run_dir: Path) -> str:
    """The command to paste into a shell, quoted (``Läufe/run 1/tb``)."""
    return f"tensorboard --logdir {shlex.quote(str(run_dir / 'tb'))}"


def _checked_train(settings, as_json: bool):
    """Check data and run folder first, then import torch and train: a typo is reported at once."""
    from cmdbnet.training.setup import check_train_inputs  # here: rasterio would slow every cmdb start

    check_train_inputs(settings, int(os.environ.get("RANK", "0")) == 0)
    from cmdbnet.api import train  # here, not at the top: torch loads only once the inputs are checked

    return train(settings, progress=not as_json)


def register(app: typer.Typer) -> None:
    app.command("train")(cli_errors(train_command))
