"""Faults that cost users runs: NaN pixels, Ctrl-C mid-step, an existing run folder, stale temp files."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from cmdbnet.api import train
from cmdbnet.checkpoint import load_checkpoint, save_checkpoint
from cmdbnet.errors import CmdbError
from cmdbnet.runtime import Precision
from cmdbnet.settings import load_settings
from cmdbnet.training.loop import Trainer
from cmdbnet.training.step import run_step_group

TINY_MODEL = {"backbone": "resnet18", "pretrained": "off", "mamba_depths": [1, 1, 1, 1], "d_state": 4,
              "fusion_channels": 32, "drop_path": 0.1}  # as in test_train.py


def tiny_settings(prepared: Path, out: Path, **train_kw):
    train_cfg = {"out": out, "batch": 2, "accum": 2, "max_steps": 4, "amp": False, "device": "cpu", "seed": 3,
                 "warmup_steps": 1, "log_images": 2, **train_kw}
    return load_settings(None, {"data": {"prepared": prepared, "crop": 64, "workers": 0},
                                "model": TINY_MODEL, "train": train_cfg})


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_skipped_step_restores_batchnorm_statistics():
    from cmdbnet.losses import CMDBLoss

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
    model = lambda x: {"seg": net(x), "aux": [], "boundary": None}  # noqa: E731
    model.buffers, model.parameters = net.buffers, net.parameters
    before = {k: v.clone() for k, v in net.state_dict().items()}
    image = torch.randn(2, 3, 16, 16)
    image[0, :, 3, 5] = float("nan")  # four NaN pixels poison the batch statistics
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    _, stepped = run_step_group(model, CMDBLoss(4, dice_weight=0.0, boundary_weight=0.0),
                                [{"image": image, "label": torch.zeros(2, 16, 16, dtype=torch.long)}], [1.0],
                                opt, None, Precision(False, torch.float32), torch.device("cpu"), None)
    assert not stepped
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_nan_input_in_training_leaves_every_checkpoint_finite(prepared_potsdam, tmp_path):
    trainer = Trainer(tiny_settings(prepared_potsdam, tmp_path / "run", max_steps=3), progress=False)
    calls = {"n": 0}

    def poison(module, args):
        calls["n"] += 1
        if calls["n"] == 3:  # first micro-batch of the second step
            image = args[0].clone()
            image[0, :, :2, :2] = float("nan")
            return (image,)
        return None

    trainer.net.register_forward_pre_hook(poison)
    result = trainer.fit()
    assert result.nonfinite_skipped == 1 and result.steps == 3
    for name in ("best.pt", "last.pt"):
        state = _state(tmp_path / "run" / name)  # load_checkpoint refuses non-finite weights
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_nonfinite_checkpoints_are_neither_written_nor_loaded(tmp_path):
    with pytest.raises(CmdbError, match="refusing to write .*NaN or inf"):
        save_checkpoint(tmp_path / "bad.pt", {"model": {"w": torch.tensor([1.0, float("nan")])},
                                              "settings": {}, "dataset": {}})
    assert not list(tmp_path.iterdir())
    torch.save({"format": "cmdbnet-checkpoint", "version": 1, "model": {"bn.running_var": torch.tensor([float("inf")])},
                "settings": {}, "dataset": {}}, tmp_path / "old.pt")
    with pytest.raises(CmdbError, match="old.pt: 1 weight tensor.*bn.running_var"):
        load_checkpoint(tmp_path / "old.pt")


DRIVER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from cmdbnet.api import train
    from cmdbnet.settings import load_settings

    # Python's own Ctrl-C handler, also when the test runs in a background job (SIGINT ignored there)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cfg, prepared, out, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    resume = out if kill_at == 0 else None
    s = load_settings(cfg, {"data": {"prepared": prepared}, "train": {"out": out, "resume": resume}})
    calls = [0]
    def hook(module, args, output):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered mid-forward
    import cmdbnet.training.loop as loop
    build = loop.build_model
    def build_hooked(ms):
        net = build(ms)
        bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        bns[len(bns) // 2].register_forward_hook(hook)
        return net
    loop.build_model = build_hooked
    train(s, progress=False)
""")


def test_sigint_mid_forward_then_resume_is_bit_exact(prepared_potsdam, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": TINY_MODEL, "data": {"crop": 64, "workers": 0},
        "train": {"batch": 2, "accum": 2, "max_steps": 4, "amp": False, "device": "cpu", "seed": 3,
                  "warmup_steps": 1, "log_images": 0}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"

    def drive(kill_at: int, out: Path = run) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", DRIVER, str(cfg), str(prepared_potsdam), str(out), str(kill_at)],
                              env=env, capture_output=True, text=True, timeout=300)

    first = drive(6)  # the second micro-batch of step 3: step 3's first forward already moved BatchNorm
    assert first.returncode != 0 and "KeyboardInterrupt" in first.stderr, first.stderr[-2000:]
    assert load_checkpoint(run / "last.pt")["step"] == 2
    second = drive(0)
    assert second.returncode == 0, second.stderr[-2000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the children (OMP_NUM_THREADS=1): same reductions, same bits
    try:
        train(load_settings(cfg, {"data": {"prepared": prepared_potsdam}, "train": {"out": tmp_path / "full"}}),
              progress=False)
    finally:
        torch.set_num_threads(threads)
    a, b = _state(tmp_path / "full" / "last.pt"), _state(run / "last.pt")
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ after resume, e.g. {differ[:3]}"


def test_existing_run_folder_is_refused_without_resume_or_overwrite(prepared_potsdam, tmp_path):
    out = tmp_path / "run"
    train(tiny_settings(prepared_potsdam, out, max_steps=1), progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt")}
    with pytest.raises(CmdbError, match=f"already holds a run .*--resume {out}.*--overwrite"):
        train(tiny_settings(prepared_potsdam, out, max_steps=1), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt")} == before
    (out / ".last.pt.abc123.part.pt").write_bytes(b"half a checkpoint")  # left by a SIGKILL mid-write
    train(tiny_settings(prepared_potsdam, out, max_steps=1, overwrite=True), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "settings.yaml", "tb"]


def test_out_under_a_file_and_failed_new_run_leave_nothing(prepared_potsdam, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CmdbError, match="is a file, not a folder"):
        train(tiny_settings(prepared_potsdam, tmp_path / "file" / "run"), progress=False)
    trainer = Trainer(tiny_settings(prepared_potsdam, tmp_path / "new"), progress=False)
    trainer.fault_hook = lambda step, mb: (_ for _ in ()).throw(CmdbError("boom"))
    with pytest.raises(CmdbError, match="boom"):
        trainer.fit()
    assert not (tmp_path / "new").exists()


def test_ctrl_c_during_the_last_validation_then_resume_trains_no_extra_step(prepared_potsdam, tmp_path):
    trainer = Trainer(tiny_settings(prepared_potsdam, tmp_path / "run", max_steps=2, log_images=0), progress=False)
    trainer.validate = lambda: (_ for _ in ()).throw(KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    saved = _state(tmp_path / "run" / "last.pt")
    result = train(tiny_settings(prepared_potsdam, tmp_path / "run", max_steps=2, log_images=0,
                                 resume=tmp_path / "run"), progress=False)
    assert result.steps == 2 and result.last_metrics is not None
    final = _state(tmp_path / "run" / "last.pt")
    assert all(torch.equal(saved[k], final[k]) for k in saved)


SAVE_UNDER_LIMIT = textwrap.dedent("""
    import resource, signal, sys
    import torch
    from cmdbnet.checkpoint import save_checkpoint
    from cmdbnet.errors import CmdbError

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    try:
        save_checkpoint(sys.argv[1], {"model": {"w": torch.zeros(100_000)}, "settings": {}, "dataset": {}})
    except CmdbError as exc:
        print(exc)
        sys.exit(2)
""")


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_leaves_nothing(tmp_path):
    final = tmp_path / "last.pt"
    res = subprocess.run([sys.executable, "-c", SAVE_UNDER_LIMIT, str(final)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stdout.startswith(f"disk full writing {final} (File too large)"), res.stdout
    assert list(tmp_path.iterdir()) == []  # neither last.pt nor its temporary file
    save_checkpoint(final, {"model": {"w": torch.zeros(100_000)}, "settings": {}, "dataset": {}})  # limit lifted
    assert load_checkpoint(final)["model"]["w"].shape == (100_000,)
