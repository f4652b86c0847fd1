"""``cmdb evaluate``: score a checkpoint on a prepared split and print the table and protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cmdbnet.cli.common import ConfigOption, JsonFlag, cli_errors, console, err_console, print_json, settings_from
from cmdbnet.cli.tables import metrics_table, protocol_line
from cmdbnet.errors import CmdbError


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


def evaluate_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint file or run folder (best.pt is used)."),
    extra: Optional[Path] = typer.Argument(None, hidden=True),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Prepared folder (from cmdb prepare); or data.prepared in --config."),
    config: Optional[Path] = ConfigOption,
    split: str = typer.Option("val", "--split", help="Prepared split: val, or test for paper numbers."),
    tta: bool = typer.Option(False, "--tta", help="Test-time augmentation (flips and rotations, d4)."),
    ignore_clutter: bool = typer.Option(False, "--ignore-clutter", help="Means over the five ISPRS classes without clutter (as most papers report)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda (predict.device)."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Crops per forward pass (predict.batch, default 8)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Data-loader workers (data.workers)."),
    as_json: bool = JsonFlag,
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="Also write the result as JSON to this file "
                                            "(replaces an earlier result; any other file only with --overwrite)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Let --json-out replace a file that is not a result."),
) -> None:
    """Score a checkpoint on a prepared split: per-class table, means and the protocol used.

    Examples:

      cmdb evaluate runs/potsdam --data prepared/potsdam --split test --ignore-clutter

      cmdb evaluate runs/potsdam/best.pt --data prepared/potsdam --tta --json-out scores.json

      cmdb evaluate runs/potsdam -c examples/potsdam.yaml --json | jq .mIoU
    """
    if extra is not None:  # the old `--json FILE` form: never write over what may be another checkpoint
        raise CmdbError(f"unexpected argument {extra}: evaluate takes one checkpoint; to write the scores to a "
                        "file use --json-out FILE (nothing was written)")
    settings = settings_from(config, data={"prepared": data, "workers": workers},
                             predict={"device": device, "batch": batch})
    if settings.data.prepared is None:
        raise CmdbError("no prepared data: pass --data PREPARED (the output folder of cmdb prepare)")
    check_evaluate_inputs(checkpoint, settings.data.prepared, split)
    # Imported here, after the inputs are checked: torch takes seconds to import.
    from cmdbnet.evaluation import evaluate

    result = evaluate(checkpoint, settings.data.prepared, split=split, tta="d4" if tta else "none",
                      ignore_clutter=ignore_clutter, device=settings.predict.device, batch=batch,
                      workers=workers, json_out=json_out, progress=err_console.is_terminal,
                      overwrite=overwrite)
    for warning in result.get("warnings", []):
        typer.echo(f"cmdb: warning: {warning}", err=True)
    if as_json:
        print_json(result)
        return
    console.print(metrics_table(result, f"{Path(checkpoint)} on {split}"))
    console.print(protocol_line(result["protocol"]))
    if "positive_class" in result:
        pos = result["positive_class"]
        console.print(f"positive class {pos['class']}: IoU {pos['iou']:.4f}, F1 {pos['f1']:.4f}")
    if json_out:
        console.print(f"wrote {json_out}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(cli_errors(evaluate_command))
