"""Where and how a run executes: device, seeds, autocast, distributed ranks, memory.

Why one module: the trainer, evaluator, profiler and predictor must agree on these
choices (e.g. that fp16 autocast needs CUDA) or their numbers stop being comparable.
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from cmdbnet.errors import CmdbError


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` means CUDA when present; asking for CUDA without it is a user error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise CmdbError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit.


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch so a fixed seed gives the same run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Precision:
    """The autocast choice actually in force, with the reason when it differs from the ask."""

    enabled: bool
    dtype: torch.dtype
    note: str = ""

    @property
    def needs_scaler(self) -> bool:
        return self.enabled and self.dtype == torch.float16

    def autocast(self, device: torch.device):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    @property
    def label(self) -> str:
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.dtype, "fp32") if self.enabled else "fp32"


def resolve_precision(amp: bool, amp_dtype: str, device: torch.device) -> Precision:
    """fp16 autocast is a CUDA recipe; on CPU only bf16 autocast is worth running."""
    if not amp:
        return Precision(False, torch.float32)
    dtype = torch.float16 if amp_dtype == "fp16" else torch.bfloat16
    if device.type == "cpu" and dtype == torch.float16:
        return Precision(False, torch.float32, "fp16 autocast needs CUDA: running fp32 on CPU "
                                                "(use --amp-dtype bf16 to autocast on CPU)")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return Precision(True, torch.float16, "this GPU has no bf16: using fp16 autocast")
    return Precision(True, dtype)


def inference_precision(amp: bool, device: torch.device) -> Precision:
    """Autocast for predict and evaluate: fp16 on CUDA (no loss to scale), bf16 on CPU."""
    return resolve_precision(amp, "fp16" if device.type == "cuda" else "bf16", device)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str, timeout: timedelta | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op when alone).

    NCCL on CUDA, gloo on CPU: the gloo path is what the tests run. ``timeout`` bounds how
    long a collective waits for the slowest rank (torch's default when None).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        kwargs = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", **kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_module(module: torch.nn.Module, info: DistInfo, buffers_only: bool = False) -> None:
    """Give every rank rank 0's parameters (unless ``buffers_only``) and buffers (BatchNorm statistics)."""
    if not (info.enabled and dist.is_initialized()):
        return
    tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def end_distributed(info: DistInfo) -> None:
    """Leave the process group (at the end of a run, also a failed one), so no rank keeps its peers waiting."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def release_cached_memory(device: torch.device) -> None:
    """Hand the caching allocator's free blocks back to the driver (after an out-of-memory error)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def configure_cuda(device: torch.device, tf32: bool | None = None) -> None:
    """Fast CUDA defaults for fixed input shapes: cuDNN autotuning, and TF32 for fp32 when ``tf32``.

    Why: training crops and predict windows keep one shape, so cuDNN's per-shape search pays
    off after the first batch; TF32 runs fp32 matmuls and convolutions on the tensor cores of
    Ampere and later cards (a 10-bit mantissa; AMP runs are unaffected). ``tf32=None`` leaves
    torch's choice. Nothing happens on other devices.
    """
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    if tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def memory_stats(device: torch.device) -> dict[str, float]:
    """Memory in MiB: CUDA allocated/reserved on a GPU, process RSS on CPU."""
    if device.type == "cuda":
        return {"cuda_allocated_mib": torch.cuda.memory_allocated(device) / 2**20,
                "cuda_reserved_mib": torch.cuda.memory_reserved(device) / 2**20,
                "cuda_max_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    import psutil

    return {"rss_mib": psutil.Process().memory_info().rss / 2**20}


def rng_state() -> dict:
    """All random states as tensors and plain values (safe for weights_only loading)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_s = state["numpy"]
    np.random.set_state(("MT19937", np_s["keys"].numpy().astype(np.uint32), np_s["pos"],
                         np_s["has_gauss"], np_s["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        _set_cuda_rng_states(list(state["cuda"]))


def _set_cuda_rng_states(saved: list[torch.Tensor]) -> None:
    """Restore the saved CUDA generators that exist here; warn once when the machine has fewer GPUs."""
    n = torch.cuda.device_count()
    for i, s in enumerate(saved[:n]):
        torch.cuda.set_rng_state(s, i)
    if len(saved) > n:
        warnings.warn(f"the checkpoint holds the random state of {len(saved)} GPUs, this machine has {n}: "
                      f"restored the first {n}; a resumed run is not bit-exact", RuntimeWarning, stacklevel=3)
