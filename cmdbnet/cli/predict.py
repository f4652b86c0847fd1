"""``cmdb predict``: parse flags, call :func:`cmdbnet.inference.files.predict`, print summaries."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import typer

from cmdbnet.cli.common import ConfigOption, JsonFlag, cli_errors, console, print_json, settings_from
from cmdbnet.errors import CmdbError
from cmdbnet.utils import format_bytes


def summary_line(s: dict) -> str:
    """One line per file: what was read, how fast, and where the products went."""
    outs = ", ".join(s["outputs"].values())
    if s.get("skipped"):
        return f"{Path(s['input']).name}: complete from an earlier run, skipped -> {outs}"
    return (f"{Path(s['input']).name}: {s['width']}x{s['height']} px, {s['bands']} bands, "
            f"{s['windows']} windows in {s['seconds']:.1f} s ({s['mpx_per_s']:.2f} Mpx/s, "
            f"strip buffer {format_bytes(s['accumulator_bytes'])}) -> {outs}"
            + (f"; compiled in {s['compile_seconds']:.1f} s" if "compile_seconds" in s else
               f"; compile {s['compile']}" if s.get("compile", "off") != "off" else ""))


# Long only by its signature: typer declares one parameter per flag.
def predict_command(
    inputs: list[str] = typer.Argument(..., metavar="INPUT...",
                                       help="Raster files, folders or glob patterns (GeoTIFF, PNG, JPEG, ...)."),
    out: Path = typer.Option(..., "--out", "-o",
                             help="Output .tif for one input, else a folder (<stem>_mask.tif, ...)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", "-k",
                                    help="Checkpoint file, run folder (best.pt, else last.pt) or `cmdb export`ed .onnx."),
    tile: Optional[int] = typer.Option(None, "--tile",
                                       help="Window size in pixels, a multiple of 32 (default 512; an .onnx uses its own)."),
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
    cog: Optional[bool] = typer.Option(None, "--cog/--no-cog",
                                       help="Cloud-Optimised GeoTIFFs: overviews, streamable by QGIS and web maps."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Predict again even where complete outputs of an identical run exist, and "
                                        "replace output files cmdb did not write."),
    vector: Optional[Path] = typer.Option(None, "--vector", help="Also write the masks' polygons to this .gpkg."),
    vector_classes: Optional[str] = typer.Option(None, "--vector-classes",
                                                 help="Comma-separated classes to polygonise (default all)."),
    keep_going: bool = typer.Option(False, "--keep-going",
                                    help="Skip unreadable inputs; report them and exit 2 at the end."),
    compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                            help="torch.compile the network (only on enough windows to pay back)."),
    config: Optional[Path] = ConfigOption,
    as_json: bool = JsonFlag,
) -> None:
    """Segment images of any size into mask GeoTIFFs with the input's CRS and transform.

    Overlapping windows are blended smoothly, strip by strip: memory stays bounded on any size.

    Classes, palette, bands and normalisation all come from the checkpoint (or the .onnx file).

    Nodata in the input (nodata value, mask or alpha band) stays nodata (255) in the mask.

    Examples:

      cmdb predict top_potsdam_2_13_RGB.tif -o mask.tif --checkpoint runs/potsdam

      cmdb predict tiles/ -o masks/ -k runs/potsdam --format both --tta flip

      cmdb predict "scenes/*.png" -o out/ -k best.pt --probs --boundary --json

      cmdb predict city/ -o masks/ -k model.onnx --device cpu   (onnxruntime, no checkpoint)

      torchrun --nproc-per-node 4 -m cmdbnet predict city/ -o masks/ -k best.pt --cog --vector city.gpkg

    A folder run writes mosaic.vrt and predict_summary.json beside the masks; re-running it
    skips outputs that are complete.
    """

    from cmdbnet.inference.files import PredictNote, predict

    settings = settings_from(config, predict={
        "tile": tile, "overlap": overlap, "tta": tta, "batch": batch, "format": fmt,
        "probs": probs, "boundary": boundary, "device": device, "amp": amp, "cog": cog,
        "compile": compile_})
    classes = [c.strip() for c in vector_classes.split(",") if c.strip()] if vector_classes else None
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 reports for all
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always", PredictNote)
        try:
            summaries = predict(inputs, out, checkpoint, settings.predict, progress=not as_json,
                                overwrite=overwrite, vector=vector, vector_classes=classes,
                                keep_going=keep_going)
        except CmdbError:
            if not main_rank:  # every rank has the same message: say it once
                raise typer.Exit(2) from None
            raise
    if not main_rank:
        return
    for note in notes:
        kind = "note" if issubclass(note.category, PredictNote) else "warning"
        typer.echo(f"cmdb: {kind}: {note.message}", err=True)
    if as_json:
        print_json(summaries)
    else:
        for s in summaries:
            if "error" not in s:
                console.print(summary_line(s), highlight=False, soft_wrap=True)
    failed = [s["error"] for s in summaries if "error" in s]
    if failed:
        raise CmdbError("\n".join(failed + [f"{len(failed)} of {len(summaries)} inputs failed"]))


def register(app: typer.Typer) -> None:
    app.command("predict")(cli_errors(predict_command))
