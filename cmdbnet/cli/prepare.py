"""``cmdb prepare``: raw tiles -> crops + manifest, resumable and atomic."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Optional

import typer

from cmdbnet.cli.common import ConfigOption, JsonFlag, cli_errors, console, print_json, settings_from
from cmdbnet.errors import CmdbError


def _warn_line(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo(f"cmdb: warning: {message}", err=True)


@cli_errors
# Long only by its signature: typer declares one parameter per flag.
def prepare_command(
    dataset: Optional[str] = typer.Argument(None, help="potsdam, vaihingen, loveda, or your dataset.yaml "
                                                       "(default: data.dataset)."),
    root: Optional[Path] = typer.Option(None, "--root", "-r", help="Raw dataset folder (download or pre-split); "
                                        "a dataset YAML names its own folders."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Prepared folder to write (data.prepared)."),
    crop: Optional[int] = typer.Option(None, "--crop", help="Crop size in pixels (default 256)."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Step between crops (default: the crop size)."),
    eroded: Optional[bool] = typer.Option(None, "--eroded/--full-labels",
                                          help="Use the eroded (noBoundary) ISPRS labels: boundaries -> ignore."),
    bands: Optional[str] = typer.Option(None, "--bands", help="rgb, irrg or rgbir (default per dataset), or band "
                                        "numbers in the order wanted, e.g. 4,3,2."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Tiles cut in parallel processes (0 = here)."),
    images: Optional[Path] = typer.Option(None, "--images", help="With --init: folder of your images."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="With --init: folder of label rasters, or a "
                                          "vector file (GeoPackage, Shapefile, GeoJSON, FlatGeobuf)."),
    init: Optional[Path] = typer.Option(None, "--init", help="Write a starter dataset YAML here from a look at "
                                        "--images and --labels (cmdb prepare custom ... --init d.yaml), then stop."),
    config: Optional[Path] = ConfigOption,
    as_json: bool = JsonFlag,
) -> None:
    """Cut raw dataset tiles into training crops plus OUT/manifest.json.

    Writes OUT/{train,val,test}/{images,labels}/<stem>.tif, one GeoTIFF per crop.

    Splits: ISPRS download layouts follow the official lists (val = a few
    official train tiles, named in the manifest); pre-split and LoveDA
    layouts keep their folders; a dataset YAML says its own (images by
    name or fraction, or spatial blocks, drawn in OUT/split.png).
    Re-running skips finished tiles.

    Examples:

      cmdb prepare potsdam --root data/Potsdam --out prepared/potsdam --crop 256

      cmdb prepare vaihingen -r data/Vaihingen -o prep/vai --eroded --stride 128

      cmdb prepare loveda -r data/LoveDA -o prep/loveda --crop 512 -w 8 --json

      cmdb prepare my-data.yaml --out prepared/mine --bands 4,3,2

      cmdb prepare custom --images scenes/ --labels roofs.gpkg --init my-data.yaml
    """
    from cmdbnet.data.preparation import PrepareWarning, prepare

    if init is not None or images is not None or labels is not None:
        if init is None or images is None or labels is None or dataset not in (None, "custom"):
            raise CmdbError("a starter dataset YAML needs all of: cmdb prepare custom --images DIR --labels DIR|FILE "
                            "--init dataset.yaml")
        from cmdbnet.data.starter import write_starter

        found = write_starter(images, labels, init)
        if as_json:
            print_json(found)
        else:
            console.print(f"wrote {init}: check its class names, then run: cmdb prepare {init} --out PREPARED")
        return

    settings = settings_from(config, data={"dataset": dataset, "root": root, "prepared": out, "crop": crop,
                                           "stride": stride, "eroded": eroded, "bands": bands, "workers": workers})
    d = settings.data
    if d.prepared is None:
        raise CmdbError("no output folder given: pass --out (or set data.prepared)")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("always", PrepareWarning)
        warnings.showwarning = _warn_line
        manifest = prepare(d.dataset, d.root, d.prepared, crop=d.crop, stride=d.stride, eroded=d.eroded,
                           bands=d.bands, workers=d.workers, progress=not as_json)
    summary = {k: v for k, v in manifest.items() if k != "crops"}
    if as_json:
        print_json({"out": str(d.prepared), **summary})
        return
    from rich.table import Table

    table = Table(title=f"{manifest['title']} -> {d.prepared}")
    splits = list(manifest["splits"])
    table.add_column("")
    for split in splits:
        table.add_column(split, justify="right")
    for what in ("tiles", "crops"):
        table.add_row(what, *(str(manifest["splits"][s][what]) for s in splits))
    for name in (*manifest["classes"], "ignored"):
        shares = []
        for split in splits:
            pixels = manifest["class_pixels"][split]
            shares.append(f"{100 * pixels[name] / max(sum(pixels.values()), 1):.1f}%")
        table.add_row(name, *shares)
    console.print(table)
    console.print(f"crop {manifest['crop']}, stride {manifest['stride']}, bands {manifest['bands']} "
                  f"({manifest['band_count']} x {manifest['dtype']}), eroded {manifest['eroded']}; "
                  f"split policy: {manifest['split_policy']['policy']}; {time.perf_counter() - start:.1f} s")


def register(app: typer.Typer) -> None:
    app.command("prepare")(prepare_command)
