"""Training loop: exact resume, accumulation, AMP, TensorBoard, non-finite steps, DDP, evaluate."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cmdbnet.api import train
from cmdbnet.checkpoint import load_checkpoint, save_checkpoint
from cmdbnet.cli import app
from cmdbnet.errors import CmdbError
from cmdbnet.runtime import Precision
from cmdbnet.settings import load_settings
from cmdbnet.training.loop import Trainer
from cmdbnet.training.step import run_step_group

TINY_MODEL = {"backbone": "resnet18", "pretrained": "off", "mamba_depths": [1, 1, 1, 1], "d_state": 4,
              "fusion_channels": 32, "drop_path": 0.1}


def tiny_settings(prepared: Path, out: Path, **train_kw):
    train_cfg = {"out": out, "batch": 2, "accum": 2, "max_steps": 4, "amp": False, "device": "cpu", "seed": 3,
                 "warmup_steps": 1, "log_images": 2, **train_kw}
    return load_settings(None, {"data": {"prepared": prepared, "crop": 64, "workers": 0},
                                "model": TINY_MODEL, "train": train_cfg})


def test_exact_resume_matches_uninterrupted_run(prepared_potsdam, tmp_path):
    full = train(tiny_settings(prepared_potsdam, tmp_path / "a"), progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_settings(prepared_potsdam, tmp_path / "b"), progress=False, stop_after_steps=2)
    interrupted = load_checkpoint(tmp_path / "b" / "last.pt")
    assert interrupted["step"] == 2
    resumed = train(tiny_settings(prepared_potsdam, tmp_path / "b", resume=tmp_path / "b"), progress=False)
    assert resumed.steps == full.steps == 4
    a = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_changed_model_or_training_settings_and_applies_a_longer_run(prepared_potsdam, tmp_path):
    """A changed learning rate would be recorded in settings.yaml while the optimizer kept the old one."""
    run = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_settings(prepared_potsdam, run), progress=False, stop_after_steps=1)
    kept = {n: (run / n).stat().st_mtime_ns for n in ("last.pt", "settings.yaml")}
    s = tiny_settings(prepared_potsdam, run, resume=run)
    s.model.d_state = 8
    with pytest.raises(CmdbError, match="model settings differ"):
        train(s, progress=False)
    s = tiny_settings(prepared_potsdam, run, resume=run, lr=1e-3)
    s.data.crop = 32
    with pytest.raises(CmdbError) as err:
        train(s, progress=False)
    assert str(err.value).startswith(f"--resume {run}: the training settings differ from the checkpoint's: ")
    assert "train.lr 0.0001 -> 0.001" in str(err.value) and "data.crop 64 -> 32" in str(err.value)
    assert {n: (run / n).stat().st_mtime_ns for n in kept} == kept  # nothing written
    # where things are and how long to train may change (the latter applied); the rest resumes as before
    longer = tiny_settings(prepared_potsdam, run, resume=run, max_steps=2, device="auto", log_images=0)
    assert train(longer, progress=False).steps == 2
    assert yaml.safe_load((run / "settings.yaml").read_text())["train"]["max_steps"] == 2


def test_resume_differences_lists_refused_and_applied_settings():
    from cmdbnet.training.setup import check_resume_settings, resume_differences

    saved = load_settings(None, {"train": {"lr": 1e-4, "epochs": 300}}).model_dump(mode="json")
    now = load_settings(None, {"train": {"lr": 1e-4, "epochs": 500, "out": "elsewhere", "device": "cpu"},
                               "data": {"workers": 0}, "predict": {"tile": 256}})
    assert resume_differences(saved, now) == ([], ["train.epochs 300 -> 500"])
    assert check_resume_settings(Path("r"), saved, now) == "resume: applying train.epochs 300 -> 500"
    boundary = now.model_copy(update={"train": now.train.model_copy(update={"boundary_weight": 0.5})})
    assert resume_differences(saved, boundary)[0] == ["train.boundary_weight 0.3 -> 0.5"]


class _NoBatchStats(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return {"seg": self.b(torch.relu(self.a(x))), "aux": [], "boundary": None}


def test_accumulation_equals_one_large_batch():
    from cmdbnet.losses import CMDBLoss

    torch.manual_seed(0)
    images = torch.randn(6, 3, 16, 16)
    labels = torch.randint(0, 4, (6, 16, 16))
    loss_fn = CMDBLoss(4, dice_weight=0.0, boundary_weight=0.0)  # CE is a mean over samples; Dice is not
    results = []
    for split in ([6], [2, 2, 2], [4, 2]):
        torch.manual_seed(1)
        net = _NoBatchStats()
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        batches, i = [], 0
        for n in split:
            batches.append({"image": images[i:i + n], "label": labels[i:i + n]})
            i += n
        weights = [n / 6 for n in split]
        losses, stepped = run_step_group(net, loss_fn, batches, weights, opt, None, Precision(False, torch.float32),
                                         torch.device("cpu"), None)
        assert stepped
        results.append((losses["total"], [p.detach().clone() for p in net.parameters()]))
    for loss, params in results[1:]:
        assert math.isclose(loss, results[0][0], rel_tol=1e-5)
        for p, q in zip(params, results[0][1]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_training_and_tensorboard_tags(prepared_potsdam, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    s = tiny_settings(prepared_potsdam, tmp_path / "bf16", amp=True, amp_dtype="bf16", max_steps=2)
    result = train(s, progress=False)
    assert result.steps == 2 and result.last_metrics is not None
    assert (tmp_path / "bf16" / "settings.yaml").is_file()
    saved = yaml.safe_load((tmp_path / "bf16" / "settings.yaml").read_text())
    assert saved["train"]["amp_dtype"] == "bf16" and saved["model"]["num_classes"] == 6
    acc = EventAccumulator(str(tmp_path / "bf16" / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"loss/main", "loss/aux", "loss/boundary", "loss/total", "val/mIoU", "val/OA", "val/mF1",
                "val/boundary_iou", "train/lr", "memory/rss_mib", "val_iou/building", "val_iou/car"}
    assert expected <= tags, expected - tags
    assert acc.Tags()["images"], "validation previews missing"
    ckpt = load_checkpoint(tmp_path / "bf16" / "best.pt")
    assert ckpt["dataset"]["classes"][1] == "building" and len(ckpt["dataset"]["palette"]) == 6
    assert "optimizer" not in ckpt and "rng" not in ckpt and "optimizer" in load_checkpoint(tmp_path / "bf16" / "last.pt")
    assert (tmp_path / "bf16" / "best.pt").stat().st_size < 0.6 * (tmp_path / "bf16" / "last.pt").stat().st_size
    with pytest.raises(CmdbError, match="holds weights only"):  # best.pt cannot resume; last.pt can
        Trainer(s.model_copy(update={"train": s.train.model_copy(update={"resume": tmp_path / "bf16" / "best.pt"})}),
                progress=False)


def test_nonfinite_loss_is_skipped_then_stops(prepared_potsdam, tmp_path):
    s = tiny_settings(prepared_potsdam, tmp_path / "nan", max_steps=3, max_nonfinite=3)
    trainer = Trainer(s, progress=False)
    calls = {"n": 0}
    saved = {}

    def poison(step, micro_batch):
        calls["n"] += 1
        w = next(trainer.net.parameters())
        if calls["n"] == 3:  # first micro-batch of the second group
            saved["w"] = w.detach().clone()
            with torch.no_grad():
                w.fill_(float("nan"))
        if calls["n"] == 5:
            with torch.no_grad():
                w.copy_(saved["w"])

    trainer.fault_hook = poison
    result = trainer.fit()
    assert result.nonfinite_skipped == 1 and result.steps == 3

    s2 = tiny_settings(prepared_potsdam, tmp_path / "nan2", max_steps=5, max_nonfinite=2)
    trainer2 = Trainer(s2, progress=False)

    loss_fn = trainer2.loss_fn
    trainer2.loss_fn = lambda out, label: {k: v * float("nan") for k, v in loss_fn(out, label).items()}
    with pytest.raises(CmdbError, match="likely causes, in order: NaN/inf pixels in the input"):
        trainer2.fit()
    assert load_checkpoint(tmp_path / "nan2" / "last.pt")["nonfinite_skipped"] == 2


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "cmdbnet-checkpoint", "payload": Evil()}, path)
    with pytest.raises(CmdbError, match="refused"):
        load_checkpoint(path)
    save_checkpoint(tmp_path / "ok.pt", {"model": {}, "settings": {}, "dataset": {}})
    assert load_checkpoint(tmp_path / "ok.pt")["format"] == "cmdbnet-checkpoint"
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CmdbError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


@pytest.fixture(scope="module")
def trained_run(prepared_potsdam, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    train(tiny_settings(prepared_potsdam, out, max_steps=2), progress=False)
    return out


def test_evaluate_cli_json(trained_run, prepared_potsdam, tmp_path):
    runner = CliRunner()
    out = tmp_path / "scores.json"
    res = runner.invoke(app, ["evaluate", str(trained_run), "--data", str(prepared_potsdam), "--json-out", str(out),
                              "--ignore-clutter", "--device", "cpu", "--workers", "0"])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert set(data) >= {"protocol", "mIoU", "OA", "mF1", "boundary_iou", "boundary_distance", "per_class"}
    assert data["protocol"]["excluded_from_means"] == ["clutter"]
    assert set(data["per_class"]["building"]) >= {"iou", "f1", "boundary_iou"}
    # the means are over the five classes other than clutter, and OA is a pixel fraction
    kept = [v["iou"] for k, v in data["per_class"].items() if k != "clutter" and not math.isnan(v["iou"])]
    assert data["mIoU"] == pytest.approx(sum(kept) / len(kept), abs=1e-6)
    assert 0.0 <= data["OA"] <= 1.0
    assert "protocol:" in res.output
    # --json prints the same result to stdout and nothing else; data.prepared may come from --config
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"data:\n  prepared: {prepared_potsdam}\n  workers: 0\n")
    res = runner.invoke(app, ["evaluate", str(trained_run), "-c", str(cfg), "--ignore-clutter", "--device", "cpu",
                              "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["mIoU"] == pytest.approx(data["mIoU"])
    # --json-out replaces an earlier result of evaluate
    res = runner.invoke(app, ["evaluate", str(trained_run), "--data", str(prepared_potsdam), "--json-out", str(out),
                              "--ignore-clutter", "--device", "cpu", "--workers", "0"])
    assert res.exit_code == 0, res.output
    bad = runner.invoke(app, ["evaluate", str(tmp_path / "nope.pt"), "--data", str(prepared_potsdam)])
    assert bad.exit_code != 0 and "checkpoint not found" in bad.output


def test_train_cli_bad_input(tmp_path):
    res = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0
    assert "Traceback" not in res.output


def test_ddp_two_processes_gloo(prepared_potsdam, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"model": TINY_MODEL, "data": {"crop": 64, "workers": 0},
                                   "train": {"warmup_steps": 1, "log_images": 0}}))
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "cmdbnet", "train", "--config", str(cfg), "--data", str(prepared_potsdam), "--out", str(out),
           "--batch", "2", "--accum", "1", "--max-steps", "2", "--device", "cpu", "--no-amp", "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt"]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 2
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["steps"] == 2
