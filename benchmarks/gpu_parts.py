"""Parts (c)-(f) of benchmarks/gpu.py (the workflow: training step, memory estimate, predict,
demo), and the ResNet34 U-Net it compares our network against. Each part is a generator of rows
``(what, value, target, met)``; e and f import rasterio and the inference/demo packages
themselves, so a machine without rasterio still runs c and d.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from cmdbnet.losses import CMDBLoss
from cmdbnet.models import build_model
from cmdbnet.profiling.budget import estimate, measure_cuda
from cmdbnet.runtime import resolve_precision
from cmdbnet.settings import IMAGENET_MEAN, IMAGENET_STD, PredictSettings, Settings, load_settings
from cmdbnet.training.optim import build_optimizer
from cmdbnet.training.step import run_step_group
from gpu_scan import backend, median_seconds

GiB = 2**30
SCAN_SHARE, UNET_RATIO, VRAM_ERR = 0.15, 1.5, 0.15
LIGHT = {"pretrained": "off", "backbone": "resnet18", "mamba_dims": [32, 64, 128, 256], "mamba_depths": [1, 1, 1, 1],
         "fusion_channels": 64}


# ----------------------------------------------------------------------------- (c) training step
class _Up(nn.Module):
    def __init__(self, c_in: int, c_skip: int, c_out: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c_in + c_skip, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                                  nn.ReLU(inplace=True), nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))

    def forward(self, x, skip):
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], 1))


class ResNet34UNet(nn.Module):
    """The usual baseline: torchvision ResNet34 encoder (random weights), U-Net decoder.
    (``encoder="resnet18"`` keeps the smoke run quick.)"""

    def __init__(self, num_classes: int = 6, encoder: str = "resnet34"):
        super().__init__()
        r = getattr(torchvision.models, encoder)(weights=None)
        self.stem = nn.Sequential(r.conv1, r.bn1, r.relu)
        self.pool, self.layers = r.maxpool, nn.ModuleList([r.layer1, r.layer2, r.layer3, r.layer4])
        self.ups = nn.ModuleList([_Up(512, 256, 256), _Up(256, 128, 128), _Up(128, 64, 64), _Up(64, 64, 32)])
        self.head = nn.Conv2d(32, num_classes, 1)

    def forward(self, x):
        skips = [self.stem(x)]
        y = self.pool(skips[0])
        for layer in self.layers:
            y = layer(y)
            skips.append(y)
        y = skips.pop()
        for up, skip in zip(self.ups, reversed(skips)):
            y = up(y, skip)
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)


def _step_time(net, loss_fn, opt, dev, dtype: str, batch: int, crop: int, smoke: bool) -> tuple[float, float]:
    """(median seconds, peak allocated bytes) of one training step."""
    precision = resolve_precision(dtype != "fp32", "bf16" if dtype == "fp32" else dtype, dev)
    scaler = torch.amp.GradScaler("cuda") if precision.needs_scaler else None
    batches = [{"image": torch.randn(batch, 3, crop, crop, device=dev),
                "label": torch.randint(0, 6, (batch, crop, crop), device=dev)}]
    step = lambda: run_step_group(net, loss_fn, batches, [1.0], opt, scaler, precision, dev, 1.0)  # noqa: E731
    if not smoke:  # the first step creates AdamW's state and autotunes cuDNN
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t = median_seconds(step, 1 if smoke else 5, dev, warmup=0 if smoke else 1)
    return t, (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else float("nan"))


def _release(dev: torch.device) -> None:
    """Free the last model's memory before the next one's peak is read."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def train_steps(ctx):
    """(c) one training step, ours per backend against a ResNet U-Net."""
    dev, backends, smoke = ctx.dev, ctx.backends, ctx.smoke
    batch, crop = (2, 32) if smoke else (4, 256)
    s = Settings()
    t, model = s.train, s.model.model_copy(update=LIGHT if smoke else {"pretrained": "off"})
    if smoke:  # the interpreted Triton kernels are far too slow for a whole network
        backends = [b for b in backends if b != "triton"]
    for dtype in ("fp32",) if smoke else ("fp16", "bf16"):  # bf16 convolutions crawl on many CPUs
        torch.manual_seed(0)
        unet = ResNet34UNet(encoder="resnet18" if smoke else "resnet34").to(dev).train()
        ce = lambda out, y: {"total": F.cross_entropy(out, y)}  # noqa: E731
        t_unet, m_unet = _step_time(unet, ce, torch.optim.AdamW(unet.parameters()), dev, dtype, batch, crop, smoke)
        yield (f"{'ResNet18' if smoke else 'ResNet34'} U-Net step, {dtype}",
               f"{1e3 * t_unet:.0f} ms, peak {m_unet / GiB:.2f} GiB", "", None)
        del unet
        _release(dev)
        for b in backends:
            net = build_model(model).to(dev).train()
            loss_fn = CMDBLoss(6, 255, t.aux_weight, t.boundary_weight, t.boundary_width, t.dice_weight).to(dev)
            with backend(b):
                secs, mem = _step_time(net, loss_fn, build_optimizer(net, t), dev, dtype, batch, crop, smoke)
            ratio, share = secs / t_unet, ctx.scan_per_step.get(b, float("nan")) / secs
            yield (f"ours with `{b}`, {dtype}: step, peak; ours / U-Net",
                   f"{1e3 * secs:.0f} ms, {mem / GiB:.2f} GiB; {ratio:.2f}",
                   f"<= {UNET_RATIO}" if dtype == "fp16" else "", ratio <= UNET_RATIO if dtype == "fp16" else None)
            yield (f"scan share of that step (`{b}`, {dtype})", f"{share:.0%}", f"<= {SCAN_SHARE:.0%}",
                   share <= SCAN_SHARE)
            del net
            _release(dev)


# ----------------------------------------------------------------------------- (d) profile-vram
RECIPES = {"default (batch 4, crop 256, fp16, accum 4)": ({"batch": 4, "accum": 4, "amp": True}, 256, False),
           "no AMP (batch 4, crop 256)": ({"batch": 4, "accum": 4, "amp": False}, 256, False),
           "batch 2, crop 512, checkpointing, fp16": ({"batch": 2, "accum": 8, "amp": True}, 512, True)}


def vram_estimates(ctx):
    """(d) profile-vram's estimate against the measured peak."""
    dev, smoke = ctx.dev, ctx.smoke
    recipes = ({"smoke (light network, batch 1, crop 64, fp32)": ({"batch": 1, "accum": 1, "amp": False}, 64, False)}
               if smoke else RECIPES)
    for name, (train, crop, ckpt) in recipes.items():
        model = {**(LIGHT if smoke else {"pretrained": "off"}), "checkpointing": ckpt}
        s = load_settings(None, {"data": {"crop": crop}, "model": model, "train": {**train, "amp_dtype": "fp16"}})
        est = estimate(s).peak
        if dev.type != "cuda":
            yield f"profile-vram estimate, {name}", f"{est / GiB:.2f} GiB (no CUDA: not measured)", "", None
            continue
        meas = measure_cuda(s).peak
        err = (est - meas) / meas
        yield (f"profile-vram estimate vs measured peak, {name}",
               f"{est / GiB:.2f} vs {meas / GiB:.2f} GiB ({err:+.0%})", f"within {VRAM_ERR:.0%}", abs(err) <= VRAM_ERR)


# ----------------------------------------------------------------------------- (e), (f)
def _checkpoint(path: Path, scene_path: Path, smoke: bool) -> Path:
    """The default network (untrained) with batch-norm statistics of the scene, as training would
    leave them, so that its prediction follows the image rather than being one class everywhere."""
    import rasterio

    from cmdbnet.checkpoint import save_checkpoint
    from cmdbnet.data.registry import POTSDAM
    torch.manual_seed(0)
    settings = Settings(model=Settings().model.model_copy(update=LIGHT if smoke else {"pretrained": "off"}))
    net = build_model(settings.model)
    for mod in net.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None
    with rasterio.open(scene_path) as src:
        crop = torch.from_numpy(src.read(window=((0, 128), (0, 128))).astype(np.float32) / 255)[None]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        net.train()((crop - mean) / std)
    dataset = {"name": POTSDAM.name, "classes": list(POTSDAM.classes), "bands": "rgb", "band_count": 3,
               "palette": [list(p) for p in POTSDAM.palette], "ignore_index": POTSDAM.ignore_index,
               "dtype": "uint8", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    save_checkpoint(path, {"model": net.state_dict(), "settings": settings.model_dump(mode="json"),
                           "dataset": dataset})
    return path


def predict_throughput(ctx):
    """(e) cmdb predict on a generated GeoTIFF, tiled and as one window."""
    import rasterio

    from cmdbnet.inference.files import predict
    from predict import write_scene

    dev, work, smoke = ctx.dev, ctx.work, ctx.smoke
    size, tile = (128, 64) if smoke else (4096, 512)
    scene = work / f"scene_{size}.tif"
    write_scene(scene, size)
    ckpt = _checkpoint(work / "net.pt", scene, smoke)
    cuda = dev.type == "cuda"
    tiled = PredictSettings(tile=tile, overlap=0.25, batch=2 if smoke else 8, device=dev.type, amp=cuda)
    whole = PredictSettings(tile=size, overlap=0.0, batch=1, device=dev.type, amp=cuda)
    s_tiled = predict([scene], work / "tiled", ckpt, tiled, progress=False)[0]
    yield (f"predict {size} x {size}, tile {tile}, overlap 0.25{', fp16' if cuda else ''}",
           f"{s_tiled['mpx_per_s']:.2f} Mpx/s ({s_tiled['seconds']:.1f} s)", "", None)
    try:
        s_whole = predict([scene], work / "whole", ckpt, whole, progress=False)[0]
    except torch.OutOfMemoryError:
        yield "whole image in one window", "does not fit this card", "", None
        return
    masks = []
    for s in (s_tiled, s_whole):
        with rasterio.open(s["outputs"]["mask"]) as src:
            masks.append(src.read(1))
    agree = float(np.mean(masks[0] == masks[1]))
    yield ("whole image in one window; agreement with tiled (untrained network, same class per pixel)",
           f"{s_whole['mpx_per_s']:.2f} Mpx/s; {agree:.2%}", "", None)


def demo_time(ctx):
    """(f) ``cmdb demo`` end to end; in smoke mode with a light network and two steps."""
    import cmdbnet.demo as demo

    dev, work, smoke = ctx.dev, ctx.work, ctx.smoke
    original = demo.demo_settings

    def light(out, device, max_steps, minutes):
        s = original(out, device, 2, minutes)
        return s.model_copy(update={"model": s.model.model_copy(update=LIGHT),
                                    "train": s.train.model_copy(update={"batch": 2, "log_images": 0})})

    if smoke:
        demo.demo_settings = light
    t0 = time.perf_counter()
    try:
        result = demo.run_demo(work / "demo", minutes=0.5 if smoke else 1.0, device=dev.type, progress=False,
                               tiles=10, size=256 if smoke else 512, say=lambda msg: None)
    finally:
        demo.demo_settings = original
    yield (f"`cmdb demo --minutes {0.5 if smoke else 1}` wall time",
           f"{time.perf_counter() - t0:.0f} s, {result['train']['steps']} steps, test mIoU {result['test']['mIoU']:.3f}",
           "", None)
