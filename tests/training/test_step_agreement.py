"""What a GPU run meets first, checked on CPU: scaled non-finite steps, out-of-memory back-off
(also across ranks), host syncs per optimizer step, CUDA settings and RNG restore."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import weakref
from pathlib import Path

import pytest
import torch
import yaml

import cmdbnet.training.loop as loop
from cmdbnet import runtime
from cmdbnet.losses import CMDBLoss
from cmdbnet.runtime import Precision, configure_cuda
from cmdbnet.settings import TrainSettings, load_settings
from cmdbnet.training.loop import Trainer
from cmdbnet.training.step import run_step_group

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from launches import SyncCounter  # noqa: E402  (the counter benchmarks/launches.py --syncs reports with)

TINY_MODEL = {"backbone": "resnet18", "pretrained": "off", "mamba_depths": [1, 1, 1, 1], "d_state": 4,
              "fusion_channels": 32, "drop_path": 0.1}  # as in test_train.py


NO_VAL = {"mIoU": 0.5, "OA": 0.5, "mF1": 0.5, "boundary_iou": 0.5}  # validation is tested elsewhere: skipped here


def tiny_settings(prepared: Path, out: Path, **train_kw):
    train_cfg = {"out": out, "batch": 2, "accum": 1, "max_steps": 2, "amp": False, "device": "cpu", "seed": 3,
                 "warmup_steps": 1, "log_images": 0, **train_kw}
    return load_settings(None, {"data": {"prepared": prepared, "crop": 64, "workers": 0},
                                "model": TINY_MODEL, "train": train_cfg})


class _Conv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return {"seg": self.a(x), "aux": [], "boundary": None}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nonfinite_loss_under_a_grad_scaler_skips_the_step(dtype):
    torch.manual_seed(0)
    net = _Conv()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss_fn = CMDBLoss(4, dice_weight=0.0, boundary_weight=0.0)
    label = torch.randint(0, 4, (2, 8, 8))
    image = torch.randn(2, 3, 8, 8)
    bad = image.clone()
    bad[0, :, 1, 1] = float("nan")
    before = [p.detach().clone() for p in net.parameters()]

    def step(x):
        return run_step_group(net, loss_fn, [{"image": x, "label": label}], [1.0], opt, scaler,
                              Precision(True, dtype), torch.device("cpu"), 1.0)

    _, stepped = step(bad)  # before: AssertionError "No inf checks were recorded prior to update."
    assert not stepped and scaler.get_scale() == 512.0  # NaN gradients: the scale backs off
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    losses, stepped = step(image)
    assert stepped and torch.isfinite(losses["total"])
    assert not all(torch.equal(p, q) for p, q in zip(net.parameters(), before))


def test_scaled_run_counts_a_skipped_step_and_a_crash_keeps_the_new_run_folder(prepared_potsdam, tmp_path):
    trainer = Trainer(tiny_settings(prepared_potsdam, tmp_path / "run"), progress=False)
    trainer.scaler = torch.amp.GradScaler("cpu")  # as fp16 on CUDA has (same update code); fp32 here for speed
    trainer.validate = lambda: NO_VAL
    calls = {"n": 0}

    def poison(module, args):
        calls["n"] += 1
        if calls["n"] == 2:
            image = args[0].clone()
            image[0, :, :2, :2] = float("nan")
            return (image,)
        return None

    trainer.net.register_forward_pre_hook(poison)
    result = trainer.fit()
    assert (result.nonfinite_skipped, result.steps) == (1, 2)

    crash = Trainer(tiny_settings(prepared_potsdam, tmp_path / "new", max_steps=1), progress=False)
    crash.fault_hook = lambda step, mb: (_ for _ in ()).throw(RuntimeError("driver error"))
    with pytest.raises(RuntimeError, match="driver error"):
        crash.fit()  # before: the folder was removed, logs and settings with it
    assert (tmp_path / "new" / "settings.yaml").is_file() and (tmp_path / "new" / "tb").is_dir()


def test_oom_inside_a_forward_frees_its_activations_before_the_retry(prepared_potsdam, tmp_path):
    trainer = Trainer(tiny_settings(prepared_potsdam, tmp_path / "run", max_steps=1), progress=False)
    trainer.validate = lambda: NO_VAL
    refs: list[weakref.ref] = []

    def stage_hook(module, args, output):
        if not refs:
            refs.append(weakref.ref(output))
            raise torch.OutOfMemoryError("CUDA out of memory (injected after the stage ran)")

    trainer.net.cnn.layer1.register_forward_hook(stage_hook)
    seen = []
    trainer.fault_hook = lambda step, mb: seen.append((mb, refs[0]() is None if refs else None))
    result = trainer.fit()
    assert seen[0] == (2, None) and seen[1] == (1, True), seen  # retried at half the micro-batch, activation freed
    assert (result.micro_batch, result.accum, result.steps) == (1, 2, 1)


def test_host_syncs_per_optimizer_step_are_at_most_two_whatever_the_accumulation(prepared_potsdam, tmp_path,
                                                                                   monkeypatch):
    calls = []
    monkeypatch.setattr(loop, "configure_cuda", lambda dev, tf32: calls.append((dev.type, tf32)))
    trainer = Trainer(tiny_settings(prepared_potsdam, tmp_path / "run", batch=1, max_steps=3, tf32=False),
                      progress=False)
    assert calls == [("cpu", False)]  # the setting reaches the CUDA configuration
    counter = SyncCounter()  # counts Python-level reads (tolist, numpy) too while entered

    class Paused:  # the sampler and the dataset run on the host in a CUDA run too
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __iter__(self):
            counter.paused += 1
            it = iter(self.inner)  # seeds the workers from a CPU generator
            counter.paused -= 1
            while True:
                counter.paused += 1
                try:
                    batch = next(it)
                except StopIteration:
                    return
                finally:
                    counter.paused -= 1
                yield batch

    trainer.t_start, trainer.consecutive_nonfinite = time.monotonic(), 0
    trainer.cfg = trainer.cfg.model_copy(update={"time_limit_min": 60.0})  # the time check runs too
    per_step = {}
    for accum in (1, 4):
        trainer.accum, trainer.batches_done = accum, 0
        trainer.total_steps = trainer.step + 1
        trainer.loader = Paused(trainer._make_loader())
        counter.n = 0
        with counter:
            trainer._epoch()
        per_step[accum] = counter.n
    assert trainer.step == 2
    assert max(per_step.values()) <= 2, per_step  # before: 16 per micro-batch


def test_cuda_configuration_and_rng_restore_on_fewer_gpus(monkeypatch):
    assert TrainSettings().tf32 is True
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        configure_cuda(torch.device("cpu"), False)
        assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32) == saved[:2]
        configure_cuda(torch.device("cuda", 0), False)  # backend flags only: no GPU needed to set them
        assert torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.allow_tf32
        configure_cuda(torch.device("cuda", 0), True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no GPU here: only the bookkeeping runs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.append((int(s[0]), i)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("fails with fewer GPUs"))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [])
    state = runtime.rng_state()  # this process's own state: restoring it changes nothing
    state["cuda"] = [torch.tensor([7], dtype=torch.uint8), torch.tensor([9], dtype=torch.uint8)]  # saved on 2 GPUs
    with pytest.warns(RuntimeWarning, match="random state of 2 GPUs, this machine has 1"):
        runtime.set_rng_state(state)
    assert restored == [(7, 0)]


DRIVER = textwrap.dedent("""
    import json, os, sys, weakref
    import torch
    from cmdbnet.settings import load_settings
    from cmdbnet.training.loop import Trainer

    cfg, prepared, out = sys.argv[1:4]
    s = load_settings(cfg, {"data": {"prepared": prepared}, "train": {"out": out}})
    trainer = Trainer(s, progress=False)
    trainer.validate = lambda: {"mIoU": 0.5, "OA": 0.5, "mF1": 0.5, "boundary_iou": 0.5}
    rank, refs, seen = int(os.environ["RANK"]), [], []

    def stage_hook(module, args, output):
        if rank == 1 and not refs:
            refs.append(weakref.ref(output))
            raise torch.OutOfMemoryError("CUDA out of memory (injected on rank 1)")

    trainer.net.cnn.layer1.register_forward_hook(stage_hook)
    trainer.fault_hook = lambda step, mb: seen.append([mb, refs[0]() is None if refs else None])
    r = trainer.fit()
    print("RESULT " + json.dumps({"rank": rank, "micro_batch": r.micro_batch, "accum": r.accum,
                                  "steps": r.steps, "seen": seen[:2]}), flush=True)
""")


def test_two_ranks_halve_together_when_one_runs_out_of_memory(prepared_potsdam, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"model": TINY_MODEL, "data": {"crop": 64, "workers": 0},
                                   "train": {"batch": 2, "accum": 1, "max_steps": 1, "amp": False, "device": "cpu",
                                             "warmup_steps": 1, "log_images": 0}}))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           str(driver), str(cfg), str(prepared_potsdam), str(tmp_path / "run")]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)  # before: rank 0 waited in the gradient all-reduce until the timeout
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the ranks share one stdout pipe: their lines may run together, so take each object whole
    results = sorted((json.loads(m) for m in re.findall(r"RESULT (\{[^{}]*\})", proc.stdout)),
                     key=lambda r: r["rank"])
    assert [(r["micro_batch"], r["accum"], r["steps"]) for r in results] == [(1, 2, 1)] * 2, results
    assert results[1]["seen"] == [[2, None], [1, True]]  # rank 1's failed activation freed before its retry
    assert "destroy_process_group() was not called" not in proc.stderr

