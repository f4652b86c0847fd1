"""Training throughput on CPU: images/s of real training steps, and the data loader's share.

Measures, in one run on generated Potsdam scenes prepared at crop 256:
  * the loader alone (workers as given): seconds per batch of 4 crops,
  * training steps (forward, losses, backward, AdamW) at batch 4, crop 256, for
    fp32 / bf16 autocast x no checkpointing / checkpointing, through the trainer's own
    ``run_step_group`` with batches from the trainer's own loader.
The loader must not be the bottleneck: its time per batch is printed next to the step time.

    python benchmarks/train.py [--steps 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cmdbnet.data.loaders import train_loader
from cmdbnet.data.preparation import prepare
from cmdbnet.data.synthetic import synth
from cmdbnet.losses import CMDBLoss
from cmdbnet.models import build_model
from cmdbnet.runtime import DistInfo, resolve_precision
from cmdbnet.settings import load_settings
from cmdbnet.training.optim import build_optimizer
from cmdbnet.training.step import run_step_group
from cmdbnet.utils import peak_rss_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after 1 warm-up)")
    ap.add_argument("--workers", type=int, default=2, help="loader workers a training run would use")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(tempfile.mkdtemp(prefix="cmdb-bench-train-"))
    synth("potsdam", work / "raw", tiles=6, size=512, seed=0)
    prepare("potsdam", work / "raw", work / "prep", crop=args.crop, progress=False)
    device = torch.device("cpu")

    def settings(**model):
        return load_settings(None, {"data": {"prepared": work / "prep", "crop": args.crop, "workers": args.workers},
                                    "model": {"pretrained": "off", **model},
                                    "train": {"batch": args.batch, "accum": 1, "device": "cpu"}})

    # The loader is timed in this process (workers=0): its true cost per batch. With N
    # workers that cost is spread over N processes while the model trains.
    s = settings().model_copy(deep=True)
    s.data.workers = 0
    loader = train_loader(s, DistInfo(), device)
    loader.sampler.set_epoch(0)
    it = iter(loader)
    t_load = []
    batches = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        try:
            batches.append(next(it))
        except StopIteration:
            loader.sampler.set_epoch(len(batches))
            it = iter(loader)
            batches.append(next(it))
        t_load.append(time.perf_counter() - t0)
    load_s = statistics.median(t_load)

    rows = []
    for amp in (False, True):
        for ckpt in (False, True):
            cfg = settings(checkpointing=ckpt)
            torch.manual_seed(0)
            model = build_model(cfg.model).train()
            loss_fn = CMDBLoss(6)
            opt = build_optimizer(model, cfg.train)
            precision = resolve_precision(amp, "bf16", device)
            times = []
            for i, batch in enumerate(batches):
                t0 = time.perf_counter()
                run_step_group(model, loss_fn, [batch], [1.0], opt, None, precision, device, 1.0)
                if i:  # first step is warm-up
                    times.append(time.perf_counter() - t0)
            step = statistics.median(times)
            rows.append((precision.label, "yes" if ckpt else "no", step, args.batch / step))
            print(f"  measured {precision.label:5s} checkpointing={ckpt!s:5s}: {step:.2f} s/step", flush=True)

    print(f"\ntraining steps on CPU ({torch.get_num_threads()} threads), batch {args.batch}, crop {args.crop}, "
          f"full network, median of {args.steps}")
    print(f"{'autocast':9s} {'ckpt':5s} {'s/step':>8s} {'img/s':>7s} {'loader s/batch':>15s} {'loader share':>13s}")
    for label, ck, step, ips in rows:
        print(f"{label:9s} {ck:5s} {step:8.2f} {ips:7.2f} {load_s:15.3f} {load_s / step:12.1%}")
    fastest = min(r[2] for r in rows)
    print(f"peak RSS {peak_rss_bytes() / 2**30:.2f} GiB; loading costs {load_s:.3f} s of one core per batch, "
          f"{load_s / max(args.workers, 1):.3f} s with {args.workers} workers against {fastest:.2f} s per step: "
          f"the loader {'is not' if load_s / max(args.workers, 1) < 0.5 * fastest else 'IS'} the bottleneck")


if __name__ == "__main__":
    main()
