"""``cmdb demo``: the whole job on built-in synthetic data."""

from __future__ import annotations

from pathlib import Path

import typer

from cmdbnet.cli.common import JsonFlag, cli_errors, console, err_console, print_json
from cmdbnet.cli.tables import metrics_table, protocol_line


def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Folder for everything the demo writes."),
    minutes: float = typer.Option(5.0, "--minutes", "-m", min=0.5, help="Time budget for the whole demo."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = JsonFlag,
) -> None:
    """The whole job on built-in synthetic data, in about five minutes on a CPU.

    Generates Potsdam-like scenes, prepares them, trains the full network, evaluates on
    held-out scenes and predicts one of them to a GeoTIFF mask plus a PNG preview.

    Examples:

      cmdb demo

      cmdb demo --minutes 2 --out /tmp/demo

      cmdb demo --device cuda --minutes 10
    """
    from cmdbnet.demo import run_demo

    say = (lambda msg: err_console.print(msg)) if as_json else (lambda msg: console.print(f"[bold]{msg}[/]"))
    result = run_demo(out, minutes=minutes, device=device, seed=seed, progress=not as_json, say=say)
    if as_json:
        print_json(result)
        return
    scores = result["test"]
    console.print(metrics_table(scores, "held-out test scenes"))
    console.print(protocol_line(scores["protocol"]))
    t = result["train"]
    console.print(f"trained {t['steps']} steps (best val mIoU {100 * t['best_val_mIoU']:.2f}); "
                  f"whole demo {t['minutes']:.1f} min")
    for name, path in {**result["paths"], "mask": result["predict"]["mask"],
                       "preview": result["predict"]["preview"]}.items():
        console.print(f"  {name:12s} {path}")


def register(app: typer.Typer) -> None:
    app.command("demo")(cli_errors(demo_command))
