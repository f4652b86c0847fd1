"""Held-out accuracy on real pixels: the ablation and a U-Net on the Potsdam, Vaihingen and LoveDA samples.

    OMP_NUM_THREADS=1 nice python benchmarks/accuracy.py PATH_TO_SAMPLES [--steps 40] [--work DIR]

On a CPU shared with other jobs, one thread per process (``OMP_NUM_THREADS=1``) trains many
times faster than torch's default of one per core: OpenMP threads spin at every barrier
waiting for a sibling the scheduler has parked.

PATH_TO_SAMPLES holds small crops of the real datasets in their own formats
(``potsdam/top_potsdam_2_10_RGB.tif`` + ``_label_noBoundary.tif``, ``vaihingen/top_mosaic_09cm_area1.tif``
+ ``_noBoundary.tif``, ``loveda/Train/Rural/{images_png,masks_png}/{0,1,2}.png``); they are read
from there, never copied into the repository. Each dataset is split spatially:

* Potsdam, Vaihingen (512 x 512 crops): train = rows 0-255, val = rows 256-319 (checkpoint
  choice only), test = rows 320-511; train and test are one 64-pixel crop apart.
* LoveDA: tiles 0 and 2 train (the last 128 rows of tile 0: val), tile 1 test.

The regions are written as tiles of the pre-split layout into a temporary folder, prepared
with ``cmdb prepare`` (ISPRS: eroded labels, the samples' own), and ``cmdb ablation`` trains
full, the four variants and U-Net on each under one recipe with the same number of steps:
the CPU budget below. No ImageNet weights can be fetched here, so every network starts from
random init (``model.pretrained=off`` for all, U-Net included). ISPRS means leave clutter out
(``--ignore-clutter``); the samples hold no clutter anyway.

``gpu_step_times`` (no command line) times one ablation step per entry on a CUDA device, for
the GPU benchmark registry.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import yaml
from PIL import Image

ENTRIES_VARIANTS = "full,cnn_only,mamba_only,no_fusion,no_boundary"
BASELINES = "unet"
# The CPU budget: every entry trains STEPS optimizer steps of BATCH crops of CROP pixels.
STEPS, BATCH, CROP = 40, 4, 64
MARK_START, MARK_END = "<!-- accuracy.py:start -->", "<!-- accuracy.py:end -->"
ISPRS_ROWS = {"train": (0, 256), "val": (256, 320), "test": (320, 512)}


def recipe(steps: int) -> dict[str, Any]:
    return {"model": {"pretrained": "off"},
            "data": {"crop": CROP, "workers": 0},
            "train": {"batch": BATCH, "accum": 1, "max_steps": steps, "lr": 1e-3, "warmup_steps": 2,
                      "schedule": "cosine", "amp": False, "device": "cpu", "val_interval": 1000, "log_images": 0,
                      "seed": 0}}


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


def _write_tif(path: Path, array: np.ndarray) -> None:
    """A plain GeoTIFF without georeferencing, as the ISPRS samples come."""
    path.parent.mkdir(parents=True, exist_ok=True)
    c, h, w = array.shape
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=c, dtype=array.dtype) as ds:
        ds.write(array)


def isprs_raw(samples: Path, out: Path, dataset: str) -> None:
    """Potsdam or Vaihingen sample split by rows into train/val/test tiles of the pre-split layout."""
    if dataset == "potsdam":
        image = _read(samples / "potsdam/top_potsdam_2_10_RGB.tif")
        label = _read(samples / "potsdam/top_potsdam_2_10_label_noBoundary.tif")
        ids = {"train": "2_10", "val": "2_11", "test": "2_12"}
        img_name, lab_name, img_dir = "top_potsdam_{}_RGB.tif", "top_potsdam_{}_label_noBoundary.tif", "RGB"
    else:
        image = _read(samples / "vaihingen/top_mosaic_09cm_area1.tif")
        label = _read(samples / "vaihingen/top_mosaic_09cm_area1_noBoundary.tif")
        ids = {"train": "1", "val": "3", "test": "5"}
        img_name, lab_name, img_dir = "top_mosaic_09cm_area{}.tif", "top_mosaic_09cm_area{}_noBoundary.tif", "top"
    for split, (r0, r1) in ISPRS_ROWS.items():
        _write_tif(out / img_dir / split / img_name.format(ids[split]), image[:, r0:r1])
        _write_tif(out / "Label_noBoundary" / split / lab_name.format(ids[split]), label[:, r0:r1])


def loveda_raw(samples: Path, out: Path) -> None:
    """Tiles 0 and 2 train (tile 0's last 128 rows: val), tile 1 test, in LoveDA's own layout.

    Tile 1 is the test tile because it holds the classes the other two teach (background,
    water, agriculture, some forest); tile 2 is 87 % forest, which the other two barely show.
    """
    src = samples / "loveda/Train/Rural"
    full = slice(None)
    parts = [("Train", "0", "0", (slice(0, 896), full)), ("Val", "0", "3", (slice(896, 1024), full)),
             ("Train", "2", "2", (full, full)), ("Test", "1", "1", (full, full))]
    for split, tile, name, window in parts:  # a tile id may appear in one split only: val gets its own
        for folder in ("images_png", "masks_png"):
            array = np.asarray(Image.open(src / folder / f"{tile}.png"))[window]
            dst = out / split / "Rural" / folder / f"{name}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(dst)


def _cmdb(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cmdbnet", *args]  # run the script itself under nice
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed:\n{proc.stderr[-3000:]}")
    return proc


def run_dataset(name: str, samples: Path, work: Path, steps: int) -> dict[str, Any]:
    """Split, prepare and run the ablation on one dataset; its entries, crop counts and wall time."""
    raw, prepared, runs = work / f"{name}-raw", work / f"{name}-prepared", work / f"{name}-runs"
    (loveda_raw(samples, raw) if name == "loveda" else isprs_raw(samples, raw, name))
    eroded = ["--eroded"] if name != "loveda" else []
    _cmdb("prepare", name, "--root", str(raw), "--out", str(prepared), "--crop", str(CROP), *eroded, "--json")
    cfg = work / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(recipe(steps)))
    clutter = ["--ignore-clutter"] if name != "loveda" else []
    t0 = time.monotonic()
    _cmdb("ablation", "--data", str(prepared), "--out", str(runs), "-c", str(cfg), "--variants", ENTRIES_VARIANTS,
          "--baselines", BASELINES, *clutter, "--json")
    wall = time.monotonic() - t0
    doc = json.loads((runs / "ablation.json").read_text())
    manifest = json.loads((prepared / "manifest.json").read_text())
    return {"dataset": name, "wall_seconds": wall, "entries": doc["entries"],
            "crops": {k: len(v) for k, v in manifest["crops"].items()}, "protocol": doc["protocol"]}


def results_markdown(results: list[dict[str, Any]], steps: int, total: float) -> str:
    names = [e["name"] for e in results[0]["entries"]]
    lines = [MARK_START,
             "## Held-out accuracy on real pixels (issue 22): "
             "`OMP_NUM_THREADS=1 nice python benchmarks/accuracy.py PATH_TO_SAMPLES`",
             "",
             f"CPU budget: every entry trains {steps} optimizer steps of {BATCH} crops of {CROP} x {CROP} px "
             f"(AdamW lr 1e-3, cosine, 2 warm-up steps, fp32, seed 0), from random init (no ImageNet weights "
             "can be fetched on this machine: `model.pretrained=off` for all, U-Net included), one thread per "
             f"process, on the shared 2-core machine under `nice` while other jobs ran; whole run {total / 60:.1f} min. Scores on the "
             "held-out test region (ISPRS: eroded labels, means without clutter), best.pt chosen on the val strip "
             "(one validation, at the end: best = last).",
             "",
             "| entry | " + " | ".join(f"{r['dataset']} mIoU | BIoU | train s" for r in results) + " |",
             "|---|" + "---|---|---|" * len(results)]
    for name in names:
        cells = []
        for r in results:
            e = next(x for x in r["entries"] if x["name"] == name)
            cells += [f"{100 * e['mIoU']:.1f}", f"{100 * e['boundary_iou']:.1f}", f"{e['train_seconds']:.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Crops (train / val / test): " + "; ".join(
        f"{r['dataset']} {r['crops'].get('train', 0)} / {r['crops'].get('val', 0)} / {r['crops'].get('test', 0)}"
        for r in results) + ". Wall time of each dataset's `cmdb ablation` (6 entries, scoring included): "
        + "; ".join(f"{r['dataset']} {r['wall_seconds'] / 60:.1f} min" for r in results) + ".", "", MARK_END]
    return "\n".join(lines) + "\n"


def write_results(path: Path, text: str) -> None:
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Measured figures\n"
    if MARK_START in old and MARK_END in old:
        head, rest = old.split(MARK_START, 1)
        new = head + text.rstrip("\n") + rest.split(MARK_END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new, encoding="utf-8")


def gpu_step_times(crop: int = 256, batch: int = 8, steps: int = 5, device: str = "cuda",
                   entries: tuple[str, ...] = ("full", "cnn_only", "mamba_only", "no_fusion", "no_boundary",
                                               "unet", "deeplabv3plus", "segformer")) -> list[dict[str, Any]]:
    """Median seconds of one ablation training step (forward, loss, backward, AdamW) per entry on ``device``.

    The ablation's own step (``run_step_group`` with the loss of ``CMDBLoss``), fp16 autocast, 6
    classes, random init; one warm-up step first. Baselines are skipped without
    segmentation_models_pytorch. Returns ``[{"entry", "seconds", "images_per_s"}]``.
    """
    import torch

    from cmdbnet.errors import CmdbError
    from cmdbnet.losses import CMDBLoss
    from cmdbnet.models import build_model
    from cmdbnet.runtime import resolve_precision
    from cmdbnet.settings import BASELINES as ARCHS
    from cmdbnet.settings import load_settings
    from cmdbnet.training.optim import build_optimizer
    from cmdbnet.training.step import run_step_group

    dev = torch.device(device)
    out = []
    for name in entries:
        arch = name if name in ARCHS else "cmdbnet"
        s = load_settings(None, {"model": {"arch": arch, "variant": "full" if arch != "cmdbnet" else name,
                                           "pretrained": "off"}, "train": {"amp": dev.type == "cuda"}})
        try:
            net = build_model(s.model).to(dev).train()
        except CmdbError:
            continue
        loss_fn = CMDBLoss.from_settings(s.train, 6, 255).to(dev)
        opt = build_optimizer(net, s.train)
        precision = resolve_precision(s.train.amp, s.train.amp_dtype, dev)
        scaler = torch.amp.GradScaler(dev.type) if precision.needs_scaler else None
        batches = [{"image": torch.randn(batch, 3, crop, crop, device=dev),
                    "label": torch.randint(0, 6, (batch, crop, crop), device=dev)}]
        times = []
        for _ in range(steps + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            run_step_group(net, loss_fn, batches, [1.0], opt, scaler, precision, dev, s.train.grad_clip)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        sec = float(np.median(times[1:]))
        out.append({"entry": name, "seconds": sec, "images_per_s": batch / sec})
        del net, opt
    return out


def gpu_rows(ctx):
    """GPU check part (x): one ablation training step per entry on the card (fp16 AMP, batch 8,
    crop 256); in ``--smoke`` two entries at tiny sizes on CPU. Rows as ``benchmarks/gpu.py`` takes them."""
    if ctx.smoke:
        rows = gpu_step_times(crop=32, batch=2, steps=1, device="cpu", entries=("cnn_only", "unet"))
    else:
        rows = gpu_step_times(device=str(ctx.dev))
    full = next((r["seconds"] for r in rows if r["entry"] == "full"), None)
    for r in rows:
        rel = f"; {r['seconds'] / full:.2f}x full" if full else ""
        yield (f"ablation entry `{r['entry']}`: training step", f"{1e3 * r['seconds']:.0f} ms, "
               f"{r['images_per_s']:.1f} img/s{rel}", "", None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("samples", type=Path, help="folder of the sample crops (potsdam/, vaihingen/, loveda/)")
    ap.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps of every entry (default {STEPS})")
    ap.add_argument("--datasets", default="potsdam,vaihingen,loveda")
    ap.add_argument("--work", type=Path, default=None, help="keep prepared data and runs here (default: temporary)")
    ap.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = ap.parse_args()
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    with tempfile.TemporaryDirectory(prefix="cmdb-accuracy-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        results = []
        for name in args.datasets.split(","):
            r = run_dataset(name, args.samples, work, args.steps)
            print(f"{name}: " + ", ".join(f"{e['name']} {100 * e['mIoU']:.1f}/{100 * e['boundary_iou']:.1f}"
                                          for e in r["entries"]) + f" ({r['wall_seconds'] / 60:.1f} min)",
                  flush=True)
            results.append(r)
            (work / "accuracy.json").write_text(json.dumps(results, indent=2, default=str))
        text = results_markdown(results, args.steps, time.monotonic() - t0)
    print(text)
    write_results(args.results, text)


if __name__ == "__main__":
    main()
