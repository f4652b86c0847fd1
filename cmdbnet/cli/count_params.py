"""``cmdb count-params``: parameters and multiply-adds per module, beside the design budget."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cmdbnet.cli.common import ConfigOption, JsonFlag, cli_errors, console, print_json, settings_from
from cmdbnet.settings import VARIANTS


def _m(n: float) -> str:
    return f"{n / 1e6:.2f} M"


def _g(n: float) -> str:
    return f"{n / 1e9:.2f} G"


@cli_errors
def count_params_command(
    config: Optional[Path] = ConfigOption,
    crop: Optional[int] = typer.Option(None, "--crop", help="Square input size in pixels [default: data.crop, 256]."),
    variant: Optional[str] = typer.Option(None, "--variant", help=f"Ablation variant: {', '.join(VARIANTS)}."),
    arch: Optional[str] = typer.Option(None, "--arch", help="cmdbnet, or a baseline: unet, deeplabv3plus, segformer."),
    as_json: bool = JsonFlag,
) -> None:
    """Parameters and multiply-adds (inference, one image) per module of the network.

    Examples:

      cmdb count-params

      cmdb count-params --crop 512 --variant no_boundary --json

      cmdb count-params -c runs/ablation/unet/settings.yaml
    """
    from cmdbnet.errors import CmdbError
    from cmdbnet.models import build_model
    from cmdbnet.profiling.complexity import DESIGN_BUDGET, LABELS, count_complexity

    if variant is not None and variant not in VARIANTS:
        raise CmdbError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
    settings = settings_from(config, model={"variant": variant, "arch": arch}, data={"crop": crop})
    # Counting needs no pretrained weights: never warn about, or read, a weights file here.
    model_settings = settings.model.model_copy(update={"pretrained": "off", "backbone_weights": None})
    model = build_model(model_settings)
    report = count_complexity(model, settings.data.crop, model_settings.in_channels, model_settings.variant)
    if as_json:
        print_json(report)
        return

    from rich.table import Table

    name = settings.model.arch if settings.model.arch != "cmdbnet" else f"cmdbnet {report['variant']}"
    table = Table(title=f"{name}: parameters and multiply-adds at "
                        f"{report['crop']} x {report['crop']} (inference)")
    for col in ("module", "params", "MACs", "design params", "design MACs"):
        table.add_column(col, justify="left" if col == "module" else "right")
    rows = list(report["modules"].items()) + [("total", report["total"])]
    for name, row in rows:
        claim = DESIGN_BUDGET.get(name)
        spec = (_m(claim[0]), _g(claim[1])) if claim and report["crop"] == 256 else ("-", "-")
        table.add_row(LABELS.get(name, name), _m(row["params"]), _g(row["macs"]), *spec, end_section=name == "heads")
    console.print(table)
    console.print("MACs = FLOPs / 2 of convolutions, matmuls and attention (FlopCounterMode) plus the selective "
                  "scan (scan_macs); auxiliary heads count parameters only (they run in training). "
                  "The design's CNN figure is ResNet34 at 224 x 224 (README: Parameter budget).", style="dim")


def register(app: typer.Typer) -> None:
    app.command("count-params")(count_params_command)
