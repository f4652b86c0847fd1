"""The ``cmdb`` command line: a Typer app over the ``cmdbnet`` package.

Each module listed in ``_COMMAND_MODULES`` parses one command's flags and calls one
function of the package. Only commands that work are listed.
"""

from __future__ import annotations

import importlib
import signal
import sys
import warnings

import click
import typer

from cmdbnet.utils import reuse_freed_memory

app = typer.Typer(
    name="cmdb",
    help="cmdbnet: CNN + Mamba semantic segmentation of aerial imagery on a 6 GB GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_COMMAND_MODULES = (
    "config",
    "synth",
    "prepare",
    "train",
    "evaluate",
    "predict",
    "export",
    "demo",
    "ablation",
    "profile_vram",
    "count_params",
    "weights",
    "doctor",
)

for _name in _COMMAND_MODULES:
    importlib.import_module(f"{__name__}.{_name}").register(app)


def _usage_errors() -> tuple[type[Exception], ...]:
    """click's UsageError, and the one of the click copy recent typer releases vendor."""
    try:
        from typer._click.exceptions import UsageError as Vendored  # typer >= 0.2x ships its own click
    except ImportError:
        return (click.UsageError,)
    return (click.UsageError, Vendored)


_USAGE_ERRORS = _usage_errors()


def warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning raised anywhere in a command: one ``cmdb: warning:`` line, no source excerpt."""
    typer.echo(f"cmdb: warning: {' '.join(str(message).strip().splitlines())}", err=True)


def main() -> None:
    """Console-script entry point: a flag or value click rejects is one line too, like any bad input;
    a warning from any library is one ``cmdb: warning:`` line."""
    reuse_freed_memory()
    warnings.showwarning = warning_line
    try:
        code = app(prog_name="cmdb", standalone_mode=False)
    except _USAGE_ERRORS as exc:
        hint = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None and exc.ctx.parent else ""
        typer.echo(f"cmdb: error: {exc.format_message()}{hint}", err=True)
        sys.exit(2)
    except (click.Abort, typer.Abort):
        typer.echo("cmdb: interrupted", err=True)
        sys.exit(130)
    # The command has finished: a Ctrl-C during interpreter teardown (torch's takes a while)
    # must not turn a completed run into a signal death with no message.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code if isinstance(code, int) else 0)
