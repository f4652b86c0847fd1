"""``cmdb profile-vram``: peak GPU memory of a training recipe, and the recipes that fit a budget."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cmdbnet.cli.common import ConfigOption, JsonFlag, cli_errors, console, err_console, print_json, settings_from
from cmdbnet.settings import VARIANTS
from cmdbnet.utils import format_bytes, parse_bytes

_LABELS = {"weights": "weights (fp32)", "gradients": "gradients (fp32)",
           "optimizer": "optimizer (AdamW, 2 fp32 moments)", "activations": "activations (end of forward + loss)",
           "backward_transient": "backward transient",
           "workspace": "workspace (cuBLAS/cuDNN)", "allocator": "allocator (rounding, fragmentation)",
           "optimizer_step": "optimizer step temporary"}
PER_CROP = 3


def report_table(report) -> Table:
    table = Table()
    table.add_column("part")
    table.add_column("size", justify="right")
    for name, value in [*report.parts.items(), *report.overheads.items()]:
        table.add_row(_LABELS.get(name, name), format_bytes(value))
    table.add_section()
    kind = "measured" if report.device == "cuda" else "estimated"
    table.add_row(f"[bold]peak, {kind}[/] (reserved)", f"[bold]{format_bytes(report.peak)}[/]")
    if report.peak_allocated != report.peak:
        table.add_row("  of which allocated", format_bytes(report.peak_allocated))
    return table


def fits_table(fits, budget: int, reserve: int, show_all: bool) -> tuple[Table, int]:
    table = Table(title=f"Recipes that fit {format_bytes(budget)} (estimated peak + {format_bytes(reserve)} CUDA "
                        "context), best first", title_justify="left")
    for col in ("#", "batch x accum", "crop", "AMP", "ckpt", "peak", "speed"):
        table.add_column(col, justify="right" if col in ("#", "crop", "peak", "speed") else "left", no_wrap=True)
    table.add_column("cmdb train flags", overflow="fold")
    shown, per_crop = 0, {}
    for i, fit in enumerate(fits, 1):
        c = fit.config
        per_crop[c.crop] = per_crop.get(c.crop, 0) + 1
        if not show_all and per_crop[c.crop] > PER_CROP:
            continue
        shown += 1
        table.add_row(str(i), f"{c.batch} x {c.accum}", str(c.crop), c.amp_dtype if c.amp else "fp32",
                      "yes" if c.checkpointing else "no", format_bytes(fit.report.peak), f"{c.speed:.2f}",
                      c.flags())
    return table, len(fits) - shown


# Long only by its signature: typer declares one parameter per flag.
def profile_vram_command(
    config: Optional[Path] = ConfigOption,
    batch: Optional[int] = typer.Option(None, "--batch", "-b", help="Micro-batch per device (default 4)."),
    accum: Optional[int] = typer.Option(None, "--accum", help="Gradient accumulation steps (default 4)."),
    crop: Optional[int] = typer.Option(None, "--crop", help="Training crop size (default 256)."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Mixed precision (default on)."),
    amp_dtype: Optional[str] = typer.Option(None, "--amp-dtype", help="fp16 or bf16 (default fp16)."),
    checkpointing: Optional[bool] = typer.Option(None, "--checkpointing/--no-checkpointing",
                                                 help="Gradient checkpointing of stages (default off)."),
    variant: Optional[str] = typer.Option(None, "--variant", help=f"Ablation variant: {', '.join(VARIANTS)}."),
    budget: Optional[str] = typer.Option(None, "--budget", help="GPU memory, e.g. 6GB: list the recipes that fit."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA if present), cpu (estimate) or cuda (measure)."),
    show_all: bool = typer.Option(False, "--all",
                                  help=f"With --budget: list every fitting recipe, not {PER_CROP} per crop."),
    as_json: bool = JsonFlag,
) -> None:
    """Peak GPU memory of a training recipe: measured on CUDA, estimated without a GPU.

    Without a GPU one training step is traced on fake CUDA tensors under CUDA's autocast rules.

    --budget searches batch 8/4/2/1, crop 512/384/256/192, AMP and checkpointing at the same batch x accum.

    Examples:

      cmdb profile-vram

      cmdb profile-vram --budget 6GB

      cmdb profile-vram --batch 2 --crop 512 --checkpointing --json

      cmdb profile-vram -c examples/laptop-6gb.yaml --device cuda
    """
    from cmdbnet.profiling.budget import CONTEXT_RESERVE, profile, search

    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter("use auto, cpu or cuda", param_hint="--device")
    if amp_dtype is not None and amp_dtype not in ("fp16", "bf16"):
        raise typer.BadParameter("use fp16 or bf16", param_hint="--amp-dtype")
    settings = settings_from(config, data={"crop": crop}, model={"variant": variant, "checkpointing": checkpointing},
                             train={"batch": batch, "accum": accum, "amp": amp, "amp_dtype": amp_dtype})
    limit = parse_bytes(budget) if budget else None
    with err_console.status("tracing a training step…", spinner="dots") if not as_json else nullcontext():
        report = profile(settings, device)
        fits, smallest = search(settings, limit) if limit else ([], None)
    if as_json:
        out = report.to_json()
        out["fits"] = [{"config": f.config.as_dict(), "peak_bytes": int(f.report.peak),
                        "speed": round(f.config.speed, 3), "command": f"cmdb train {f.config.flags()}"} for f in fits]
        print_json(out)
        return
    m = settings.model
    kind = "measured on CUDA" if report.device == "cuda" else "estimated for a CUDA run"
    console.print(f"[bold]Peak GPU memory, {kind}[/]: {report.config.describe()} "
                  f"({m.variant}, {m.backbone}, Mamba depths {m.mamba_depths})", highlight=False)
    console.print(report_table(report))
    console.print(f"with the CUDA context ({format_bytes(CONTEXT_RESERVE)}): "
                  f"{format_bytes(report.peak + CONTEXT_RESERVE)}")
    for note in report.notes:
        console.print(f"  - {note}", style="dim", highlight=False)
    if limit is None:
        return
    if not fits:
        low = f" (smallest estimated peak {format_bytes(smallest.report.peak)}: {smallest.config.describe()})" \
            if smallest else ""
        console.print(f"[bold red]nothing fits {format_bytes(limit)}[/]{low}")
        return
    table, hidden = fits_table(fits, limit, CONTEXT_RESERVE, show_all)
    console.print(table)
    console.print("speed: relative throughput (AMP x1.8, checkpointing x0.75, micro-batch b x b/(b+0.3)); "
                  "the configured crop ranks first", style="dim")
    if hidden:
        console.print(f"{hidden} more fit: --all lists them, --json gives them all", style="dim")


def register(app: typer.Typer) -> None:
    app.command("profile-vram")(cli_errors(profile_vram_command))
