"""The reliability matrix: every command x every class of bad input that applies to it.

Each case must end with exit status 2, exactly one ``cmdb: error:`` line on stderr that names
the path or field at fault, no traceback, and nothing new under a final name. Cases run
in-process through Typer's CliRunner (fast); one runs in a real subprocess with data-loader
workers, where an error crosses a process boundary. The slow half (SIGKILL / SIGINT at random
points) is ``benchmarks/faults.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
import torch
import yaml
from typer.testing import CliRunner

from cmdbnet.api import train
from cmdbnet.cli import app
from cmdbnet.settings import load_settings

TINY_MODEL = {"backbone": "resnet18", "pretrained": "off", "mamba_depths": [1, 1, 1, 1], "d_state": 4,
              "fusion_channels": 32}


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _write_tif(path: Path, array: np.ndarray) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", height=array.shape[1], width=array.shape[2],
                           count=array.shape[0], dtype=array.dtype) as dst:
            dst.write(array)
    return path


@pytest.fixture(scope="module")
def world(prepared_potsdam, synth_potsdam_raw, tmp_path_factory) -> SimpleNamespace:
    """Read-only inputs shared by the cases: a raw folder, a prepared folder, a one-step run, bad files."""
    base = tmp_path_factory.mktemp("matrix")
    cfg = base / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"model": TINY_MODEL, "data": {"crop": 64, "workers": 0},
                                   "train": {"batch": 2, "accum": 1, "max_steps": 1, "amp": False, "device": "cpu",
                                             "warmup_steps": 0, "log_images": 0}}))
    run = base / "run"
    train(load_settings(cfg, {"data": {"prepared": prepared_potsdam}, "train": {"out": run}}), progress=False)
    good = torch.load(run / "last.pt", weights_only=True)
    bad = base / "bad"
    bad.mkdir()
    torch.save({"format": "cmdbnet-checkpoint", "version": 1, "model": {}, "payload": Evil()}, bad / "evil.pt")
    data = (run / "last.pt").read_bytes()
    (bad / "truncated.pt").write_bytes(data[: len(data) // 2])
    key = next(k for k, v in good["model"].items() if "running_var" in k)
    good["model"][key] = torch.full_like(good["model"][key], float("nan"))
    torch.save(good, bad / "nan.pt")
    (bad / "empty.tif").write_bytes(b"")
    (bad / "corrupt.tif").write_bytes(b"II*\x00" + os.urandom(2000))
    rgb = np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8)
    tif = _write_tif(bad / "scene.tif", rgb)
    (bad / "truncated.tif").write_bytes(tif.read_bytes()[:3000])
    _write_tif(bad / "two_bands.tif", rgb[:2])
    _write_tif(bad / "int32.tif", rgb.astype(np.int32))
    (bad / "a_file").write_text("not a folder")
    return SimpleNamespace(raw=synth_potsdam_raw.root, prepared=prepared_potsdam, run=run, cfg=cfg, bad=bad,
                           tif=tif, good=good)


@dataclass
class Case:
    """What to run, what the one error line must name, and what must not appear or change."""

    args: list[str]
    needle: str
    absent: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def _copy_prepared(w, tmp: Path) -> Path:
    dst = tmp / "prepared"
    shutil.copytree(w.prepared, dst)
    return dst


def _edit_manifest(w, tmp: Path, **changes) -> Path:
    dst = _copy_prepared(w, tmp)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest.update(changes)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _raw_with(w, tmp: Path, image: np.ndarray | None = None, label: np.ndarray | None = None,
              raw_bytes: bytes | None = None) -> tuple[Path, Path]:
    """A copy of the raw folder with tile 2_12's image (or label) replaced; returns (root, that file)."""
    dst = tmp / "raw"
    shutil.copytree(w.raw, dst)
    img = dst / "2_Ortho_RGB" / "top_potsdam_2_12_RGB.tif"
    lab = dst / "5_Labels_all" / "top_potsdam_2_12_label.tif"
    if raw_bytes is not None:
        img.write_bytes(raw_bytes)
    if image is not None:
        _write_tif(img, image)
    if label is not None:
        _write_tif(lab, label)
    return dst, lab if label is not None else img


def _prepare(root: Path, out: Path, *extra: str) -> list[str]:
    return ["prepare", "potsdam", "--root", str(root), "--out", str(out), "--crop", "128", *extra]


def _train(w, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(w.cfg), "--data", str(data), "--out", str(out), *extra]


def _evaluate(w, ckpt: Path, data: Path | None = None, *extra: str) -> list[str]:
    return ["evaluate", str(ckpt), "--data", str(data or w.prepared), "--device", "cpu", "--workers", "0", *extra]


def _predict(w, inp: Path, out: Path, ckpt: Path | None = None) -> list[str]:
    return ["predict", str(inp), "-o", str(out), "-k", str(ckpt or w.run), "--device", "cpu", "--tile", "64"]


def _hostile(w, which: str) -> Path:
    return w.bad / which


def _bad_label_crop(w, tmp: Path, split: str = "train") -> tuple[Path, Path]:
    """A copy of the prepared folder whose ``split`` label crops hold class 7 of 6; (folder, first crop)."""
    data = _copy_prepared(w, tmp)
    crops = sorted((data / split / "labels").glob("*.tif"))
    for crop in crops:
        with rasterio.open(crop, "r+") as dst:
            a = dst.read()
            a[0, :2, :2] = 7
            dst.write(a)
    return data, crops[0]


def _prepare_cases(c: dict) -> None:
    """Cases of prepare."""
    rgb = np.zeros((3, 256, 256), np.uint8)
    c["prepare-missing"] = lambda w, t: Case(_prepare(t / "nope", t / "o"), str(t / "nope"), [t / "o"])
    c["prepare-empty"] = lambda w, t: (t / "e").mkdir() or Case(_prepare(t / "e", t / "o"), str(t / "e"), [t / "o"])
    c["prepare-empty-file"] = lambda w, t: (lambda r: Case(_prepare(r[0], t / "o"), r[1].name,
                                                             [t / "o" / "manifest.json"]))(
        _raw_with(w, t, raw_bytes=b""))
    c["prepare-corrupt"] = lambda w, t: (lambda r: Case(_prepare(r[0], t / "o"), r[1].name,
                                                          [t / "o" / "manifest.json"]))(
        _raw_with(w, t, raw_bytes=b"II*\x00" + bytes(5000)))
    c["prepare-truncated"] = lambda w, t: (lambda r: Case(_prepare(r[0], t / "o"), r[1].name,
                                                            [t / "o" / "manifest.json"]))(
        _raw_with(w, t, raw_bytes=(w.raw / "2_Ortho_RGB" / "top_potsdam_2_12_RGB.tif").read_bytes()[:20000]))
    c["prepare-band-count"] = lambda w, t: (lambda r: Case(_prepare(r[0], t / "o"), r[1].name,
                                                             [t / "o" / "manifest.json"]))(_raw_with(w, t, rgb[:2]))
    c["prepare-dtype"] = lambda w, t: (lambda r: Case(_prepare(r[0], t / "o"), "int32",
                                                        [t / "o" / "manifest.json"]))(
        _raw_with(w, t, rgb.astype(np.int32)))
    c["prepare-out-of-range-label"] = lambda w, t: (lambda r: Case(_prepare(r[0], t / "o"), r[1].name,
                                                                     [t / "o" / "manifest.json"]))(
        _raw_with(w, t, label=np.full((3, 256, 256), 7, np.uint8)))
    c["prepare-wrong-type-flag-value"] = lambda w, t: Case(_prepare(w.raw, t / "o", "--bands", "rgbx"), "data.bands",
                                                           [t / "o"])
    c["prepare-unwritable"] = lambda w, t: Case(_prepare(w.raw, w.bad / "a_file" / "o"), "a_file")
    c["prepare-existing-other-settings"] = lambda w, t: Case(
        _prepare(w.raw, _copy_prepared(w, t), "--stride", "64"), "prepared with other settings",
        unchanged=[t / "prepared" / "manifest.json"])


def _synth_cases(c: dict) -> None:
    """Cases of synth."""
    c["synth-existing"] = lambda w, t: Case(["synth", "potsdam", "-o", str(w.bad), "-n", "1", "-s", "32"], str(w.bad))
    c["synth-unwritable"] = lambda w, t: Case(["synth", "potsdam", "-o", str(w.bad / "a_file" / "s"), "-n", "1",
                                               "-s", "32"], "a_file")
    c["synth-out-of-range"] = lambda w, t: Case(["synth", "potsdam", "-o", str(t / "s"), "-s", "8"], "16 pixels",
                                                [t / "s"])
    c["synth-wrong-dataset"] = lambda w, t: Case(["synth", "potsdamm", "-o", str(t / "s")], "potsdamm", [t / "s"])


def _train_cases(c: dict) -> None:
    """Cases of train."""
    c["train-missing"] = lambda w, t: Case(_train(w, t / "nope", t / "r"), str(t / "nope"), [t / "r"])
    c["train-empty"] = lambda w, t: (t / "e").mkdir() or Case(_train(w, t / "e", t / "r"), "manifest.json", [t / "r"])
    c["train-corrupt-manifest"] = lambda w, t: (lambda d: (d / "manifest.json").write_text("{oops") and Case(
        _train(w, d, t / "r"), "manifest.json", [t / "r"]))(_copy_prepared(w, t))
    c["train-truncated-manifest"] = lambda w, t: (lambda d: (d / "manifest.json").write_text(
        (w.prepared / "manifest.json").read_text()[:300]) and Case(_train(w, d, t / "r"), "manifest.json",
                                                                    [t / "r"]))(_copy_prepared(w, t))
    c["train-wrong-type-manifest"] = lambda w, t: Case(_train(w, _edit_manifest(w, t, band_count="three"), t / "r"),
                                                       "band_count", [t / "r"])
    c["train-wrong-band-count"] = lambda w, t: Case(
        _train(w, _edit_manifest(w, t, band_count=4), t / "r"), "4 bands", [t / "r"])
    c["train-out-of-range-label"] = lambda w, t: (lambda d: Case(_train(w, d[0], t / "r"), str(d[1].parent),
                                                                 [t / "r"]))(_bad_label_crop(w, t))
    c["train-wrong-type-env"] = lambda w, t: Case(_train(w, w.prepared, t / "r"), "CMDB_TRAIN__BTCH", [t / "r"],
                                                  env={"CMDB_TRAIN__BTCH": "4"})
    c["train-wrong-type-config"] = lambda w, t: (t / "c.yaml").write_text("train: {batch: two}\n") and Case(
        ["train", "-c", str(t / "c.yaml"), "--data", str(w.prepared), "--out", str(t / "r")], "train.batch",
        [t / "r"])
    c["train-unwritable"] = lambda w, t: Case(_train(w, w.prepared, w.bad / "a_file" / "r"), "a_file")
    c["train-existing-run"] = lambda w, t: Case(_train(w, w.prepared, w.run), "--resume",
                                                unchanged=[w.run / "last.pt", w.run / "best.pt"])
    c["train-hostile-backbone-weights"] = lambda w, t: (t / "c.yaml").write_text(yaml.safe_dump(
        {**yaml.safe_load(w.cfg.read_text()), "model": {**TINY_MODEL, "backbone_weights": str(w.bad / "evil.pt")}})
    ) and Case(["train", "-c", str(t / "c.yaml"), "--data", str(w.prepared), "--out", str(t / "r")],
               "evil.pt: refused to load: the file holds Python objects or code, not only weights (it calls", [t / "r"])
    c["train-foreign-settings-yaml"] = lambda w, t: (t / "r").mkdir() or (t / "r" / "settings.yaml").write_text(
        "train: {batch: 2}\n") and Case(_train(w, w.prepared, t / "r"), "settings.yaml",
                                        unchanged=[t / "r" / "settings.yaml"])
    c["train-resume-changed-lr"] = lambda w, t: Case(
        _train(w, w.prepared, w.run, "--resume", str(w.run), "--lr", "0.001"), "train.lr 0.0001 -> 0.001",
        unchanged=[w.run / "last.pt", w.run / "settings.yaml"])
    for which in ("evil", "truncated", "nan"):
        c[f"train-resume-hostile-{which}"] = lambda w, t, which=which: Case(
            _train(w, w.prepared, t / "r", "--resume", str(_hostile(w, f"{which}.pt"))), f"{which}.pt", [t / "r"])


def _evaluate_cases(c: dict) -> None:
    """Cases of evaluate."""
    c["evaluate-missing-checkpoint"] = lambda w, t: Case(_evaluate(w, t / "no.pt"), "no.pt")
    c["evaluate-missing-data"] = lambda w, t: Case(_evaluate(w, w.run, t / "nope"), str(t / "nope"))
    c["evaluate-empty-run-folder"] = lambda w, t: (t / "e").mkdir() or Case(_evaluate(w, t / "e"), str(t / "e"))
    c["evaluate-wrong-split"] = lambda w, t: Case(_evaluate(w, w.run, None, "--split", "tset"), "tset")
    c["evaluate-wrong-band-count"] = lambda w, t: Case(_evaluate(w, w.run, _edit_manifest(w, t, band_count=4)),
                                                       "4 bands")
    c["evaluate-out-of-range-label"] = lambda w, t: (lambda d: Case(_evaluate(w, w.run, d[0]), str(d[1].parent)))(
        _bad_label_crop(w, t, "val"))
    c["evaluate-unwritable-json"] = lambda w, t: Case(_evaluate(w, w.run, None, "--json-out",
                                                                str(w.bad / "a_file" / "s.json")), "a_file")
    # the old `evaluate A.pt B.pt --json` wrote the scores over checkpoint B
    c["evaluate-second-checkpoint"] = lambda w, t: Case(
        ["evaluate", str(w.run / "last.pt"), str(w.run / "best.pt"), "--json", "--data", str(w.prepared)],
        "--json-out", unchanged=[w.run / "best.pt"])
    c["evaluate-json-out-existing"] = lambda w, t: Case(_evaluate(w, w.run, None, "--json-out", str(w.run / "best.pt")),
                                                        "--overwrite", unchanged=[w.run / "best.pt"])
    # checked before anything loads: the truncated checkpoint is never reached
    c["evaluate-json-out-folder"] = lambda w, t: Case(_evaluate(w, _hostile(w, "truncated.pt"), None, "--json-out",
                                                                str(w.bad)), "is a folder")
    for which in ("evil", "truncated", "nan"):
        c[f"evaluate-hostile-{which}"] = lambda w, t, which=which: Case(_evaluate(w, _hostile(w, f"{which}.pt")),
                                                                        f"{which}.pt")


def _predict_cases(c: dict) -> None:
    """Cases of predict."""
    c["predict-missing"] = lambda w, t: Case(_predict(w, t / "no.tif", t / "m.tif"), "no.tif", [t / "m.tif"])
    for which in ("empty", "corrupt", "truncated", "two_bands", "int32"):
        c[f"predict-{which}-input"] = lambda w, t, which=which: Case(
            _predict(w, w.bad / f"{which}.tif", t / "m.tif"), f"{which}.tif", [t / "m.tif"])
    c["predict-unwritable"] = lambda w, t: Case(_predict(w, w.tif, w.bad / "a_file" / "m.tif"), "a_file")
    c["predict-existing-input-as-output"] = lambda w, t: Case(_predict(w, w.tif, w.tif), "overwrite input",
                                                              unchanged=[w.tif])
    c["predict-foreign-output"] = lambda w, t: Case(_predict(w, w.tif, w.bad / "two_bands.tif"), "--overwrite",
                                                    unchanged=[w.bad / "two_bands.tif"])
    c["predict-missing-checkpoint"] = lambda w, t: Case(_predict(w, w.tif, t / "m.tif", t / "no.pt"), "no.pt",
                                                        [t / "m.tif"])
    for which in ("evil", "truncated", "nan"):
        c[f"predict-hostile-{which}"] = lambda w, t, which=which: Case(
            _predict(w, w.tif, t / "m.tif", _hostile(w, f"{which}.pt")), f"{which}.pt", [t / "m.tif"])


def _small_command_cases(c: dict) -> None:
    """Cases of profile-vram, count-params, config."""
    c["profile-vram-wrong-type"] = lambda w, t: Case(["profile-vram", "--budget", "lots"], "lots")
    c["profile-vram-out-of-range"] = lambda w, t: Case(["profile-vram", "--crop", "8"], "data.crop")
    c["profile-vram-missing-config"] = lambda w, t: Case(["profile-vram", "-c", str(t / "no.yaml")], "no.yaml")
    c["count-params-wrong-value"] = lambda w, t: Case(["count-params", "--variant", "fulll"], "fulll")
    c["count-params-out-of-range"] = lambda w, t: Case(["count-params", "--crop", "8"], "data.crop")
    c["count-params-corrupt-config"] = lambda w, t: (t / "c.yaml").write_text("model: [oops\n") and Case(
        ["count-params", "-c", str(t / "c.yaml")], "c.yaml")
    c["config-missing"] = lambda w, t: Case(["config", "show", "-c", str(t / "no.yaml")], "no.yaml")
    c["config-empty-section"] = lambda w, t: (t / "c.yaml").write_text("trian: {batch: 2}\n") and Case(
        ["config", "show", "-c", str(t / "c.yaml")], "trian")
    c["config-wrong-type"] = lambda w, t: (t / "c.yaml").write_text("train: {batch: two}\n") and Case(
        ["config", "show", "-c", str(t / "c.yaml")], "train.batch")
    c["config-wrong-type-env"] = lambda w, t: Case(["config", "show"], "CMDB_MODEL__D_STATE",
                                                   env={"CMDB_MODEL__D_STATE": "many"})




def _out_inside_input(w, t: Path) -> Case:
    (t / "in").mkdir()
    shutil.copy(w.tif, t / "in" / "scene.tif")
    return Case(_predict(w, t / "in", t / "in" / "masks"), "input folder", [t / "in" / "masks"])


def _dangling_link_input(w, t: Path) -> Case:
    (t / "gone.tif").symlink_to(t / "deleted.tif")
    return Case(_predict(w, t / "gone.tif", t / "m.tif"), "gone.tif", [t / "m.tif"])


def _second_sweep_cases(c: dict) -> None:
    """Cases of the second reliability sweep: environment, sizes, URLs, output folders, links (a scan
    backend that cannot run: tests/inference/test_predict_notes.py)."""
    typo = {"CMDB_TRAINING__BATCH": "2"}
    c["config-misspelled-env-section"] = lambda w, t: Case(["config", "show"], "CMDB_TRAIN__BATCH", env=typo)
    c["train-misspelled-env-section"] = lambda w, t: Case(_train(w, w.prepared, t / "r"), "CMDB_TRAINING__BATCH",
                                                          [t / "r"], env=typo)
    for budget in ("inf", "nanGB"):
        c[f"profile-vram-budget-{budget}"] = lambda w, t, b=budget: Case(["profile-vram", "--budget", b], b)
    c["weights-url-without-scheme"] = lambda w, t: Case(["weights", "fetch", "resnet18"], "CMDB_WEIGHTS_URL",
                                                        env={"CMDB_WEIGHTS_URL": "mirror.local/models/"})
    c["predict-out-inside-input"] = _out_inside_input
    c["predict-dangling-link-input"] = _dangling_link_input


def _cases() -> dict[str, callable]:
    c: dict[str, callable] = {}
    for add in (_prepare_cases, _synth_cases, _train_cases, _evaluate_cases, _predict_cases, _small_command_cases,
                _second_sweep_cases):
        add(c)
    return c

CASES = _cases()


def _snapshot(paths: list[Path]) -> dict[Path, int | None]:
    return {p: p.stat().st_mtime_ns if p.exists() else None for p in paths}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_clean_line(name, world, tmp_path):
    case = CASES[name](world, tmp_path)
    before = _snapshot(case.unchanged)
    result = CliRunner().invoke(app, case.args, env=case.env)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("cmdb: error: ")]
    assert result.exit_code == 2, result.output[-2000:]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.output
    assert case.needle in errors[0], errors[0]
    for path in case.absent:
        assert not path.exists(), f"{path} left behind"
    assert _snapshot(case.unchanged) == before
    left = [p for p in tmp_path.rglob("*") if ".part" in p.name]
    assert not left, left


def test_worker_error_crosses_the_process_boundary_as_one_line(world, tmp_path):
    """A bad label found in a data-loader worker process: still one line, no traceback, no run folder."""
    data, crop = _bad_label_crop(world, tmp_path)
    result = CliRunner().invoke(app, _train(world, data, tmp_path / "r", "--workers", "2"))
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("cmdb: error: ")]
    assert result.exit_code == 2, result.output[-3000:]
    assert len(lines) == 1 and "labels/" in lines[0] and "Traceback" not in result.output, result.stderr[-3000:]
    assert not (tmp_path / "r").exists()


def test_evaluate_warns_on_other_dataset_and_prints_both(world, tmp_path):
    data = _edit_manifest(world, tmp_path, dataset="vaihingen", bands="irrg")
    result = CliRunner().invoke(app, _evaluate(world, world.run, data))
    assert result.exit_code == 0, result.output[-2000:]
    assert "cmdb: warning: the checkpoint was trained on potsdam rgb" in result.stderr
    assert "dataset vaihingen irrg (checkpoint: potsdam rgb)" in result.stdout


def test_synth_rgbir_near_infrared_is_not_alpha(synth_potsdam_raw):
    with rasterio.open(synth_potsdam_raw.tiles[0].images["rgbir"]) as src:
        assert src.colorinterp[-1] != rasterio.enums.ColorInterp.alpha
        assert all(f == [rasterio.enums.MaskFlags.all_valid] for f in src.mask_flag_enums)


def test_predict_keep_going_reports_every_file_and_exits_2(world, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(world.tif, folder / "a_good.tif")
    shutil.copy(world.bad / "corrupt.tif", folder / "b_corrupt.tif")
    shutil.copy(world.bad / "truncated.tif", folder / "c_truncated.tif")
    shutil.copy(world.tif, folder / "d_good.tif")
    args = ["predict", str(folder), "-o", str(tmp_path / "out"), "-k", str(world.run), "--tile", "64",
            "--device", "cpu"]
    stop = CliRunner().invoke(app, args)
    assert stop.exit_code == 2 and "b_corrupt.tif" in stop.stderr and not (tmp_path / "out").exists()
    going = CliRunner().invoke(app, args + ["--keep-going"])
    errors = [ln for ln in going.stderr.splitlines() if ln.startswith("cmdb: error: ")]
    assert going.exit_code == 2 and "Traceback" not in going.output
    assert len(errors) == 3 and "b_corrupt.tif" in errors[0] and "c_truncated.tif" in errors[1], errors
    assert errors[2].endswith("2 of 4 inputs failed")
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert [n for n in written if n.endswith(".tif")] == ["a_good_mask.tif", "d_good_mask.tif"]
    summary = json.loads((tmp_path / "out" / "predict_summary.json").read_text())
    assert [Path(f["input"]).name for f in summary["failed"]] == ["b_corrupt.tif", "c_truncated.tif"]
    assert "a_good.tif" in going.stdout and "d_good.tif" in going.stdout


@pytest.mark.parametrize("args", [["train", "--data", "/nonexistent/prepared", "--out", "/tmp/cmdb-never"],
                                  ["train", "--batch", "0"],
                                  ["evaluate", "/nonexistent/run", "--data", "/nonexistent/prepared"]])
def test_bad_arguments_are_rejected_before_torch_loads(args):
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom cmdbnet.cli import app\n"
            "r = CliRunner().invoke(app, sys.argv[1:])\n"
            "assert r.exit_code == 2 and r.stderr.startswith('cmdb: error: '), r.output\n"
            "assert 'torch' not in sys.modules, 'torch imported before the arguments were checked'\n")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_commands_document_every_option():
    for command, options in (("train", ("--epochs", "--seed", "--overwrite")),
                             ("evaluate", ("--device", "--batch", "--workers"))):
        params = {p.opts[0]: p for p in next(c for c in _click_commands() if c.name == command).params}
        for option in options:
            assert params[option].help, f"{command} {option} has no help text"


def _click_commands():
    import typer.main

    return typer.main.get_command(app).commands.values()


def test_predict_removes_temporaries_a_killed_run_left(world, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".scene_mask.tif.x1y2z3.part.tif").write_bytes(b"half a mask")
    result = CliRunner().invoke(app, _predict(world, world.tif, out))
    assert result.exit_code == 0, result.output[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert "scene_mask.tif" in names and not [n for n in names if ".part" in n], names


def test_json_out_replaces_an_earlier_result_and_other_files_only_with_overwrite(tmp_path):
    from cmdbnet.errors import CmdbError
    from cmdbnet.evaluation import check_json_out

    earlier, mine = tmp_path / "scores.json", tmp_path / "notes.json"
    earlier.write_text(json.dumps({"protocol": {}, "mIoU": 0.5, "per_class": {}}))
    mine.write_text(json.dumps({"mIoU": "my own notes"}))
    assert check_json_out(earlier) == earlier and check_json_out(mine, overwrite=True) == mine
    with pytest.raises(CmdbError, match="notes.json already exists .*--overwrite"):
        check_json_out(mine)
    with pytest.raises(CmdbError, match="is a folder"):
        check_json_out(tmp_path, overwrite=True)
