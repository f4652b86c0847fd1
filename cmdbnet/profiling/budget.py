"""Peak GPU memory of a recipe (estimated from ``tracing``'s traces, or measured on CUDA) and the
recipe that fits a budget.

Why a search at all: the memory levers (micro-batch, accumulation, crop, mixed
precision, checkpointing) trade speed for memory in different amounts, and users asked "what
should I run on my 6 GB card" long before they asked "how many bytes". The answer keeps the
effective batch (micro-batch x accumulation) so the optimisation recipe does not change.

Speed model used for the ranking (relative pixel throughput, documented, not measured):
mixed precision x1.8 (tensor cores), checkpointing x0.75 (one more forward per step),
micro-batch b x b/(b + 0.3) (a GPU runs small batches below full occupancy). The crop is a data
recipe, not a speed lever: configurations at the configured crop rank first, smaller crops
next (largest first), larger crops last.
"""

from __future__ import annotations

import functools
import gc
from dataclasses import dataclass, field
from typing import Any

import torch

from cmdbnet.data.registry import IGNORE_INDEX
from cmdbnet.errors import CmdbError
from cmdbnet.losses import CMDBLoss
from cmdbnet.models import build_model
from cmdbnet.profiling.tracing import cuda_scan_backend, skeleton, trace_forward, trace_loss
from cmdbnet.runtime import configure_cuda, pick_device, resolve_precision
from cmdbnet.settings import ModelSettings, Settings
from cmdbnet.training.optim import build_optimizer
from cmdbnet.training.step import StepOutOfMemory, run_step_group
from cmdbnet.utils import format_bytes, parse_bytes

MiB = 2**20
CONTEXT_RESERVE = 512 * MiB  # CUDA context + cuDNN/cuBLAS handles: ~300-500 MiB on Ampere/Ada
WORKSPACE = 32 * MiB
FRAGMENTATION = 0.10
BATCHES = (8, 4, 2, 1)
CROPS = (512, 384, 256, 192)


@dataclass(frozen=True)
class MemoryConfig:
    """The memory levers of one training run."""

    batch: int
    accum: int
    crop: int
    amp: bool
    amp_dtype: str
    checkpointing: bool

    @classmethod
    def from_settings(cls, s: Settings) -> MemoryConfig:
        return cls(s.train.batch, s.train.accum, s.data.crop, s.train.amp, s.train.amp_dtype, s.model.checkpointing)

    def apply(self, s: Settings) -> Settings:
        train = s.train.model_copy(update={"batch": self.batch, "accum": self.accum, "amp": self.amp,
                                           "amp_dtype": self.amp_dtype})
        return s.model_copy(update={"train": train, "data": s.data.model_copy(update={"crop": self.crop}),
                                    "model": s.model.model_copy(update={"checkpointing": self.checkpointing})})

    def flags(self) -> str:
        amp = ("--amp" + (" --amp-dtype bf16" if self.amp_dtype == "bf16" else "")) if self.amp else "--no-amp"
        ckpt = "--checkpointing" if self.checkpointing else "--no-checkpointing"
        return f"--batch {self.batch} --accum {self.accum} --crop {self.crop} {amp} {ckpt}"

    def describe(self) -> str:
        amp = f"{self.amp_dtype} AMP" if self.amp else "fp32"
        return (f"batch {self.batch} x accum {self.accum}, crop {self.crop}, {amp}, "
                f"{'checkpointing' if self.checkpointing else 'no checkpointing'}")

    def as_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "accum": self.accum, "effective_batch": self.batch * self.accum,
                "crop": self.crop, "amp": self.amp, "amp_dtype": self.amp_dtype if self.amp else "fp32",
                "checkpointing": self.checkpointing}

    @property
    def speed(self) -> float:
        """Relative throughput (see the module docstring); 1.0 = fp32, no checkpointing, batch 8."""
        b = self.batch
        return (1.8 if self.amp else 1.0) * (0.75 if self.checkpointing else 1.0) * (b / (b + 0.3)) / (8 / 8.3)


@dataclass
class MemoryReport:
    """Peak GPU memory of one configuration and what it is made of, in bytes."""

    device: str  # "cuda" (measured) or "estimate"
    config: MemoryConfig
    weights: int
    gradients: int
    optimizer: int
    activations: int
    peak: int  # reserved: what the card must hold besides the CUDA context
    peak_allocated: int
    overheads: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def parts(self) -> dict[str, int]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations}

    def fits(self, budget: int, reserve: int = CONTEXT_RESERVE) -> bool:
        return self.peak + reserve <= budget

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "config": self.config.as_dict(), "peak_bytes": int(self.peak),
                "peak_allocated_bytes": int(self.peak_allocated), "parts": self.parts,
                "overheads": dict(self.overheads), "context_reserve_bytes": CONTEXT_RESERVE, "notes": self.notes}


# ----------------------------------------------------------------------------- estimate
def _bilinear(q1: float, q2: float, q3: float | None, b: int, p: int, p_ref: int, p_alt: int) -> float:
    """q = a + s*b + c*b*p from q1 = q(2, p_ref), q2 = q(4, p_ref) and q3 = q(2, p_alt)."""
    slope_ref = (q2 - q1) / 2
    a = q1 - 2 * slope_ref
    if p == p_ref or q3 is None:
        return a + slope_ref * b
    c = (slope_ref - (q3 - a) / 2) / (p_ref - p_alt)
    return a + (slope_ref - c * p_ref) * b + c * b * p


def _pixels(crop: int) -> int:
    return (-(-crop // 32) * 32) ** 2  # the network pads to a multiple of 32


class _Surface:
    """Activations of one network, precision and checkpointing as a function of (batch, crop)."""

    def __init__(self, settings: Settings, amp: bool, amp_dtype: str, checkpointing: bool, ref_crop: int):
        self.settings, self.amp, self.amp_dtype, self.ckpt = settings, amp, amp_dtype, checkpointing
        self.ref = ref_crop
        self.alt = max(64, ref_crop // 64 * 32) if ref_crop >= 128 else 2 * ref_crop
        self.traces: dict[tuple[int, int], Any] = {}
        self.loss: Any = None
        self.signature: tuple | None = None

    def _fwd(self, batch: int, crop: int):
        if (batch, crop) not in self.traces:
            self.traces[batch, crop], self.signature = trace_forward(
                self.settings, batch, crop, self.amp, self.amp_dtype, self.ckpt)
        return self.traces[batch, crop]

    def _loss(self):
        """The loss at batch 1 and the reference crop: every tensor it keeps scales with batch x pixels."""
        if self.loss is None:
            self._fwd(2, self.ref)
            self.loss = trace_loss(self.settings, self.signature, self.ref)
        return self.loss

    def at(self, batch: int, crop: int) -> dict[str, Any]:
        t1, t2 = self._fwd(2, self.ref), self._fwd(4, self.ref)
        t3 = None if _pixels(crop) == _pixels(self.ref) else self._fwd(2, self.alt)
        args = (batch, _pixels(crop), _pixels(self.ref), _pixels(self.alt))

        def q(get) -> float:
            return _bilinear(get(t1), get(t2), None if t3 is None else get(t3), *args)

        def states(scans) -> int:  # (b, d, l, n) traced at (2, ref): l scales with the pixels
            return sum(t1.scan_state_bytes(batch, d, l * args[1] // args[2], n) for _, d, l, n in scans)

        loss, per_sample = self._loss(), batch * args[1] / args[2]
        recompute = max((q(lambda t, i=i: t.stages[i][0]) + states(s) for i, (_, s) in enumerate(t1.stages)),
                        default=0.0)
        return {"activations": q(lambda t: t.linear) + states(t1.scans) + per_sample * loss.linear,
                "scan_states": states(t1.scans),
                "largest": max(q(lambda t: t.largest), per_sample * loss.largest),
                "recompute": recompute, "rounding": q(lambda t: t.rounding) + per_sample * loss.rounding}


@functools.lru_cache(maxsize=16)
def _surface(settings_json: str, amp: bool, amp_dtype: str, checkpointing: bool, ref_crop: int,
             scan_backend: str) -> _Surface:
    """Cached per settings and per scan backend modelled (``CMDB_SCAN_BACKEND`` can change it)."""
    return _Surface(Settings.model_validate_json(settings_json), amp, amp_dtype, checkpointing, ref_crop)


def _param_bytes(settings: Settings) -> tuple[int, int]:
    """(weights incl. buffers, trainable parameters) in bytes."""
    net = skeleton(settings.model.model_copy(update={"checkpointing": False}).model_dump_json())
    params = {id(p): p for p in net.parameters()}.values()
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    total = sum(p.numel() * p.element_size() for p in params) + sum(b.numel() * b.element_size()
                                                                      for b in net.buffers())
    return total, trainable


def estimate(settings: Settings, ref_crop: int | None = None) -> MemoryReport:
    """Estimated peak GPU memory of one training step of ``settings`` on CUDA (see ``tracing``)."""
    c = MemoryConfig.from_settings(settings)
    ref = ref_crop or c.crop
    key = MemoryConfig(4, 1, ref, False, "fp16", False).apply(settings)  # one surface serves every lever
    surface = _surface(key.model_dump_json(), c.amp, c.amp_dtype, c.checkpointing, ref, cuda_scan_backend())
    a = surface.at(c.batch, c.crop)
    weights, trainable = _param_bytes(settings)
    transient = 2 * a["largest"] + a["recompute"]
    backward = a["activations"] + transient + WORKSPACE
    dynamic = max(backward, trainable)  # AdamW's step temporary is one parameter-sized buffer
    frag = FRAGMENTATION * dynamic
    static = weights + trainable + 2 * trainable
    overheads = ({"backward_transient": transient, "workspace": WORKSPACE} if backward >= trainable
                 else {"optimizer_step": trainable - a["activations"]})
    overheads["allocator"] = a["rounding"] + frag
    notes = [f"estimated for a CUDA run: traced on fake CUDA tensors with CUDA's {c.amp_dtype} autocast rules"
             if c.amp else "estimated for a CUDA run: traced on fake CUDA tensors (fp32)",
             "activations: storages alive after forward and loss (saved for backward, outputs, batch, "
             f"checkpoint inputs), incl. {format_bytes(a['scan_states'])} of state saved by the "
             f"{cuda_scan_backend()} scan (the one CUDA tensors would run here)",
             f"backward transient: 2 x the largest activation ({format_bytes(a['largest'])})"
             + (f" + recompute of the largest checkpointed stage ({format_bytes(a['recompute'])})"
                if c.checkpointing else ""),
             f"workspace: {format_bytes(WORKSPACE)} allowance for cuBLAS/cuDNN; allocator: 512-byte rounding + "
             f"{FRAGMENTATION:.0%} fragmentation",
             f"plus the CUDA context, not included: budget checks reserve {format_bytes(CONTEXT_RESERVE)}"]
    overheads = {k: int(v) for k, v in overheads.items()}
    parts = [int(weights), int(trainable), int(2 * trainable), int(a["activations"])]
    peak = sum(parts) + sum(overheads.values())
    return MemoryReport("estimate", c, *parts, peak=peak, peak_allocated=int(static + dynamic + a["rounding"]),
                        overheads=overheads, notes=notes)


# ----------------------------------------------------------------------------- measure
def measure_cuda(settings: Settings, steps: int = 3) -> MemoryReport:
    """Run real training steps (forward, backward, AdamW) on CUDA and read the allocator's peaks.

    Weights are read after the model moves to the GPU, the optimizer state after the first step
    (AdamW creates it lazily); peaks are taken over the later steps, so cuDNN autotuning and
    first-step allocations do not count. "activations" is the peak less weights, gradients and
    optimizer state: it includes the transients the estimate models separately.
    """
    c, dev = MemoryConfig.from_settings(settings), pick_device("cuda")
    ms, t = settings.model, settings.train
    configure_cuda(dev, t.tf32)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    net = opt = None
    oom = False
    try:
        net = build_model(ms.model_copy(update={"pretrained": "off", "backbone_weights": None})).to(dev).train()
        weights = torch.cuda.memory_allocated(dev) - base
        grads = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
        loss_fn = CMDBLoss.from_settings(t, ms.num_classes, IGNORE_INDEX).to(dev)
        opt = build_optimizer(net, t)
        precision = resolve_precision(c.amp, c.amp_dtype, dev)
        scaler = torch.amp.GradScaler("cuda") if precision.needs_scaler else None
        n = min(c.accum, 2)

        def group() -> None:
            batches = [{"image": torch.randn(c.batch, ms.in_channels, c.crop, c.crop, device=dev),
                        "label": torch.randint(0, ms.num_classes, (c.batch, c.crop, c.crop), device=dev)}
                       for _ in range(n)]
            run_step_group(net, loss_fn, batches, [1 / n] * n, opt, scaler, precision, dev, t.grad_clip)  # noqa: F821 - bound above; ruff misreads the later del

        group()
        torch.cuda.synchronize(dev)
        optimizer = torch.cuda.memory_allocated(dev) - base - weights
        torch.cuda.reset_peak_memory_stats(dev)
        for _ in range(max(1, steps - 1)):
            group()
        torch.cuda.synchronize(dev)
        peak_alloc = torch.cuda.max_memory_allocated(dev) - base
        peak = torch.cuda.max_memory_reserved(dev)
    except (torch.OutOfMemoryError, StepOutOfMemory):
        oom = True  # raised below: a traceback kept alive here would hold the failed step's tensors
    finally:
        del net, opt
    gc.collect()
    torch.cuda.empty_cache()  # the next measurement starts from an empty cache
    if oom:
        total = torch.cuda.get_device_properties(dev).total_memory
        raise CmdbError(f"{c.describe()} does not fit on this GPU ({format_bytes(total)}): out of memory")
    activations = peak_alloc - weights - grads - optimizer
    name = torch.cuda.get_device_name(dev)
    notes = [f"measured on {name}: {steps} training steps of {n} micro-batch(es), peaks over the last {steps - 1}",
             "activations = peak allocated - weights - gradients - optimizer (backward transients included)",
             "peak = max reserved by the caching allocator; the CUDA context comes on top"]
    return MemoryReport("cuda", c, weights, grads, optimizer, activations, peak=peak, peak_allocated=peak_alloc,
                        overheads={"allocator": peak - peak_alloc}, notes=notes)


def profile(settings: Settings, device: str = "auto") -> MemoryReport:
    """Measure on CUDA when asked for (or ``auto`` and present), else estimate."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return measure_cuda(settings)
    return estimate(settings)


# ----------------------------------------------------------------------------- fit a budget
def candidates(settings: Settings) -> list[MemoryConfig]:
    """Every searched recipe that keeps the effective batch (micro-batch x accumulation)."""
    effective = settings.train.batch * settings.train.accum
    crops = sorted(set(CROPS) | {settings.data.crop}, reverse=True)
    return [MemoryConfig(b, effective // b, crop, amp, settings.train.amp_dtype, ckpt)
            for b in BATCHES if effective % b == 0 for crop in crops for amp in (True, False) for ckpt in (False, True)]


def rank_key(config: MemoryConfig, want_crop: int) -> tuple:
    tier = 0 if config.crop == want_crop else 1 if config.crop < want_crop else 2
    return tier, -config.crop if tier == 1 else config.crop, -config.speed


@functools.lru_cache(maxsize=8)
def _trains_at_batch_1(model_json: str) -> bool:
    """Whether the network trains on single samples (BatchNorm on a 1x1 map refuses them)."""
    s = Settings().model_copy(update={"model": ModelSettings.model_validate_json(model_json)})
    try:
        trace_forward(s, 1, 64, False)
    except ValueError:
        return False
    return True


@dataclass
class Fit:
    config: MemoryConfig
    report: MemoryReport


def search(settings: Settings, budget: int, first_only: bool = False,
           reserve: int = CONTEXT_RESERVE) -> tuple[list[Fit], Fit | None]:
    """Recipes whose estimated peak + ``reserve`` fits ``budget``, best first; and the smallest peak seen.

    A recipe with a larger micro-batch and crop than one that does not fit (same precision and
    checkpointing) is not estimated: memory only grows with both.
    """
    want = settings.data.crop
    fits, smallest, too_big = [], None, []
    single = _trains_at_batch_1(settings.model.model_copy(update={"checkpointing": False}).model_dump_json())
    for config in sorted(candidates(settings), key=lambda c: rank_key(c, want)):
        if (config.batch == 1 and not single) or any(
                (b.amp, b.checkpointing) == (config.amp, config.checkpointing) and b.batch <= config.batch
                and b.crop <= config.crop for b in too_big):
            continue
        report = estimate(config.apply(settings), ref_crop=want)
        if smallest is None or report.peak < smallest.report.peak:
            smallest = Fit(config, report)
        if not report.fits(budget, reserve):
            too_big.append(config)
            continue
        fits.append(Fit(config, report))
        if first_only:
            break
    return fits, smallest


def fit_settings(settings: Settings, budget: str | int) -> tuple[Settings, str]:
    """Apply the fastest recipe whose estimated peak fits ``budget`` (e.g. "6GB"); one-line message.

    Raises CmdbError, with the smallest estimated peak, when no searched recipe fits.
    """
    limit = parse_bytes(budget)
    fits, smallest = search(settings, limit, first_only=True)
    if not fits:
        low = f"; the smallest estimated peak is {format_bytes(smallest.report.peak)} ({smallest.config.describe()})" \
            if smallest else ""
        raise CmdbError(f"no recipe fits {format_bytes(limit)} (with {format_bytes(CONTEXT_RESERVE)} for the CUDA "
                        f"context){low}; a lighter model.backbone or shallower model.mamba_depths needs less")
    best = fits[0]
    return best.config.apply(settings), (
        f"--fit-vram {format_bytes(limit)}: {best.config.describe()} (estimated peak "
        f"{format_bytes(best.report.peak)} + {format_bytes(CONTEXT_RESERVE)} CUDA context)")
