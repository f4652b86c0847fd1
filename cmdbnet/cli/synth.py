"""``cmdb synth``: write synthetic aerial scenes in a dataset's raw download layout."""

from __future__ import annotations

from pathlib import Path

import typer

from cmdbnet.cli.common import JsonFlag, cli_errors, console, print_json


def synth_command(
    dataset: str = typer.Argument(..., help="potsdam, vaihingen or loveda."),
    out: Path = typer.Option(..., "--out", "-o", help="New (or empty) folder for the raw scenes."),
    tiles: int = typer.Option(6, "--tiles", "-n", help="Number of tiles; 3 or more fill train, val and test."),
    size: int = typer.Option(512, "--size", "-s", help="Tile size in pixels (short side)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the one random generator."),
    as_json: bool = JsonFlag,
) -> None:
    """Write synthetic aerial scenes in a dataset's raw download layout.

    ISPRS scenes are GeoTIFFs in the dataset's projected CRS and pixel size,
    with full and eroded colour labels; LoveDA scenes are PNGs with index
    masks in Train/Val and Urban/Rural. For demos and tests.

    Examples:

      cmdb synth potsdam --out demo/raw --tiles 6 --size 512

      cmdb synth loveda --out demo/loveda --tiles 9 --seed 3
    """
    from cmdbnet.data.synthetic import synth

    scenes = synth(dataset, out, tiles=tiles, size=size, seed=seed)
    rows = [{"tile_id": t.tile_id, "split": t.split, "scene": t.scene,
             "size": list(t.truth.shape), "images": {k: str(v) for k, v in t.images.items()},
             "label": str(t.label), "eroded_label": str(t.eroded_label) if t.eroded_label else None}
            for t in scenes.tiles]
    if as_json:
        print_json({"dataset": scenes.dataset, "root": str(scenes.root), "tiles": rows})
        return
    for row in rows:
        scene = f" {row['scene']}" if row["scene"] else ""
        console.print(f"{row['split']:5s} {row['tile_id']:>5s}{scene}  {row['size'][1]}x{row['size'][0]}  "
                      f"{', '.join(row['images'].values())}")
    console.print(f"{len(rows)} synthetic {scenes.dataset} tiles in {scenes.root}")


def register(app: typer.Typer) -> None:
    app.command("synth")(cli_errors(synth_command))
