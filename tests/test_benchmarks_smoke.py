"""The GPU check and the launch counter, at tiny shapes on CPU, so neither rots before a GPU arrives."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CMDB_SCAN_BACKEND", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# earlier results\n")
    _run("gpu.py", "--smoke", "--results", str(results))
    text = results.read_text()
    assert text.startswith("# earlier results\n")
    assert "## GPU check (issue 11): `python benchmarks/gpu.py --smoke`" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert {r.split("|")[1].strip() for r in rows[1:]} >= {"a", "b", "c", "d", "e", "f"}
    errors = {m[0]: float(m[1]) for m in re.findall(r"\| a \| `(\w+)` vs CPU chunked scan.*?\| ([0-9.e+-]+) \|", text)}
    assert set(errors) == {"native", "torch", "torch_parallel", "triton"}  # triton through its interpreter
    assert all(e <= 1e-4 for e in errors.values()), errors


@pytest.mark.slow
def test_launch_counter_smoke():
    out = _run("launches.py", "--smoke").stdout
    totals = [int(t.replace(",", "")) for t in re.findall(r"\*\*([\d,]+)\*\*", out)]
    assert len(totals) == 3 and totals[0] > totals[1] > totals[2] > 1000  # torch, torch_parallel, triton
    assert "torch_parallel: total" in out and "triton: total" in out
