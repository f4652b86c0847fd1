"""The training loop: AMP, exact gradient accumulation, resume, DDP, OOM back-off.

Resume is exact because every source of randomness is either keyed by
(seed, epoch, index) (data order, augmentation) or saved in the checkpoint (torch, numpy
and Python RNG states for drop-path and friends), and the loop only stops at optimizer-step
boundaries: Ctrl-C in the middle of a step rolls that step back (BatchNorm statistics and
RNG state included) before ``last.pt`` is written, so an interrupted-and-resumed fp32 CPU
run ends with the same weights.
"""

from __future__ import annotations

import functools
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cmdbnet.checkpoint import load_checkpoint, save_checkpoint
from cmdbnet.data.loaders import batches_per_epoch, eval_loader, train_loader
from cmdbnet.errors import CmdbError
from cmdbnet.evaluation import make_metrics, score_loader
from cmdbnet.losses import CMDBLoss
from cmdbnet.models import build_model
from cmdbnet.runtime import (
    all_reduce_sum,
    barrier,
    init_distributed,
    memory_stats,
    pick_device,
    resolve_precision,
    rng_state,
    seed_everything,
    set_rng_state,
)
from cmdbnet.settings import Settings
from cmdbnet.training.console import TrainUI, scan_note
from cmdbnet.training.optim import build_optimizer, build_scheduler
from cmdbnet.training.setup import check_train_inputs, dataset_info, prepare_run_dir, settings_for_data
from cmdbnet.training.step import run_step_group
from cmdbnet.training.tensorboard import TBLogger, preview_strip
from cmdbnet.utils import write_text_atomic


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    epochs_done: int
    best_miou: float
    last_metrics: dict[str, Any] | None
    nonfinite_skipped: int
    micro_batch: int
    accum: int
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """One training run; see :func:`train`."""

    def __init__(self, settings: Settings, progress: bool = True,
                 stop_after_steps: int | None = None, fault_hook: Callable[[int, int], None] | None = None,
                 fit_note: str = ""):
        self.dist = init_distributed(settings.train.device)
        self.device = pick_device(settings.train.device, self.dist.local_rank)
        if settings.train.fit_vram:
            raise CmdbError("train.fit_vram is resolved before the run starts (cmdbnet.api.resolve_fit_vram)")
        self.run_dir = Path(settings.train.out)
        self.fresh = not self.run_dir.exists()
        self.manifest = check_train_inputs(settings, self.dist.is_main)
        settings = settings_for_data(settings, self.manifest)
        self.cfg = settings.train
        self.stop_after_steps, self.fault_hook = stop_after_steps, fault_hook
        self.precision = resolve_precision(self.cfg.amp, self.cfg.amp_dtype, self.device)
        self.micro_batch, self.accum = self.cfg.batch, self.cfg.accum
        resume = self._resume_payload(settings)
        seed_everything(self.cfg.seed)
        self.settings = settings
        self.info = dataset_info(self.manifest, settings)
        net = build_model(settings.model).to(self.device)
        if self.cfg.sync_bn and self.dist.enabled:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        self.net = net
        self.model = net if not self.dist.enabled else torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.loss_fn = CMDBLoss.from_settings(self.cfg, settings.model.num_classes,
                                              self.info["ignore_index"]).to(self.device)
        self.optimizer = build_optimizer(net, self.cfg)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision.needs_scaler else None
        self.val_loader = eval_loader(settings, "val", self.dist, self.device)
        self.metrics = make_metrics(self.info["classes"], self.info["ignore_index"], [], self.device)
        self.epoch, self.batches_done, self.step, self.best, self.nonfinite = 0, 0, 0, -1.0, 0
        self.loader = self._make_loader()
        self.total_steps = self.cfg.max_steps or self.cfg.epochs * max(
            1, math.ceil(batches_per_epoch(self.loader) / self.accum))
        self.scheduler = build_scheduler(self.optimizer, self.cfg, self.total_steps)
        if resume is not None:
            self._restore(resume)
        self.tb = TBLogger(None)  # opened in fit(), once the run folder is ready
        self.ui = TrainUI(enabled=progress and self.dist.is_main)
        self.fit_note = fit_note

    # ------------------------------------------------------------------ state
    def _resume_payload(self, settings: Settings) -> dict | None:
        if self.cfg.resume is None:
            return None
        src = Path(self.cfg.resume)
        ckpt = load_checkpoint(src / "last.pt" if src.is_dir() else src)
        if ckpt.get("settings", {}).get("model") != settings.model.model_dump(mode="json"):
            raise CmdbError(f"--resume {src}: the model settings differ from the checkpoint's; "
                            "resume with the same config and flags")
        return ckpt

    def _restore(self, ckpt: dict) -> None:
        self.net.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.batches_done, self.step = ckpt["epoch"], ckpt["batches_done"], ckpt["step"]
        self.best, self.nonfinite = ckpt.get("best_metric", -1.0), ckpt.get("nonfinite_skipped", 0)
        if ckpt.get("micro_batch") and ckpt["micro_batch"] != self.micro_batch:
            self.micro_batch, self.accum = ckpt["micro_batch"], ckpt["accum"]
            self.loader = self._make_loader()
        set_rng_state(ckpt["rng"])

    def _make_loader(self):
        s = self.settings.model_copy(update={"train": self.cfg.model_copy(update={"batch": self.micro_batch})})
        return train_loader(s, self.dist, self.device)

    def save(self, name: str, metrics: dict | None = None) -> Path | None:
        if not self.dist.is_main:
            return None
        payload = {
            "model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch, "batches_done": self.batches_done, "step": self.step,
            "micro_batch": self.micro_batch, "accum": self.accum, "rng": rng_state(),
            "best_metric": self.best, "nonfinite_skipped": self.nonfinite,
            "settings": self.settings.model_dump(mode="json"), "dataset": self.info,
            "metrics": {k: v for k, v in (metrics or {}).items() if k in ("mIoU", "OA", "mF1", "boundary_iou")},
        }
        return save_checkpoint(self.run_dir / name, payload)

    # ------------------------------------------------------------------ loop
    def _back_off(self, exc: BaseException) -> None:
        """Halve the micro-batch, double accumulation: same effective batch, less memory."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.micro_batch <= 1:
            self.save("last.pt")
            raise CmdbError("out of memory at micro-batch 1: lower --crop, use --checkpointing or --amp; "
                            f"last.pt saved in {self.run_dir}") from None
        self.micro_batch //= 2
        self.accum *= 2
        self.batches_done *= 2
        msg = f"out of memory: micro-batch -> {self.micro_batch}, accumulation -> {self.accum} (same effective batch)"
        self.ui.log(msg)
        self.tb.scalars({"memory/micro_batch": self.micro_batch, "memory/accum": self.accum}, self.step)
        self.tb.text("events", msg, self.step)
        self.loader = self._make_loader()

    def _epoch(self) -> None:
        """Train from ``batches_done`` to the end of the epoch or to the last step."""
        loader = self.loader
        loader.sampler.set_epoch(self.epoch)
        loader.sampler.skip = self.batches_done * self.micro_batch
        n_batches = self.n_batches = self.batches_done + batches_per_epoch(loader)
        it = iter(loader)
        while self.batches_done < n_batches:
            group_start = self.batches_done
            group_end = min((group_start // self.accum + 1) * self.accum, n_batches)
            rng0 = rng_state()
            hook = (lambda: self.fault_hook(self.step, self.micro_batch)) if self.fault_hook else None
            try:
                batches = [next(it) for _ in range(group_end - group_start)]
                sizes = [b["label"].shape[0] for b in batches]
                weights = [s / sum(sizes) for s in sizes]
                t0 = time.perf_counter()
                losses, stepped = run_step_group(self.model, self.loss_fn, batches, weights, self.optimizer,
                                                 self.scaler, self.precision, self.device, self.cfg.grad_clip,
                                                 self.dist, hook, functools.partial(self._commit, group_end))
            except torch.OutOfMemoryError as exc:
                self.batches_done = group_start
                self._back_off(exc)
                self._epoch()
                return
            except KeyboardInterrupt:
                if self.batches_done != group_end:  # interrupted before the step: roll the RNG back too
                    set_rng_state(rng0)
                raise
            if not stepped:
                self.nonfinite += 1
                self.consecutive_nonfinite += 1
                self.tb.scalars({"train/nonfinite_skipped": self.nonfinite}, self.step)
                self.ui.log(f"non-finite loss at step {self.step}: step skipped ({self.nonfinite} so far)")
                if self.consecutive_nonfinite >= self.cfg.max_nonfinite:
                    self._stop_nonfinite()
                continue
            self.consecutive_nonfinite = 0
            dt = time.perf_counter() - t0
            imgs = sum(sizes) * self.dist.world_size
            lr = self.optimizer.param_groups[0]["lr"]
            mem = memory_stats(self.device)
            self.tb.scalars({f"loss/{k}": v for k, v in losses.items()}, self.step)
            self.tb.scalars({"train/lr": lr, "train/images_per_s": imgs / dt}, self.step)
            self.tb.scalars({f"memory/{k}": v for k, v in mem.items()}, self.step)
            self.ui.step(self.epoch + 1, self.step, self.total_steps, losses, lr, imgs / dt, mem)
            if self.step >= self.total_steps or self._time_up():
                return
            if self.stop_after_steps is not None and self.step >= self.stop_after_steps:
                raise KeyboardInterrupt

    def _commit(self, group_end: int, stepped: bool) -> None:
        """Bookkeeping of a finished step group; runs with Ctrl-C held back (see run_step_group)."""
        self.batches_done = group_end
        if stepped:
            self.scheduler.step()
            self.step += 1

    def _stop_nonfinite(self) -> None:
        try:
            self.save("last.pt")
            saved = f"last.pt (the last finite state) saved in {self.run_dir}"
        except CmdbError:
            saved = "no checkpoint written: the weights themselves are non-finite"
        raise CmdbError(f"stopping: {self.consecutive_nonfinite} non-finite losses in a row; likely causes, in "
                        "order: NaN/inf pixels in the input (cmdb prepare reports them), a too high learning "
                        f"rate (lower --lr), fp16 overflow (--amp-dtype bf16 or --no-amp); {saved}")

    def _time_up(self) -> bool:
        """Whether the time budget is spent; ranks agree so none waits alone in a collective."""
        limit = self.cfg.time_limit_min
        if limit is None:
            return False
        up = torch.tensor(float(time.monotonic() - self.t_start >= 60 * limit), device=self.device)
        return bool(all_reduce_sum(up, self.dist) > 0)

    def validate(self) -> dict[str, Any]:
        scored = score_loader(self.model, self.val_loader, self.metrics, self.device, self.precision,
                              self.dist, keep_preview=self.cfg.log_images)
        m = scored.metrics
        self.tb.validation(m, self.step)
        if scored.preview is not None and self.cfg.log_images:
            strip = preview_strip(scored.preview, self.info["palette"], self.info["ignore_index"],
                                  self.info["mean"], self.info["std"])
            self.tb.image("val/image|label|prediction|boundary", strip, self.step)
        return m

    def fit(self) -> TrainResult:
        self.consecutive_nonfinite = 0
        self.t_start = time.monotonic()
        if self.dist.is_main:
            prepare_run_dir(self.run_dir, self.cfg.overwrite and self.cfg.resume is None)
            write_text_atomic(self.run_dir / "settings.yaml", self.settings.to_yaml())
            self.tb = TBLogger(self.run_dir / "tb")
        for note in (self.fit_note, self.precision.note, scan_note(self.device)):
            if note:
                self.ui.log(note)
        history: list[dict[str, Any]] = []
        last: dict[str, Any] | None = None
        self.ui.start(self.total_steps, self.step, self.describe())
        try:
            done = False
            while not done:
                complete = False  # resumed after the last step: only validation and saving are left
                if self.step < self.total_steps:
                    self._epoch()
                    complete = self.batches_done >= self.n_batches
                if complete:
                    self.epoch += 1
                    self.batches_done = 0
                done = (self.step >= self.total_steps or self._time_up()
                        or (not self.cfg.max_steps and self.epoch >= self.cfg.epochs))
                if (complete and self.epoch % self.cfg.val_interval == 0) or done:
                    last = self.validate()
                    history.append({"epoch": self.epoch, "step": self.step, "mIoU": last["mIoU"]})
                    if last["mIoU"] > self.best:
                        self.best = last["mIoU"]
                        self.save("best.pt", last)
                    self.save("last.pt", last)
                    self.ui.log(f"epoch {self.epoch} step {self.step}: val mIoU {last['mIoU']:.4f} "
                                f"OA {last['OA']:.4f} mF1 {last['mF1']:.4f} BIoU {last['boundary_iou']:.4f}")
        except KeyboardInterrupt:
            self.save("last.pt")
            self.ui.stop()
            self.tb.close()
            barrier(self.dist)
            raise
        except BaseException:
            self.tb.close()
            if self.fresh and self.dist.is_main and not any(self.run_dir.glob("*.pt")):
                shutil.rmtree(self.run_dir, ignore_errors=True)  # a failed new run leaves nothing behind
            raise
        finally:
            self.ui.stop()
        self.tb.close()
        barrier(self.dist)
        return TrainResult(self.run_dir, self.step, self.epoch, self.best, last, self.nonfinite,
                           self.micro_batch, self.accum, history)

    def describe(self) -> str:
        m = self.settings.model
        return (f"{m.variant if m.arch == 'cmdbnet' else m.arch} on {self.device} | {self.precision.label} | micro-batch "
                f"{self.micro_batch} x accum {self.accum} x {self.dist.world_size} rank(s) | "
                f"crop {self.settings.data.crop} | {self.total_steps} steps")


def train(settings: Settings, progress: bool = True, stop_after_steps: int | None = None,
          fault_hook: Callable[[int, int], None] | None = None, fit_note: str = "") -> TrainResult:
    """Train the network described by ``settings`` on ``settings.data.prepared``.

    ``stop_after_steps`` behaves like Ctrl-C after that many optimizer steps (last.pt is
    saved, KeyboardInterrupt propagates); ``fault_hook(step, micro_batch)`` runs before each
    forward and may raise (tests inject out-of-memory errors through it). ``settings.train.fit_vram``
    must already be resolved (:func:`cmdbnet.api.train` does it); ``fit_note`` says how.
    """
    return Trainer(settings, progress, stop_after_steps, fault_hook, fit_note).fit()
