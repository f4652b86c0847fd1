"""Training-step time of the network against a ResNet34 U-Net, measured alternately in one run.

Why a U-Net baseline built here: "is a dual-branch Mamba network affordable?" only has an
answer relative to what a user would otherwise train, on the same machine, in the same
process, under the same load. Rounds alternate (ours, U-Net, ours, ...) so a load spike
from another process hits both, and medians discard the odd slow round.

One step = forward, loss, backward, fused AdamW step (as `cmdb train` runs it, for both), fp32 on CPU. Then the inference forward
(eval mode, batch 4 of 512 x 512 by default; ours under inference_mode as ``cmdb predict``
runs it, the U-Net under no_grad), alternating the same way. Our loss includes the auxiliary
and boundary terms, as in training; the U-Net's is cross-entropy on its one output.

    python benchmarks/model.py                      # batch 4, 256 x 256, 5 rounds
    python benchmarks/model.py --rounds 3 --variant no_boundary
    python benchmarks/model.py --scan-share         # how much of the step is the selective scan
    python benchmarks/model.py --breakdown          # time per module against its FLOP share
    python benchmarks/model.py --set ssm_expand=1.0 --set mlp_ratio=2.0

On a machine shared with other jobs, wall times swing by 2x from round to round: the ratio of
medians is the figure, the ratio of minima and of process CPU time are printed beside it as
load-robust checks, and the load average before and after says how far to trust them. The
process keeps freed memory for reuse as ``cmdb`` does (cmdbnet.utils.reuse_freed_memory).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.breakdown import count_ops, flop_shares, print_table, time_breakdown  # noqa: E402

from cmdbnet.models import build_model  # noqa: E402
from cmdbnet.models.vss import SelectiveScan  # noqa: E402
from cmdbnet.settings import ModelSettings  # noqa: E402
from cmdbnet.utils import (  # noqa: E402
    format_bytes,
    peak_rss_bytes,
    reuse_freed_memory,  # noqa: E402
)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _DecoderBlock(nn.Module):
    def __init__(self, cin: int, skip: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(_conv_bn_relu(cin + skip, cout), _conv_bn_relu(cout, cout))

    def forward(self, x, skip=None):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x if skip is None else torch.cat([x, skip], dim=1))


class UNetResNet34(nn.Module):
    """segmentation_models_pytorch's Unet("resnet34"): decoder (256, 128, 64, 32, 16), 3x3 head."""

    def __init__(self, num_classes: int = 6):
        super().__init__()
        r = torchvision.models.resnet34(weights=None)
        self.stem = nn.Sequential(r.conv1, r.bn1, r.relu)
        self.pool, self.layers = r.maxpool, nn.ModuleList([r.layer1, r.layer2, r.layer3, r.layer4])
        ins, skips, outs = (512, 256, 128, 64, 32), (256, 128, 64, 64, 0), (256, 128, 64, 32, 16)
        self.blocks = nn.ModuleList(_DecoderBlock(i, s, o) for i, s, o in zip(ins, skips, outs))
        self.head = nn.Conv2d(16, num_classes, 3, padding=1)

    def forward(self, x):
        feats = [self.stem(x)]
        y = self.pool(feats[0])
        for layer in self.layers:
            y = layer(y)
            feats.append(y)
        skips = feats[-2::-1] + [None]            # layer3, layer2, layer1, stem, none
        for block, skip in zip(self.blocks, skips):
            y = block(y, skip)
        return self.head(y)


def _adamw(net: nn.Module) -> torch.optim.Optimizer:
    """AdamW fused, as ``cmdb train`` builds it, for both networks alike: the comparison is
    between networks, not optimizer settings."""
    return torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)


def _our_loss(out, labels):
    loss = F.cross_entropy(out["seg"], labels)
    for aux in out["aux"]:
        loss = loss + 0.4 / len(out["aux"]) * F.cross_entropy(
            F.interpolate(aux, size=labels.shape[-2:], mode="bilinear", align_corners=False), labels)
    if out["boundary"] is not None:
        edges = (labels[:, 1:, :] != labels[:, :-1, :]).float()
        target = F.pad(edges, (0, 0, 0, 1)).unsqueeze(1)
        loss = loss + 0.3 * F.binary_cross_entropy_with_logits(out["boundary"], target)
    return loss


def _step(model, opt, loss_fn, x, y) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one training step."""
    t0, c0 = time.perf_counter(), time.process_time()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0, time.process_time() - c0


class _FreeScan(nn.Module):
    """Stand-in for the selective scan at almost no cost: measures how much of a step the scan is."""

    def forward(self, u, delta, A, B, C, D, delta_bias, plane=None):  # noqa: N803
        return u * (delta.sum(0) if plane is not None else delta)  # the plane form's delta is (K, B, L, D)


def _breakdown(args, overrides) -> None:
    torch.manual_seed(0)
    ours = build_model(ModelSettings(variant=args.variant, pretrained="off", **overrides)).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.crop, args.crop, generator=g)
    y = torch.randint(0, 6, (args.batch, args.crop, args.crop), generator=g)
    print(f"per-module breakdown, batch {args.batch}, {args.crop}x{args.crop}, fp32, {torch.get_num_threads()} "
          f"threads, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for _ in range(args.warmup):
        _our_loss(ours(x), y).backward()
    runs = [time_breakdown(ours, _our_loss, x, y) for _ in range(max(1, args.rounds))]
    fwd, bwd = ({k: statistics.median(r[i].get(k, 0.0) for r in runs) for k in runs[0][i]} for i in (0, 1))
    print_table(fwd, bwd, flop_shares(ours, x), statistics.median(r[2] for r in runs))
    train_ops, infer_ops = count_ops(ours, _our_loss, x[:2], y[:2])
    print(f"aten ops at batch 2: {train_ops} per training forward + backward, {infer_ops} per inference forward")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variant", default="full")
    p.add_argument("--max-ratio", type=float, default=1.2, help="exit 1 when ours/U-Net exceeds this")
    p.add_argument("--infer-batch", type=int, default=4)
    p.add_argument("--infer-crop", type=int, default=512)
    p.add_argument("--infer-rounds", type=int, default=None, help="inference rounds (default --rounds; 0: none)")
    p.add_argument("--max-infer-ratio", type=float, default=1.1, help="exit 1 when the inference ratio exceeds this")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model setting, e.g. --set ssm_expand=1.0 (repeatable)")
    p.add_argument("--scan-share", action="store_true",
                   help="also time our network with the scan replaced by a free stand-in")
    p.add_argument("--breakdown", action="store_true",
                   help="only profile one step of ours per module (after a warm-up step) and exit")
    args = p.parse_args(argv)
    reuse_freed_memory()  # as the cmdb CLI does; both networks run in this process, so both get it
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    if args.breakdown:
        return _breakdown(args, overrides)

    load_before = os.getloadavg()
    torch.manual_seed(0)
    ours = build_model(ModelSettings(variant=args.variant, pretrained="off", **overrides)).train()
    unet = UNetResNet34().train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.crop, args.crop, generator=g)
    y = torch.randint(0, 6, (args.batch, args.crop, args.crop), generator=g)
    runs = {
        "ours": (ours, _adamw(ours), _our_loss),
        "unet": (unet, _adamw(unet), lambda out, lab: F.cross_entropy(out, lab)),
    }
    if args.scan_share:
        torch.manual_seed(0)
        free = build_model(ModelSettings(variant=args.variant, pretrained="off", **overrides)).train()
        for module in free.modules():
            if isinstance(getattr(module, "scan", None), SelectiveScan):
                module.scan = _FreeScan()
        runs["free"] = (free, _adamw(free), _our_loss)
    times: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.warmup + args.rounds):
        for name, (model, opt, loss_fn) in runs.items():
            wall, proc = _step(model, opt, loss_fn, x, y)
            if r >= args.warmup:
                times[name].append(wall)
                cpu[name].append(proc)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    ratio = med["ours"] / med["unet"]
    params = {k: sum(p.numel() for p in m.parameters()) for k, (m, _, _) in runs.items()}
    print(f"training step, batch {args.batch}, {args.crop}x{args.crop}, fp32, CPU ({torch.get_num_threads()} threads), "
          f"{args.rounds} alternating rounds after {args.warmup} warm-up; load average before: "
          f"{' '.join(f'{v:.2f}' for v in load_before)}, after: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if overrides:
        print(f"  model overrides: {overrides}")
    labels = {"ours": f"cmdbnet ({args.variant})", "unet": "U-Net ResNet34", "free": "cmdbnet, free scan"}
    for k in runs:
        print(f"  {labels[k]:22s} median {med[k]:7.3f} s (min {min(times[k]):.3f}, CPU {cpu_med[k]:.3f} s)  "
              f"rounds {' '.join(f'{t:.2f}' for t in times[k])}  params {params[k] / 1e6:.2f} M")
    print(f"  ratio ours/U-Net {ratio:.2f} (limit {args.max_ratio}); of minima "
          f"{min(times['ours']) / min(times['unet']):.2f}; of process CPU time {cpu_med['ours'] / cpu_med['unet']:.2f}")
    if "free" in runs:
        print(f"  the scan takes {1 - med['free'] / med['ours']:.0%} of our step; without it the ratio would be "
              f"{med['free'] / med['unet']:.2f}")
    infer_ok = _inference(ours, unet, args)
    print(f"  peak RSS {format_bytes(peak_rss_bytes())}")
    sys.exit(0 if ratio <= args.max_ratio and infer_ok else 1)


def _inference(ours, unet, args) -> bool:
    """Alternating eval-mode forwards of both networks; prints the ratio, returns whether it holds."""
    rounds = args.rounds if args.infer_rounds is None else args.infer_rounds
    if not rounds:
        return True
    ours.eval(), unet.eval()
    x = torch.randn(args.infer_batch, 3, args.infer_crop, args.infer_crop, generator=torch.Generator().manual_seed(1))
    modes = {"ours": (ours, torch.inference_mode), "unet": (unet, torch.no_grad)}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in modes}
    for r in range(args.warmup + rounds):
        for name, (model, mode) in modes.items():
            t0, c0 = time.perf_counter(), time.process_time()
            with mode():
                model(x)
            if r >= args.warmup:
                times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    med = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    ratio = med["ours"] / med["unet"]
    print(f"inference forward, batch {args.infer_batch}, {args.infer_crop}x{args.infer_crop}, eval, {rounds} "
          f"alternating rounds; load average now {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for k, label in (("ours", "cmdbnet (inference_mode)"), ("unet", "U-Net ResNet34 (no_grad)")):
        print(f"  {label:26s} median {med[k]:7.3f} s (CPU {cpu[k]:.3f} s)  rounds "
              f"{' '.join(f'{w:.2f}' for w, _ in times[k])}")
    print(f"  ratio ours/U-Net {ratio:.2f} (limit {args.max_infer_ratio}); of process CPU time "
          f"{cpu['ours'] / cpu['unet']:.2f}")
    return ratio <= args.max_infer_ratio


if __name__ == "__main__":
    main()
