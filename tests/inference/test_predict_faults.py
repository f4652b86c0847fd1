"""A disk that fills up while predict writes: one error line, nothing under a final name."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys

import pytest


def _small_disk():
    """Files this process writes may not grow past 60 kB: writes then fail as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))


@pytest.mark.parametrize("extra", [[], ["--cog"]])
def test_a_full_disk_leaves_no_output_under_a_final_name(tiny_ckpt, city, tmp_path, extra):
    src = city.write_tif(tmp_path / "scene.tif", 192, 192, seed=1)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cmdbnet", "predict", str(src), "-o", str(out), "-k", str(tiny_ckpt),
           "--tile", "64", "--probs", "--format", "both", "--device", "cpu", *extra]
    res = subprocess.run(cmd, preexec_fn=_small_disk, capture_output=True, text=True, timeout=300)
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert err[-1].startswith("cmdb: error: cannot write") and "disk full" in err[-1], err[-1]
    assert not [line for line in err if "File too large" in line], err  # libtiff's raw _tiffWriteProc line
    assert not out.exists()  # no product, no part, no lock, not even the folder it made
