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
import gc
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cmdbnet.checkpoint import RESUME_ONLY, load_checkpoint, save_checkpoint
from cmdbnet.data.loaders import batches_per_epoch, eval_loader, train_loader
from cmdbnet.errors import CmdbError
from cmdbnet.evaluation import make_metrics, score_loader
from cmdbnet.losses import CMDBLoss
from cmdbnet.models import build_model
from cmdbnet.runtime import (
    all_reduce_sum,
    barrier,
    broadcast_module,
    configure_cuda,
    end_distributed,
    init_distributed,
    memory_stats,
    pick_device,
    release_cached_memory,
    resolve_precision,
    rng_state,
    seed_everything,
    set_rng_state,
)
from cmdbnet.settings import Settings
from cmdbnet.training.console import TrainUI, scan_note
from cmdbnet.training.optim import build_optimizer, build_scheduler
from cmdbnet.training.setup import (
    check_resume_settings,
    check_train_inputs,
    dataset_info,
    prepare_run_dir,
    settings_for_data,
)
from cmdbnet.training.step import StepOutOfMemory, run_step_group
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
        try:
            self._setup(settings, progress, stop_after_steps, fault_hook, fit_note)
        except BaseException:
            end_distributed(self.dist)
            raise

    def _setup(self, settings: Settings, progress: bool, stop_after_steps: int | None,
               fault_hook: Callable[[int, int], None] | None, fit_note: str) -> None:
        self.device = pick_device(settings.train.device, self.dist.local_rank)
        configure_cuda(self.device, settings.train.tf32)
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
        self.resume_note = ""
        resume = self._resume_payload(settings)
        seed_everything(self.cfg.seed)
        self.settings = settings
        self.info = dataset_info(self.manifest, settings)
        net = build_model(settings.model).to(self.device)
        if self.cfg.sync_bn and self.dist.enabled:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        # no DistributedDataParallel: run_step_group averages the gradients itself, after the ranks
        # agree the step went well (so an out-of-memory error on one rank cannot hang the others)
        broadcast_module(net, self.dist)
        self.net = self.model = net
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
        if "optimizer" not in ckpt:
            raise CmdbError(f"--resume {src}: this checkpoint holds weights only (best.pt keeps no optimizer "
                            "state); resume from last.pt or the run folder")
        self.resume_note = check_resume_settings(src, ckpt.get("settings") or {}, settings)
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
        if name == "best.pt":  # for predict, evaluate and export: weights, not the state a resume needs
            payload = {k: v for k, v in payload.items() if k not in RESUME_ONLY}
        return save_checkpoint(self.run_dir / name, payload)

    # ------------------------------------------------------------------ loop
    def _back_off(self) -> None:
        """Halve the micro-batch, double accumulation: same effective batch, less memory.

        Every rank calls it at the same step (the ranks agree on an out-of-memory error in
        run_step_group), outside any ``except`` block: no traceback keeps the failed step alive.
        """
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        release_cached_memory(self.device)
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
        """Train from ``batches_done`` to the end of the epoch or to the last step; back off on OOM."""
        while self._epoch_part() == "oom":
            self._back_off()

    def _epoch_part(self) -> str:
        """Train until the epoch or the run ends ("done"), or until every rank ran out of memory ("oom")."""
        loader = self.loader
        loader.sampler.set_epoch(self.epoch)
        loader.sampler.skip = self.batches_done * self.micro_batch
        n_batches = self.n_batches = self.batches_done + batches_per_epoch(loader)
        it = iter(loader)
        oom_late, group_start = False, self.batches_done
        while self.batches_done < n_batches:
            group_start = self.batches_done
            group_end = min((group_start // self.accum + 1) * self.accum, n_batches)
            rng0 = rng_state()
            oom_late = False
            hook = (lambda: self.fault_hook(self.step, self.micro_batch)) if self.fault_hook else None
            try:
                batches = [next(it) for _ in range(group_end - group_start)]
                sizes = [b["label"].shape[0] for b in batches]
                weights = [s / sum(sizes) for s in sizes]
                t0 = time.perf_counter()
                losses, stepped = run_step_group(self.model, self.loss_fn, batches, weights, self.optimizer,
                                                 self.scaler, self.precision, self.device, self.cfg.grad_clip,
                                                 self.dist, hook, functools.partial(self._commit, group_end))
            except StepOutOfMemory:  # every rank raised it, after dropping the failed step's tensors
                self.batches_done = group_start
                return "oom"
            except torch.OutOfMemoryError:  # in the optimizer step, after the ranks agreed
                oom_late = True
            except KeyboardInterrupt:
                if self.batches_done != group_end:  # interrupted before the step: roll the RNG back too
                    set_rng_state(rng0)
                raise
            if oom_late:
                break
            if not stepped:
                self.nonfinite += 1
                self.consecutive_nonfinite += 1
                self.tb.scalars({"train/nonfinite_skipped": self.nonfinite}, self.step)
                self.ui.log(f"non-finite loss at step {self.step}: step skipped ({self.nonfinite} so far)")
                if self.consecutive_nonfinite >= self.cfg.max_nonfinite:
                    self._stop_nonfinite()
                continue
            self.consecutive_nonfinite = 0
            up = self._time_flag()
            read = torch.stack([*losses.values(), *([up] if isinstance(up, torch.Tensor) else [])]).tolist()
            losses = dict(zip(losses, read))  # the step's second host sync: the loss values and the time flag
            up = bool(read[-1]) if isinstance(up, torch.Tensor) else up
            dt = time.perf_counter() - t0
            imgs = sum(sizes) * self.dist.world_size
            lr = self.optimizer.param_groups[0]["lr"]
            mem = memory_stats(self.device)
            self.tb.scalars({f"loss/{k}": v for k, v in losses.items()}, self.step)
            self.tb.scalars({"train/lr": lr, "train/images_per_s": imgs / dt}, self.step)
            self.tb.scalars({f"memory/{k}": v for k, v in mem.items()}, self.step)
            self.ui.step(self.epoch + 1, self.step, self.total_steps, losses, lr, imgs / dt, mem)
            if self.step >= self.total_steps or up:
                return "done"
            if self.stop_after_steps is not None and self.step >= self.stop_after_steps:
                raise KeyboardInterrupt
        if oom_late:
            self.batches_done = group_start
            if self.dist.enabled:  # this rank alone, after the others stepped: it stops, torchrun stops them
                raise CmdbError(f"out of memory in the optimizer step on rank {self.dist.rank}: lower --batch "
                                "or use --checkpointing / --amp, then --resume from the last checkpoint")
            return "oom"
        return "done"

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

    def _time_flag(self) -> bool | torch.Tensor:
        """Whether the time budget is spent: a bool alone, a device tensor (> 0: spent) that ranks agree on."""
        limit = self.cfg.time_limit_min
        if limit is None:
            return False
        up = time.monotonic() - self.t_start >= 60 * limit
        if not self.dist.enabled:
            return up
        return all_reduce_sum(torch.full((), float(up), device=self.device), self.dist)

    def _time_up(self) -> bool:
        """Whether the time budget is spent; ranks agree so none waits alone in a collective."""
        up = self._time_flag()
        return bool(up > 0) if isinstance(up, torch.Tensor) else up

    def validate(self) -> dict[str, Any]:
        broadcast_module(self.net, self.dist, buffers_only=True)  # every rank scores with rank 0's statistics
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
        for note in (self.fit_note, self.resume_note, self.precision.note, scan_note(self.device)):
            if note:
                self.ui.log(note)
        history: list[dict[str, Any]] = []
        last: dict[str, Any] | None = None
        self.ui.start(self.total_steps, self.step, self.describe())
        finished = False
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
            finished = True
        except KeyboardInterrupt:
            self.save("last.pt")
            self.ui.stop()
            self.tb.close()
            barrier(self.dist)
            raise
        except CmdbError:
            self.tb.close()
            if self.fresh and self.dist.is_main and self.step == self.nonfinite == 0 and not any(self.run_dir.glob("*.pt")):
                shutil.rmtree(self.run_dir, ignore_errors=True)  # bad input before any step leaves nothing behind
            raise
        except BaseException:
            self.tb.close()  # a crash keeps the run folder: its settings and logs show what led there
            raise
        finally:
            self.ui.stop()
            if not finished:
                end_distributed(self.dist)
        self.tb.close()
        barrier(self.dist)
        end_distributed(self.dist)
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
