"""``cmdb weights``: fetch torchvision's ImageNet backbone weights into the cache, list the cache."""

from __future__ import annotations

from typing import Optional

import typer

from cmdbnet.cli.common import JsonFlag, cli_errors, console, err_console, print_json
from cmdbnet.utils import format_bytes

weights_app = typer.Typer(help="ImageNet weights for the CNN backbone (torch hub cache).", no_args_is_help=True)


@weights_app.command("fetch")
@cli_errors
def fetch_cmd(
    names: Optional[list[str]] = typer.Argument(None, metavar="[resnet18|resnet34|resnet50]...",
                                                help="Backbones to fetch (default resnet34, the default backbone)."),
    timeout: float = typer.Option(30.0, "--timeout", min=0.1, help="Seconds without an answer before giving up."),
    force: bool = typer.Option(False, "--force", help="Download again even if the file is cached."),
) -> None:
    """Download ImageNet weights into the torch hub cache, checked against the hash in their name.

    The cache is $TORCH_HOME/hub/checkpoints (default ~/.cache/torch): copy that folder to an
    air-gapped machine and model.pretrained=auto|required finds the weights there.

    Examples:

      cmdb weights fetch

      cmdb weights fetch resnet18 resnet50

      CMDB_WEIGHTS_URL=http://mirror.local/models/ cmdb weights fetch resnet34
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from cmdbnet import weights

    for name in names or ["resnet34"]:
        weights.weights_url(name)  # a bad name or CMDB_WEIGHTS_URL: one error line, before any progress bar
    for name in names or ["resnet34"]:
        before = "missing" if force else weights.cache_state(name)
        with Progress(TextColumn(name), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      console=err_console, transient=True) as bar:
            task = bar.add_task(name, total=None)
            path = weights.fetch(name, timeout=timeout, force=force,
                                 progress=lambda done, total, t=task: bar.update(t, completed=done, total=total))
        state = {"ok": "already cached, sha256 checked", "missing": "downloaded, sha256 checked",
                 "corrupt": "the cached file's sha256 did not match its name: downloaded again, sha256 checked"}[before]
        console.print(f"{name}: {path} ({format_bytes(path.stat().st_size)}, {state})", highlight=False,
                      soft_wrap=True)


@weights_app.command("list")
@cli_errors
def list_cmd(as_json: bool = JsonFlag) -> None:
    """Show the weights in the torch hub cache with their sha256 and whether it matches their name."""
    from cmdbnet import weights

    rows = weights.list_cached()
    if as_json:
        print_json({"cache": str(weights.cache_dir()),
                    "files": [{"name": r.name, "path": str(r.path), "bytes": r.size, "sha256": r.sha256,
                               "checksum_ok": r.ok} for r in rows]})
        return
    console.print(f"cache: {weights.cache_dir()}", highlight=False, soft_wrap=True)
    if not rows:
        console.print("no weights cached (cmdb weights fetch resnet34 downloads the default backbone's)")
    for r in rows:
        check = "ok" if r.ok else "MISMATCH (re-fetch with --force)"
        console.print(f"{r.name:10s} {r.path.name}  {format_bytes(r.size):>10s}  sha256 {r.sha256}  {check}",
                      highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(weights_app, name="weights")
