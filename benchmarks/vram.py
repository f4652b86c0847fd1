"""Estimated peak GPU memory of the design's training recipes, and, on CUDA, the measured peak beside it.

Why both in one run: the estimate (cmdbnet/profiling/tracing.py) exists for machines without the
GPU; it is only worth trusting as far as it matches a measurement on one. On a CUDA machine
each recipe is traced and then trained for three real steps (forward, backward, AdamW) in the
same process, and the ratio estimate / measured is printed: the allowances for workspace and
fragmentation in memory.py are calibrated against that column.

    python benchmarks/vram.py                    # default network, estimates (+ measured on CUDA)
    python benchmarks/vram.py --backbone resnet18 --variant cnn_only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmdbnet.errors import CmdbError  # noqa: E402
from cmdbnet.profiling.budget import CONTEXT_RESERVE, MemoryConfig, estimate, measure_cuda  # noqa: E402
from cmdbnet.settings import load_settings  # noqa: E402
from cmdbnet.utils import format_bytes  # noqa: E402

RECIPES = [  # (name, batch, accum, crop, amp, checkpointing): the default recipe and its levers
    ("default recipe", 4, 4, 256, True, False),
    ("no AMP", 4, 4, 256, False, False),
    ("checkpointing", 4, 4, 256, True, True),
    ("batch 2, crop 512", 2, 8, 512, True, False),
    ("batch 2, crop 512, ckpt", 2, 8, 512, True, True),
    ("remedy: batch 2, crop 192", 2, 8, 192, True, False),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default=None)
    ap.add_argument("--variant", default=None)
    args = ap.parse_args()
    base = load_settings(None, {"model": {"backbone": args.backbone, "variant": args.variant}})
    cuda = torch.cuda.is_available()
    print(f"network: {base.model.variant}, {base.model.backbone}, Mamba depths {base.model.mamba_depths}; "
          f"torch {torch.__version__}")
    print(f"on {torch.cuda.get_device_name()}" if cuda else "no CUDA device: estimates only")
    head = f"{'recipe':28s} {'flags':58s} {'estimate':>11s} {'+context':>11s}"
    print(head + (f" {'measured':>11s} {'ratio':>6s}" if cuda else "") + f" {'time':>6s}")
    for name, batch, accum, crop, amp, ckpt in RECIPES:
        config = MemoryConfig(batch, accum, crop, amp, "fp16", ckpt)
        settings = config.apply(base)
        t0 = time.perf_counter()
        est = estimate(settings)
        dt = time.perf_counter() - t0
        line = (f"{name:28s} {config.flags():58s} {format_bytes(est.peak):>11s} "
                f"{format_bytes(est.peak + CONTEXT_RESERVE):>11s}")
        if cuda:
            try:
                got = measure_cuda(settings)
                line += f" {format_bytes(got.peak):>11s} {est.peak / got.peak:6.2f}"
            except CmdbError as exc:
                line += f" {'OOM':>11s} {'-':>6s}  ({exc})"
        print(line + f" {dt:5.1f}s", flush=True)
    print("estimate: peak reserved by PyTorch's allocator for one training step, traced on fake CUDA tensors; "
          f"+context adds the {format_bytes(CONTEXT_RESERVE)} CUDA-context reserve a budget check uses"
          + ("; measured: torch.cuda.max_memory_reserved over real steps" if cuda else ""))


if __name__ == "__main__":
    main()
