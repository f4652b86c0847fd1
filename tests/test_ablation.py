"""``cmdb ablation``: every entry in the table, one recipe, resume and skip, baselines as ordinary runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

import cmdbnet
from cmdbnet.ablation import ENTRY_FILE
from cmdbnet.ablation.report import aggregate, markdown
from cmdbnet.checkpoint import load_checkpoint
from cmdbnet.cli import app
from cmdbnet.errors import CmdbError
from cmdbnet.settings import load_settings

pytest.importorskip("segmentation_models_pytorch")

TINY = {"backbone": "resnet18", "pretrained": "off", "mamba_dims": [16, 32, 64, 128], "mamba_depths": [1, 1, 1, 1],
        "d_state": 4, "fusion_channels": 32}
ENTRIES = ["full", "cnn_only", "unet"]


def recipe(prepared: Path, out: Path, **train) -> cmdbnet.Settings:
    return load_settings(None, {
        "data": {"prepared": prepared, "crop": 64, "workers": 0}, "model": TINY,
        "train": {"out": out, "batch": 2, "accum": 1, "max_steps": 2, "amp": False, "device": "cpu", "seed": 5,
                  "warmup_steps": 1, "log_images": 0, "val_interval": 100, **train}})


@pytest.fixture(scope="module")
def ablation_run(prepared_potsdam, tmp_path_factory):
    """An ablation interrupted in its first entry, then run to the end, then run once more."""
    out = tmp_path_factory.mktemp("ablation") / "abl"
    s = recipe(prepared_potsdam, out)
    with pytest.raises(KeyboardInterrupt):
        cmdbnet.ablation(s, ["full", "cnn_only"], ["unet"], progress=False, stop_after_steps=1)
    interrupted = {"last": load_checkpoint(out / "full" / "last.pt")["step"],
                   "scored": (out / "full" / ENTRY_FILE).exists(), "others": (out / "cnn_only").exists()}
    first: list[str] = []
    doc = cmdbnet.ablation(s, ["full", "cnn_only"], ["unet"], progress=False, log=first.append)
    stamps = {n: (out / n / ENTRY_FILE).stat().st_mtime_ns for n in ENTRIES}
    again: list[str] = []
    doc2 = cmdbnet.ablation(s, ["full", "cnn_only"], ["unet"], progress=False, log=again.append)
    return {"out": out, "settings": s, "interrupted": interrupted, "doc": doc, "doc2": doc2, "first": first,
            "again": again, "stamps": stamps}


def test_table_has_every_entry_in_json_markdown_and_png(ablation_run):
    out, doc = ablation_run["out"], ablation_run["doc"]
    assert [e["name"] for e in doc["entries"]] == ENTRIES == [r["name"] for r in doc["table"]]
    for e in doc["entries"]:
        assert 0 <= e["mIoU"] <= 1 and 0 <= e["boundary_iou"] <= 1 and e["steps"] == 2
        assert e["params"] > 0 and e["macs"] > 0 and e["train_seconds"] > 0 and e["peak_memory_bytes"] > 0
        assert set(e["per_class_iou"]) == set(doc["protocol"]["classes"])
        assert e["protocol"]["split"] == "test"
    rows = {r["name"]: r for r in doc["table"]}
    assert rows["full"]["delta_mIoU"] == 0
    assert rows["unet"]["delta_mIoU"] == pytest.approx(rows["unet"]["mIoU"]["mean"] - rows["full"]["mIoU"]["mean"])
    assert json.loads((out / "ablation.json").read_text())["entries"] == json.loads(json.dumps(doc["entries"]))
    md = (out / "ablation.md").read_text()
    for label in ("full (fusion + boundary refinement)", "CNN branch only", "U-Net (ResNet18)", "Boundary IoU",
                  "Δ mIoU vs full", "IoU building", "params", "MACs", "training time", "peak memory"):
        assert label in md
    assert sum(line.startswith("| ") for line in md.splitlines()) == 1 + len(ENTRIES)  # header + a row per entry
    assert "split test" in md and "2 steps" in md
    with Image.open(out / "ablation.png") as png:
        assert png.format == "PNG" and png.size[0] >= 480


def test_recipes_in_run_folders_differ_only_in_the_network(ablation_run):
    out = ablation_run["out"]
    saved = {n: yaml.safe_load((out / n / "settings.yaml").read_text()) for n in ENTRIES}
    for n, s in saved.items():
        assert s["model"]["arch"] == ("unet" if n == "unet" else "cmdbnet")
        assert s["train"]["out"] == str(out / n)
        for key in ("arch", "variant"):
            s["model"].pop(key)
        for key in ("out", "resume"):
            s["train"].pop(key)
    assert saved["full"] == saved["cnn_only"] == saved["unet"]
    assert saved["full"]["train"]["lr"] == ablation_run["settings"].train.lr


def test_interrupted_entry_resumes_and_finished_entries_are_skipped(ablation_run):
    out, it = ablation_run["out"], ablation_run["interrupted"]
    assert it == {"last": 1, "scored": False, "others": False}
    assert "resuming" in ablation_run["first"][0] and "training" in ablation_run["first"][2]
    assert load_checkpoint(out / "full" / "last.pt")["step"] == 2
    assert not (out / "full" / "ablation-partial.json").exists()
    assert all("skipped" in line for line in ablation_run["again"]) and len(ablation_run["again"]) == 3
    assert {n: (out / n / ENTRY_FILE).stat().st_mtime_ns for n in ENTRIES} == ablation_run["stamps"]
    assert ablation_run["doc2"]["entries"] == ablation_run["doc"]["entries"]


def test_another_recipe_in_the_same_folder_is_refused(ablation_run):
    s = recipe(ablation_run["settings"].data.prepared, ablation_run["out"], lr=0.5)
    with pytest.raises(CmdbError, match=r"another recipe: train\.lr"):
        cmdbnet.ablation(s, ["full"], [], progress=False)


def test_baseline_run_is_accepted_by_evaluate_predict_count_params_profile_vram(ablation_run, prepared_potsdam,
                                                                              tmp_path):
    run = ablation_run["out"] / "unet"
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", str(run), "--data", str(prepared_potsdam), "--split", "test", "--json"])
    assert res.exit_code == 0, res.output
    scores = json.loads(res.stdout[res.stdout.index("{"):])
    assert scores["mIoU"] == pytest.approx(json.loads((run / ENTRY_FILE).read_text())["mIoU"])
    image = sorted((prepared_potsdam / "test" / "images").glob("*.tif"))[0]
    res = runner.invoke(app, ["predict", str(image), "-o", str(tmp_path / "mask.tif"), "-k", str(run), "--json"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "mask.tif").is_file()
    res = runner.invoke(app, ["count-params", "-c", str(run / "settings.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    count = json.loads(res.stdout)
    assert count["total"]["params"] == json.loads((run / ENTRY_FILE).read_text())["params"]
    assert set(count["modules"]) == {"encoder", "decoder", "heads"}
    res = runner.invoke(app, ["profile-vram", "-c", str(run / "settings.yaml"), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["peak_bytes"] > 0


def test_mean_and_std_over_seeds():
    def rec(name, seed, miou):
        return {"name": name, "arch": "cmdbnet", "seed": seed, "mIoU": miou, "OA": 0.9, "mF1": 0.8,
                "boundary_iou": 0.5, "per_class_iou": {"a": miou}, "params": 10, "macs": 20, "macs_crop": 64,
                "train_seconds": 30.0, "peak_memory_bytes": 2**20, "peak_memory_kind": "cpu_peak_rss", "steps": 2}
    rows = aggregate([rec("full", 1, 0.50), rec("full", 2, 0.60), rec("cnn_only", 1, 0.40), rec("cnn_only", 2, 0.44)])
    full, cnn = rows
    assert full["mIoU"]["mean"] == pytest.approx(0.55) and full["mIoU"]["std"] == pytest.approx(0.0707107, rel=1e-4)
    assert cnn["delta_mIoU"] == pytest.approx(-0.13)
    md = markdown(rows, "protocol", "recipe")
    assert "55.0 ± 7.1" in md and "-13.0" in md and "mean ± std over 2 seeds" in md


def test_bad_input_is_one_line(prepared_potsdam, tmp_path):
    res = CliRunner().invoke(app, ["ablation", "--data", str(prepared_potsdam), "--out", str(tmp_path / "a"),
                                   "--variants", "full,bogus"])
    assert res.exit_code == 2 and res.output.strip() == "cmdb: error: unknown variant 'bogus'; use any of " \
        "full, cnn_only, mamba_only, no_fusion, no_boundary"
    res = CliRunner().invoke(app, ["ablation", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "a")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "cmdb prepare" in res.output


def test_missing_baselines_extra_is_one_clear_line(prepared_potsdam, tmp_path):
    """segmentation_models_pytorch blocked from importing (None in sys.modules), as if not installed."""
    code = ("import sys; sys.modules['segmentation_models_pytorch'] = None; from cmdbnet.cli import main; "
            f"sys.argv = ['cmdb', 'ablation', '--data', {str(prepared_potsdam)!r}, '--out', {str(tmp_path / 'a')!r}, "
            "'--baselines', 'unet']; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cmdb: error: ") and "cmdbnet[baselines]" in lines[0], proc.stderr
    assert not (tmp_path / "a").exists()


def test_ablation_under_torchrun_two_ranks(prepared_potsdam, tmp_path):
    """Each entry trains with DDP (gloo, 2 ranks); rank 0 scores it and writes the tables, once."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"model": TINY, "data": {"crop": 64, "workers": 0},
                                   "train": {"warmup_steps": 1, "log_images": 0, "val_interval": 100}}))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "cmdbnet", "ablation", "-c", str(cfg), "--data", str(prepared_potsdam), "--out", str(out),
           "--variants", "cnn_only", "--batch", "2", "--accum", "1", "--max-steps", "1", "--device", "cpu",
           "--no-amp", "--json"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert [e["name"] for e in doc["entries"]] == ["cnn_only"] and proc.stdout.count('"entries"') == 1
    assert load_checkpoint(out / "cnn_only" / "last.pt")["step"] == 1
    assert json.loads((out / "ablation.json").read_text())["entries"][0]["mIoU"] == doc["entries"][0]["mIoU"]
