"""What every command shares: error reporting, settings from flags, consoles, JSON output.

The command modules beside this one only parse flags and call the package; anything
worth testing lives in the workflow packages.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer
from rich.console import Console

from cmdbnet.errors import CmdbError
from cmdbnet.settings import Settings, load_settings
from cmdbnet.utils import disk_full_cause, disk_full_error

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

ConfigOption = typer.Option(None, "--config", "-c", help="YAML settings file (sections data, model, train, predict).",
                            exists=False, dir_okay=False)
JsonFlag = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table.")


def fail(message: str, code: int = 2) -> None:
    """Print one line on stderr and exit: the contract for every bad input."""
    typer.echo(f"cmdb: error: {message}", err=True)
    raise typer.Exit(code)


def cli_errors(fn: F) -> F:
    """Turn user errors into one stderr line and a non-zero exit instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CmdbError as exc:
            for line in user_lines(exc):
                typer.echo(f"cmdb: error: {line}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("cmdb: interrupted", err=True)
            raise typer.Exit(130) from None
        except OSError as exc:  # a full disk in a write that is not ours (TensorBoard, a library)
            full = disk_full_cause(exc)
            if full is None:
                raise
            typer.echo(f"cmdb: error: {disk_full_error(full.filename or 'a file', full.strerror)}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def user_lines(exc: CmdbError) -> list[str]:
    """The message lines of a user error; one raised in a data-loader worker comes wrapped in its traceback."""
    text = str(exc)
    if "\nOriginal Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        return [last.split("Error: ", 1)[-1] if last.startswith("cmdbnet.errors.") else last]
    return text.splitlines() or ["failed"]


def settings_from(config: Optional[Path], **sections: dict[str, Any]) -> Settings:
    """Effective settings for a command: file < environment < the flags given (None = not given)."""
    return load_settings(config, {name: values for name, values in sections.items()})


def print_json(obj: Any) -> None:
    """JSON to stdout, nothing else, so ``cmdb X --json | jq`` works."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()
