"""The ``cmdb`` entry point: flags click rejects are one line and exit 2, like every bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _cmdb(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cmdbnet", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, says", [(["count-params", "--crop", "abc"], "Invalid value for '--crop'"),
                                        (["count-params", "--bogus"], "No such option: --bogus"),
                                        (["evaluate"], "Missing argument"),
                                        (["nosuch"], "No such command 'nosuch'")])
def test_usage_errors_are_one_line_and_exit_2(args, says):
    proc = _cmdb(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cmdb: error: ") and says in lines[0], proc.stderr


def test_help_and_success_exit_0():
    proc = _cmdb("--help")
    assert proc.returncode == 0 and "prepare" in proc.stdout and proc.stderr == ""
    proc = _cmdb("config", "show", "--json")
    assert proc.returncode == 0 and proc.stdout.lstrip().startswith("{")
