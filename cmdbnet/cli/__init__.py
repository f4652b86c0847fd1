"""The ``cmdb`` command line: a Typer app over the ``cmdbnet`` package.

Each module listed in ``_COMMAND_MODULES`` parses one command's flags and calls one
function of the package. Only commands that work are listed.
"""

from __future__ import annotations

import importlib

import typer

from cmdbnet.runtime import reuse_freed_memory

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
    "prepare",
    "predict",
    "train",
    "demo",
    "profile_vram",
    "count_params",
)

for _name in _COMMAND_MODULES:
    importlib.import_module(f"{__name__}.{_name}").register(app)


def main() -> None:
    """Console-script entry point."""
    reuse_freed_memory()
    app(prog_name="cmdb")
