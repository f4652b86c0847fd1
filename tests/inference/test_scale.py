"""City-scale predict: torchrun shards, window-row bands, resume, run lock, COG, VRT, GeoPackage.

Real processes (``torchrun --standalone`` with gloo on CPU), real rasterio files, a real small
checkpoint. The reference is an uninterrupted one-process run of the same folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import rasterio
import torch
from typer.testing import CliRunner

from cmdbnet.checkpoint import load_model
from cmdbnet.cli import app
from cmdbnet.errors import CmdbError
from cmdbnet.inference.files import predict
from cmdbnet.inference.resume import LOCK_NAME
from cmdbnet.inference.shards import assign, make_units, split_rows
from cmdbnet.inference.window import StripPredictor, axis_grid, emitted_rows
from cmdbnet.settings import IMAGENET_MEAN, IMAGENET_STD, PredictSettings

N_INPUTS = 5  # conftest's LAYOUT: big (320 x 320, split into bands under 2 ranks), a, b, c, d
NAMES = ["big", "a", "b", "c", "d"]
FLAGS = ["--tile", "64", "--overlap", "0.25", "--batch", "4", "--format", "both", "--probs", "--device", "cpu"]
SETTINGS = PredictSettings(tile=64, overlap=0.25, batch=4, format="both", probs=True, device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_ckpt, tmp_path_factory, city):
    """An uninterrupted one-process run over the folder: (inputs, outputs, summaries).

    One thread, as each torchrun rank has (OMP_NUM_THREADS=1): with another thread count
    oneDNN sums in another order and a few float16 probabilities move by one step.
    """
    root = tmp_path_factory.mktemp("ref")
    inputs = city.make_folder(root / "in")
    summaries = predict1(inputs, root / "out", tiny_ckpt, SETTINGS)
    return inputs, root / "out", summaries


def predict1(*args, **kwargs):
    """``predict`` in this process on one thread, like a torchrun rank (see ``reference``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return predict(*args, progress=False, **kwargs)
    finally:
        torch.set_num_threads(threads)


def tifs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tif"))}


def products(folder: Path) -> dict[str, tuple]:
    """Each output's pixels, profile and tags, less the input fingerprint: for outputs of a copy of the
    inputs, whose inode and ctime (part of the fingerprint) differ from the originals'."""
    out = {}
    for p in sorted(folder.glob("*.tif")):
        with rasterio.open(p) as d:
            tags = {k: v for k, v in d.tags().items() if k != "cmdb_fingerprint"}
            out[p.name] = (d.read().tobytes(), repr(d.profile), tags)
    return out


def torchrun(*args, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "cmdbnet", "predict", *[str(a) for a in args]]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


# ----------------------------------------------------------------------------- plan
def test_plan_balances_pixels_and_cuts_a_huge_raster_into_bands():
    pixels = [10_000, 9_000, 1_000, 1_000, 1_000, 1_000, 1_000]  # by count, 4 and 3 files; by pixels not
    shards = assign(make_units(pixels, [5] * len(pixels), 2), 2)
    loads = [sum(u.pixels for u in s) for s in shards]
    assert sorted(loads) == [12_000, 12_000]
    assert sorted(u.file for s in shards for u in s) == list(range(7)) and all(u.parts == 1 for s in shards for u in s)
    # one raster bigger than a rank's fair share: cut into window-row bands, one per rank
    units = make_units([90_000, 5_000, 5_000], [9, 2, 2], 2)
    big = [u for u in units if u.file == 0]
    assert [(u.part, u.parts, u.rows) for u in big] == [(0, 2, (0, 4)), (1, 2, (4, 9))] or \
           [(u.part, u.parts, u.rows) for u in big] == [(0, 2, (0, 5)), (1, 2, (5, 9))]
    assert sum(u.pixels for u in big) == 90_000
    shards = assign(units, 2)
    assert {u.file for u in shards[0] if u.file == 0} == {0} and {u.file for u in shards[1] if u.file == 0} == {0}
    assert make_units([90_000], [9], 1)[0].parts == 1  # alone: never split
    assert split_rows(7, 3) == [(0, 2), (2, 5), (5, 7)]


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.75])
def test_bands_of_window_rows_give_the_whole_run_bit_for_bit(tiny_ckpt, overlap, city):
    model, _ = load_model(tiny_ckpt)
    img = city.scene(168, 96, seed=9)
    sp = StripPredictor(model, IMAGENET_MEAN, IMAGENET_STD, 64, overlap, "none", 3, "cpu", probs=True)

    def read(rows, cols):
        return img[:, rows[:, None], cols[None, :]]

    def collect(window_rows=None):
        out = {}
        sp.run(read, 168, 96, lambda s: out.update({s.row0: (s.index, s.probs.numpy())}), window_rows=window_rows)
        return out

    whole = collect()
    gy = axis_grid(168, 64, overlap)
    spans = emitted_rows(gy)
    assert spans[0][0] == 0 and spans[-1][1] == 168 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    banded = {}
    for i0, i1 in split_rows(gy.count, 3):
        part = collect((i0, i1))
        assert sorted(part) == [r0 for r0, r1 in spans[i0:i1] if r1 > r0]
        banded.update(part)
    assert sorted(banded) == sorted(whole)
    for r0, (index, probs) in whole.items():
        assert np.array_equal(banded[r0][0], index) and np.array_equal(banded[r0][1], probs)


# ----------------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_two_ranks_write_the_same_bytes_as_one_process(reference, tmp_path):
    inputs, ref_out, ref_summaries = reference
    res = torchrun(inputs, "-o", tmp_path / "out", "-k", reference_ckpt(ref_summaries), *FLAGS,
                   "--vector", tmp_path / "out" / "city.gpkg")
    assert res.returncode == 0, res.stderr[-3000:]
    assert tifs(tmp_path / "out") == tifs(ref_out)
    # each rank traced its own masks; rank 0 merged the parts into one layer covering every mask
    pyogrio = pytest.importorskip("pyogrio")
    meta, _, _, fields = pyogrio.raw.read(tmp_path / "out" / "city.gpkg", layer="segments")
    cols = dict(zip(meta["fields"], fields))
    for name in NAMES:
        with rasterio.open(ref_out / f"{name}_mask.tif") as m:
            want = (m.read(1) < 6).sum() * m.res[0] * m.res[1]
        assert abs(cols["area"][cols["source"] == f"{name}_mask.tif"].sum() - want) <= 0.01 * want
    assert len(tifs(ref_out)) == 3 * N_INPUTS
    report = json.loads((tmp_path / "out" / "predict_summary.json").read_text())
    assert report["ranks"] == 2 and report["error"] is None and report["skipped"] == 0
    assert len(report["checkpoint_sha256"]) == 64 and report["settings"]["tile"] == 64
    by_name = {Path(f["input"]).stem: f for f in report["files"]}
    assert by_name["big"]["bands_split"] == 2 and by_name["big"]["ranks"] == [0, 1]  # the huge one, on both
    assert {f["rank"] for n, f in by_name.items() if n != "big"} == {0, 1}
    assert all(f["seconds"] > 0 for f in report["files"])
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no parts, no lock


def reference_ckpt(summaries) -> str:
    return summaries[0]["checkpoint"]


@pytest.mark.slow
def test_a_rank_that_fails_lets_the_other_finish_and_a_rerun_completes(reference, tmp_path, city):
    """One raster is cut short on disk: its rank stops there, the other rank finishes its
    whole shard; once the file is restored a re-run predicts only what is missing."""
    inputs, ref_out, ref_summaries = reference
    folder = tmp_path / "in"
    shutil.copytree(inputs, folder)
    good = (folder / "d.tif").read_bytes()
    (folder / "d.tif").write_bytes(good[: len(good) * 2 // 3])
    out = tmp_path / "out"
    res = torchrun(folder, "-o", out, "-k", reference_ckpt(ref_summaries), *FLAGS)
    assert res.returncode != 0 and "cannot read" in res.stderr and "d.tif" in res.stderr
    assert res.stderr.count("cmdb: error:") == 1  # said once, by rank 0, for both ranks
    names = [n for n, *_ in city.layout]
    done = {p.name for p in out.glob("[!.]*.tif")}
    rows = [axis_grid(h, 64, 0.25).count for _, h, *_ in city.layout]
    shards = assign(make_units([h * w for _, h, w, *_ in city.layout], rows, 2), 2)
    healthy = next(s for s in shards if all(names[u.file] != "d" for u in s))
    assert "d_mask.tif" not in done
    assert {f"{names[u.file]}_mask.tif" for u in healthy if u.parts == 1} <= done, done  # finished its shard
    assert not (out / LOCK_NAME).exists()
    ref = products(ref_out)
    got = products(out)
    for name in done:  # whatever was finished is final and right
        assert got[name] == ref[name]
    (folder / "d.tif").write_bytes(good)
    shutil.copystat(inputs / "d.tif", folder / "d.tif")
    summaries = predict1(folder, out, reference_ckpt(ref_summaries), SETTINGS)
    skipped = {Path(s["input"]).stem for s in summaries if s.get("skipped")}
    assert skipped == {n for n in names if f"{n}_mask.tif" in done}
    assert products(out) == ref


# ----------------------------------------------------------------------------- resume, lock
def test_rerun_skips_complete_outputs_and_redoes_a_truncated_one(reference, tmp_path):
    inputs, ref_out, ref_summaries = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    cut = (out / "a_probs.tif").read_bytes()
    (out / "a_probs.tif").write_bytes(cut[: len(cut) // 2])
    summaries = predict1(inputs, out, reference_ckpt(ref_summaries), SETTINGS)
    assert [Path(s["input"]).stem for s in summaries if not s.get("skipped")] == ["a"]
    assert tifs(out) == tifs(ref_out)
    res = CliRunner().invoke(app, ["predict", str(inputs), "-o", str(out), "-k", reference_ckpt(ref_summaries),
                                   *FLAGS])
    assert res.exit_code == 0 and res.stdout.count("skipped") == N_INPUTS, res.output
    again = predict1(inputs, out, reference_ckpt(ref_summaries), SETTINGS, overwrite=True)
    assert not any(s.get("skipped") for s in again) and tifs(out) == tifs(ref_out)
    other = predict(inputs, out, reference_ckpt(ref_summaries), SETTINGS.model_copy(update={"overlap": 0.5}),
                    progress=False)
    assert not any(s.get("skipped") for s in other)  # other settings: not this run's outputs


def test_a_second_run_on_the_same_folder_is_refused_and_a_stale_lock_taken_over(reference, tmp_path):
    inputs, _, ref_summaries = reference
    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_NAME
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00Z"}))
    res = CliRunner().invoke(app, ["predict", str(inputs / "a.tif"), "-o", str(out), "-k",
                                   reference_ckpt(ref_summaries), "--tile", "64"])
    err = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(err) == 1 and "Traceback" not in res.output
    assert err[0].startswith("cmdb: error: another cmdb predict") and f"pid {os.getpid()}" in err[0]
    assert str(lock) in err[0] and os.listdir(out) == [LOCK_NAME]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    (out / ".a_mask.tif.x1y2.part.tif").write_bytes(b"left by a killed run")
    (out / ".notes.txt.k3j4.part.txt").write_bytes(b"another program's temporary file")
    predict(inputs / "a.tif", out, reference_ckpt(ref_summaries), SETTINGS, progress=False)
    assert sorted(os.listdir(out)) == [".notes.txt.k3j4.part.txt", "a_color.tif", "a_mask.qml", "a_mask.tif",
                                       "a_probs.tif", "mosaic.qml", "mosaic.vrt", "predict_summary.json"]
    with pytest.raises(CmdbError, match="another cmdb predict"):
        lock.write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
        predict(inputs / "a.tif", out, reference_ckpt(ref_summaries), SETTINGS, progress=False)


@pytest.mark.slow
def test_a_rank_killed_mid_run_loses_only_its_files_in_flight(reference, tmp_path):
    """SIGKILL one rank while it works; torchrun ends the run; a re-run completes it identically."""
    inputs, ref_out, ref_summaries = reference
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "cmdbnet",
           "predict", str(inputs), "-o", str(out), "-k", reference_ckpt(ref_summaries), *FLAGS]
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = None
    try:
        deadline = time.monotonic() + 300
        while killed is None and launcher.poll() is None and time.monotonic() < deadline:
            if list(out.glob("[!.]*_mask.tif")):  # a first file is final: ranks are mid-run
                for child in psutil.Process(launcher.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        if child.environ().get("RANK") == "1":
                            child.kill()
                            killed = child.pid
            time.sleep(0.05)
        assert launcher.wait(timeout=120) != 0 and killed, "the run ended before a rank could be killed"
    finally:
        if launcher.poll() is None:
            launcher.kill()
    ref = tifs(ref_out)
    done = {p.name: p.read_bytes() for p in out.glob("[!.]*.tif")}
    assert len(done) < len(ref) and all(ref[name] == data for name, data in done.items())
    summaries = predict1(inputs, out, reference_ckpt(ref_summaries), SETTINGS)
    assert {Path(s["input"]).stem for s in summaries if s.get("skipped")} == \
           {name.rsplit("_", 1)[0] for name in done if name.endswith("_mask.tif")}
    assert tifs(out) == ref and not list(out.glob(".*"))  # parts of the killed run cleaned up
