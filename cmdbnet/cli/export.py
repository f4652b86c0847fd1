"""``cmdb export``: parse flags, call :func:`cmdbnet.export.export`, print what was written."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cmdbnet.cli.common import JsonFlag, cli_errors, console, print_json
from cmdbnet.utils import format_bytes


@cli_errors
def export_command(
    source: Path = typer.Argument(..., metavar="RUN|CHECKPOINT", help="Run folder (best.pt, else last.pt) or checkpoint."),
    out: Path = typer.Option(..., "--out", "-o", help="The .onnx file to write."),
    tile: Optional[int] = typer.Option(None, "--tile",
                                       help="Fixed window size, a multiple of 32 (default: the run's predict tile, 512)."),
    batch: str = typer.Option("dynamic", "--batch", help="'dynamic' or a fixed number of windows per call."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset, 17..20 (17 loads in onnxruntime 1.17 and newer)."),
    boundary: bool = typer.Option(False, "--boundary/--no-boundary",
                                  help="Add the boundary probability as a second output (not for QGIS Deepness)."),
    check: bool = typer.Option(True, "--check/--no-check",
                               help="Compare onnxruntime with PyTorch before keeping the file (default on)."),
    as_json: bool = JsonFlag,
) -> None:
    """Export a trained network to one ONNX file for onnxruntime and QGIS's Deepness plugin.

    The Mamba branch is inside as ordinary ONNX ops: no custom op, no PyTorch needed to run it.
    The file carries its classes, palette, bands, normalisation, tile and overlap; Deepness
    fills in its settings from them, and `cmdb predict -k model.onnx` needs nothing else.

    Examples:

      cmdb export runs/potsdam -o potsdam.onnx

      cmdb export runs/potsdam/best.pt -o potsdam_256.onnx --tile 256 --batch 4

      cmdb export runs/potsdam -o potsdam_b.onnx --boundary --json
    """
    from cmdbnet.export import export

    s = export(source, out, tile=tile, batch=batch, opset=opset, boundary=boundary, check=check)
    if as_json:
        print_json(s)
        return
    line = (f"{s['output']}: {format_bytes(s['bytes'])}, {s['nodes']} nodes, tile {s['tile']}, batch {s['batch']}, "
            f"opset {s['opset']} (IR {s['ir_version']}), exported in {s['export_seconds']:.1f} s")
    if "check" in s:
        c = s["check"]
        line += (f"; onnxruntime vs PyTorch on {c['windows']} windows: max |dp| {c['max_abs_diff']:.1e}, "
                 f"arg-max agreement {100 * c['argmax_agreement']:.3f}%")
    console.print(line, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
