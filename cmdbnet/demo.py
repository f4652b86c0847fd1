"""``cmdb demo``: the whole job on built-in synthetic data, in minutes, on a CPU laptop.

Why: a newcomer decides in five minutes whether a tool is real. The demo runs exactly what
a user runs on real data (synth -> prepare -> train -> evaluate -> predict), with the same
code paths, and reports metrics on scenes the network never saw (the test split).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch

from cmdbnet.api import train
from cmdbnet.data.manifest import read_manifest
from cmdbnet.data.preparation import prepare
from cmdbnet.data.synthetic import synth
from cmdbnet.evaluation import evaluate
from cmdbnet.inference.files import predict
from cmdbnet.inference.preview import save_preview
from cmdbnet.models import build_model
from cmdbnet.runtime import configure_cuda, pick_device, resolve_precision
from cmdbnet.settings import PredictSettings, Settings, load_settings
from cmdbnet.training.optim import build_optimizer

DATASET = "potsdam"


def demo_settings(out: Path, device: str, max_steps: int, minutes: float) -> Settings:
    """The demo recipe: the full network, trained from scratch with a short, brisk schedule."""
    return load_settings(None, {
        "data": {"prepared": out / "prepared", "crop": 128, "workers": 0},
        "model": {"variant": "full", "pretrained": "off"},
        "train": {"out": out / "run", "batch": 8, "accum": 1, "lr": 2e-3, "warmup_steps": 10,
                  "schedule": "cosine", "max_steps": max_steps, "val_interval": 1000,
                  "time_limit_min": minutes, "device": device, "amp": False, "log_images": 4, "seed": 0},
    })


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_seconds(settings: Settings, device: torch.device) -> float:
    """Time two training steps of the demo network, to size its schedule to the time budget."""
    model_cfg = settings.model.model_copy(update={"num_classes": 6, "in_channels": 3})
    configure_cuda(device, settings.train.tf32)  # as training runs it
    net = build_model(model_cfg).to(device).train()
    opt = build_optimizer(net, settings.train)  # as training builds it (fused)
    x = torch.randn(settings.train.batch, 3, settings.data.crop, settings.data.crop, device=device)
    y = torch.randint(0, 6, (settings.train.batch, settings.data.crop, settings.data.crop), device=device)
    times = []
    for _ in range(2):
        _synchronize(device)
        t0 = time.perf_counter()
        out = net(x)
        loss = torch.nn.functional.cross_entropy(out["seg"], y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        _synchronize(device)  # CUDA runs asynchronously: without this the clock stops at the last launch
        times.append(time.perf_counter() - t0)
    return min(times) * 1.15  # data loading, aux/boundary losses


def run_demo(out: str | Path = "runs/demo", minutes: float = 5.0, device: str = "auto", seed: int = 0,
             tiles: int = 10, size: int = 512, progress: bool = True,
             say: Callable[[str], None] = print) -> dict[str, Any]:
    """Synthesise, prepare, train for about ``minutes`` in total, evaluate and predict."""
    out = Path(out)
    t_start = time.monotonic()
    dev = pick_device(device)
    torch.manual_seed(seed)

    say(f"[1/5] synthesising {tiles} Potsdam-like scenes ({size}x{size}, 5 cm, EPSG:32633) -> {out / 'raw'}")
    scenes = synth(DATASET, out / "raw", tiles=tiles, size=size, seed=seed)
    say(f"[2/5] preparing 256x256 crops -> {out / 'prepared'}")
    prepare(DATASET, out / "raw", out / "prepared", crop=256, progress=progress)

    spent = (time.monotonic() - t_start) / 60
    train_minutes = max(0.5, minutes * 0.85 - spent)
    probe = demo_settings(out, device, 1, train_minutes)
    step_s = _step_seconds(probe, dev)
    steps = max(20, int(train_minutes * 60 / step_s))
    settings = demo_settings(out, device, steps, train_minutes)
    say(f"[3/5] training the full network for up to {train_minutes:.1f} min "
        f"({steps} steps of {settings.train.batch} crops, ~{step_s:.2f} s each on {dev})")
    result = train(settings, progress=progress)

    say("[4/5] evaluating on held-out test scenes (never trained on, never used to pick the checkpoint)")
    ckpt = out / "run" / "best.pt"
    scores = evaluate(ckpt, out / "prepared", split="test", device=device, workers=0,
                      json_out=out / "test_scores.json", progress=progress)

    held_out = next(t for t in scenes.tiles if t.split == "test")
    image_path = held_out.images["rgb"]
    say(f"[5/5] predicting held-out scene {image_path.name} -> {out / 'predict'}")
    pset = PredictSettings(tile=256, overlap=0.25, batch=4, device=device, format="both")
    summary = predict([image_path], out / "predict", ckpt, pset, progress=progress)[0]
    mask_path = Path(summary["outputs"]["mask"])
    with rasterio.open(image_path) as src:
        image = src.read()
    with rasterio.open(mask_path) as src:
        pred = src.read(1)
    preview = save_preview(out / "predict" / f"{image_path.stem}_preview.png", image, pred,
                           list(scores["per_class"]),
                           read_manifest(out / "prepared")["palette"], truth=held_out.truth)
    agree = float(np.mean((pred == held_out.truth)[held_out.truth != 255]))
    return {"train": {"steps": result.steps, "best_val_mIoU": result.best_miou,
                      "minutes": round((time.monotonic() - t_start) / 60, 2)},
            "test": scores, "predict": {"mask": str(mask_path), "preview": str(preview),
                                        "pixel_accuracy": agree, **{k: v for k, v in summary.items()
                                                                    if k in ("seconds", "mpx_per_s")}},
            "paths": {"raw": str(out / "raw"), "prepared": str(out / "prepared"), "run": str(out / "run"),
                      "tensorboard": str(out / "run" / "tb"), "scores": str(out / "test_scores.json")},
            "precision": resolve_precision(False, "fp16", dev).label}

