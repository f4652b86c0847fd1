"""``cmdb config``: show the settings in force."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cmdbnet.cli.common import ConfigOption, JsonFlag, cli_errors, print_json, settings_from

config_app = typer.Typer(help="Inspect settings.", no_args_is_help=True)


@config_app.command("show")
@cli_errors
def config_show_command(config: Optional[Path] = ConfigOption, as_json: bool = JsonFlag) -> None:
    """Print the effective settings (defaults < --config file < CMDB_* environment).

    Examples:

      cmdb config show

      cmdb config show --config examples/potsdam.yaml

      CMDB_TRAIN__BATCH=2 cmdb config show --json
    """
    settings = settings_from(config)
    if as_json:
        print_json(settings.model_dump(mode="json"))
    else:
        typer.echo(settings.to_yaml(), nl=False)


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
