"""``cmdb predict``: parse flags, call :func:`cmdbnet.inference.files.predict`, print summaries."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cmdbnet.cli.common import ConfigOption, JsonFlag, cli_errors, console, print_json, settings_from
from cmdbnet.utils import format_bytes


def summary_line(s: dict) -> str:
    """One line per file: what was read, how fast, and where the products went."""
    outs = ", ".join(s["outputs"].values())
    return (f"{Path(s['input']).name}: {s['width']}x{s['height']} px, {s['bands']} bands, "
            f"{s['windows']} windows in {s['seconds']:.1f} s ({s['mpx_per_s']:.2f} Mpx/s, "
            f"strip buffer {format_bytes(s['accumulator_bytes'])}) -> {outs}"
            + (f"; compiled in {s['compile_seconds']:.1f} s" if "compile_seconds" in s else
               f"; compile {s['compile']}" if s.get("compile", "off") != "off" else ""))


def predict_cmd(
    inputs: list[str] = typer.Argument(..., metavar="INPUT...",
                                       help="Raster files, folders or glob patterns (GeoTIFF, PNG, JPEG, ...)."),
    out: Path = typer.Option(..., "--out", "-o",
                             help="Output .tif for one input, else a folder (<stem>_mask.tif, ...)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", "-k",
                                    help="Checkpoint file or run folder (best.pt, else last.pt)."),
    tile: Optional[int] = typer.Option(None, "--tile",
                                       help="Window size in pixels, a multiple of 32 (default 512)."),
    overlap: Optional[float] = typer.Option(None, "--overlap", help="Window overlap fraction, 0..0.75 (default 0.25)."),
    tta: Optional[str] = typer.Option(None, "--tta",
                                      help="Test-time augmentation: none, flip (3 views) or d4 (8) (default none)."),
    batch: Optional[int] = typer.Option(None, "--batch", "-b", help="Windows per forward pass (default 4)."),
    fmt: Optional[str] = typer.Option(None, "--format",
                                      help="index (palette mask), color (RGBA) or both (default index)."),
    probs: Optional[bool] = typer.Option(None, "--probs/--no-probs",
                                         help="Also write per-class probabilities (float16)."),
    boundary: Optional[bool] = typer.Option(None, "--boundary/--no-boundary",
                                            help="Also write the boundary probability (uint8, value/255)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda (default auto)."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Mixed precision (fp16 on CUDA, bf16 on CPU)."),
    compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                            help="torch.compile the network (only on enough windows to pay back)."),
    config: Optional[Path] = ConfigOption,
    as_json: bool = JsonFlag,
) -> None:
    """Segment images of any size into mask GeoTIFFs with the input's CRS and transform.

    Overlapping windows are blended smoothly, strip by strip: memory stays bounded on any size.

    Classes, palette, bands and normalisation all come from the checkpoint.

    Nodata in the input (nodata value, mask or alpha band) stays nodata (255) in the mask.

    Examples:

      cmdb predict top_potsdam_2_13_RGB.tif -o mask.tif --checkpoint runs/potsdam

      cmdb predict tiles/ -o masks/ -k runs/potsdam --format both --tta flip

      cmdb predict "scenes/*.png" -o out/ -k best.pt --probs --boundary --json
    """
    from cmdbnet.inference.files import predict

    settings = settings_from(config, predict={
        "tile": tile, "overlap": overlap, "tta": tta, "batch": batch, "format": fmt,
        "probs": probs, "boundary": boundary, "device": device, "amp": amp,
        "compile": compile_})
    summaries = predict(inputs, out, checkpoint, settings.predict, progress=not as_json)
    if as_json:
        print_json(summaries)
    else:
        for s in summaries:
            console.print(summary_line(s), highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("predict")(cli_errors(predict_cmd))
