"""Benchmark ``cmdb predict`` on a large GeoTIFF: peak memory and overhead over the bare network.

What it measures, each in a fresh child process with the same torch thread count:

* ``predict``: the full engine (rasterio reads, normalisation, forward, softmax, blending,
  strip hand-off, deflate GeoTIFF writes) on a generated ``--size`` x ``--size`` 3-band
  uint8 GeoTIFF (written block by block, so generating it needs no big array). Peak RSS is
  the child's own ``ru_maxrss``.
* ``bare``: only ``model(x)`` over the same windows in the same batches (same tile, overlap,
  batch split per window row), on tensors made beforehand: no I/O, no blending.

PASS when predict's peak RSS <= 2.5 GiB and its wall time <= 1.25 x bare. Random weights
are fine for timing. The default network on 2 CPU cores needs about an hour per 6000 x 6000
run; ``--light`` and ``--size`` give a quicker check of the same code path.

    python benchmarks/predict.py                       # default network, 6000 x 6000
    python benchmarks/predict.py --light --size 3000 --repeat 2   # minutes
    python benchmarks/predict.py --light --input top_potsdam_2_10_RGB.tif --preview /tmp/p.png

``--ranks N`` (folder mode): ``--files`` generated tiles of ``--size`` predicted by one process,
by ``torchrun --nproc-per-node N`` (gloo on CPU, one thread per rank as torchrun sets), by one
process on one thread, and by one process with ``--cog`` and with ``--vector``; prints wall
time, in-run time (``predict_summary.json``), Mpx/s and load average.

    python benchmarks/predict.py --ranks 2 --files 16 --size 2048 --light
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LIGHT = dict(backbone="resnet18", mamba_dims=[32, 64, 128, 256], mamba_depths=[1, 1, 2, 1], fusion_channels=64)
TINY = dict(backbone="resnet18", mamba_dims=[16, 32, 64, 128], mamba_depths=[1, 1, 1, 1], fusion_channels=32)
RSS_LIMIT = 2.5 * 2**30
RATIO_LIMIT = 1.25


def write_scene(path: Path, size: int, block: int = 512, seed: int = 0, col: int = 0, row: int = 0) -> None:
    """A georeferenced size x size 3-band uint8 GeoTIFF with aerial-ish texture, block by block.

    ``col``, ``row``: its place on a grid of such tiles (for mosaics)."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(seed)
    waves = rng.uniform(0.002, 0.03, (3, 4, 2)), rng.uniform(0, 6.3, (3, 4))
    prof = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32633",
                transform=from_origin(368000.0 + col * size * 0.05, 5808000.0 - row * size * 0.05, 0.05, 0.05),
                tiled=True, blockxsize=256,
                blockysize=256, compress="deflate")
    tmp = path.with_suffix(".part.tif")
    with rasterio.open(tmp, "w", **prof) as dst:
        for r0 in range(0, size, block):
            h = min(block, size - r0)
            yy, xx = np.mgrid[r0:r0 + h, 0:size].astype(np.float32)
            img = np.empty((3, h, size), np.float32)
            for c in range(3):
                img[c] = sum(35 * np.sin(waves[0][c, k, 0] * yy + waves[0][c, k, 1] * xx + waves[1][c, k])
                             for k in range(4))
            img += 120 + rng.normal(0, 10, img.shape)
            dst.write(np.clip(img, 0, 255).astype(np.uint8), window=Window(0, r0, size, h))
    os.replace(tmp, path)


def make_checkpoint(path: Path, light: bool | str) -> None:
    import torch

    from cmdbnet.checkpoint import save_checkpoint
    from cmdbnet.data.registry import POTSDAM
    from cmdbnet.models import build_model
    from cmdbnet.settings import IMAGENET_MEAN, IMAGENET_STD, ModelSettings, Settings

    torch.manual_seed(0)
    arch = TINY if light == "tiny" else LIGHT if light else {}
    settings = Settings(model=ModelSettings(pretrained="off", **arch))
    net = build_model(settings.model)
    dataset = {"name": POTSDAM.name, "classes": list(POTSDAM.classes),
               "palette": [list(p) for p in POTSDAM.palette], "ignore_index": POTSDAM.ignore_index,
               "bands": "rgb", "band_count": 3, "dtype": "uint8",
               "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    save_checkpoint(path, {"model": net.state_dict(), "settings": settings.model_dump(mode="json"),
                           "dataset": dataset})


# ----------------------------------------------------------------------------- children
def child_predict(a: dict) -> dict:
    import cmdbnet.models  # noqa: F401  (imports are process start-up, as in the bare child)
    from cmdbnet.inference.files import predict
    from cmdbnet.settings import PredictSettings
    from cmdbnet.utils import peak_rss_bytes, reuse_freed_memory

    reuse_freed_memory()  # as `cmdb predict` does
    s = PredictSettings(tile=a["tile"], overlap=a["overlap"], batch=a["batch"], device="cpu", format=a["format"])
    t0, c0 = time.perf_counter(), time.process_time()
    summary = predict([a["input"]], a["out"], a["ckpt"], s, progress=sys.stderr.isatty())[0]
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "peak_rss": peak_rss_bytes(), "summary": summary}


def child_bare(a: dict) -> dict:
    import torch

    from cmdbnet.checkpoint import load_model
    from cmdbnet.inference.window import axis_grid
    from cmdbnet.utils import peak_rss_bytes, reuse_freed_memory

    reuse_freed_memory()  # as the predict child
    model, _ = load_model(a["ckpt"], "cpu")
    gy, gx = axis_grid(a["height"], a["tile"], a["overlap"]), axis_grid(a["width"], a["tile"], a["overlap"])
    sizes = [min(a["batch"], gx.count - j) for j in range(0, gx.count, a["batch"])]
    inputs = {b: torch.randn(b, 3, a["tile"], a["tile"]) for b in set(sizes)}
    seconds = cpu = 0.0
    with torch.inference_mode():  # as predict's forward
        model(inputs[sizes[0]][:1, :, :64, :64])  # same small warm-up as predict's probe
        for _ in range(gy.count):
            for b in sizes:
                t0, c0 = time.perf_counter(), time.process_time()
                model(inputs[b])
                seconds += time.perf_counter() - t0
                cpu += time.process_time() - c0
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss": peak_rss_bytes(), "windows": gy.count * gx.count}


def run_child(kind: str, args: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--child-args", json.dumps(args)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"{kind} child failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def preview_png(color_tif: str, png: str, max_side: int = 1024) -> None:
    """Downsampled PNG of an RGBA colour product, to look at the result."""
    import rasterio
    from rasterio.enums import Resampling

    with rasterio.open(color_tif) as src:
        f = max(1, -(-max(src.width, src.height) // max_side))
        data = src.read(out_shape=(src.count, src.height // f, src.width // f), resampling=Resampling.nearest)
    with rasterio.open(png, "w", driver="PNG", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype="uint8") as dst:
        dst.write(data)


# ----------------------------------------------------------------------------- --ranks
def _timed(cmd: list[str], env: dict) -> dict:
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return {"seconds": time.perf_counter() - t0, "load": (load0 + os.getloadavg()[0]) / 2}


def ranks_benchmark(a) -> int:
    """A folder of ``--files`` generated tiles: 1 rank vs ``--ranks``, and --cog / --vector vs plain."""
    folder = Path(a.workdir) / f"city_{a.files}x{a.size}"
    folder.mkdir(parents=True, exist_ok=True)
    side = max(1, round(a.files ** 0.5))
    for i in range(a.files):
        path = folder / f"tile_{i:03d}.tif"
        if not path.exists():
            write_scene(path, a.size, seed=i, col=i % side, row=i // side)
    net = "tiny" if a.tiny else "light" if a.light else "default"
    ckpt = Path(a.workdir) / f"{net}.pt"
    make_checkpoint(ckpt, "tiny" if a.tiny else a.light)
    flags = ["-k", str(ckpt), "--tile", str(a.tile), "--overlap", str(a.overlap), "--batch", str(a.batch),
             "--device", "cpu"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    one = [sys.executable, "-m", "cmdbnet", "predict", str(folder)]
    many = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.ranks}",
            "-m", "cmdbnet", "predict", str(folder)]
    runs = {}
    single = {**env, "OMP_NUM_THREADS": "1"}
    for name, cmd, run_env in [
            ("1 rank", one, env), (f"{a.ranks} ranks", many, env), ("1 rank, 1 thread", one, single),
            ("1 rank --cog", one + ["--cog"], env),
            ("1 rank --vector", one + ["--vector", str(Path(a.workdir) / "vec" / "city.gpkg")], env)]:
        out = Path(a.workdir) / f"out_{name.replace(' ', '_').replace('-', '').replace(',', '')}"
        shutil.rmtree(out, ignore_errors=True)
        runs[name] = dict(_timed(cmd + ["-o", str(out)] + flags, run_env), out=out)
        runs[name]["in_run"] = json.loads((out / "predict_summary.json").read_text())["seconds"]
        print(f"{name}: {runs[name]['seconds']:.1f} s (load {runs[name]['load']:.2f})", flush=True)
    mpx = a.files * a.size * a.size / 1e6
    base, par = runs["1 rank"], runs[f"{a.ranks} ranks"]
    same = sum((base["out"] / p.name).read_bytes() == p.read_bytes() for p in par["out"].glob("*_mask.tif"))
    print(f"\n{a.files} tiles of {a.size} x {a.size} ({mpx:.1f} Mpx), network {net}, "
          f"tile {a.tile}, {os.cpu_count()} CPUs\n")
    print("| run | wall s | in-run s | Mpx/s (in-run) | vs 1 rank (in-run) | load avg |\n|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['in_run']:.1f} | {mpx / r['in_run']:.3f} | "
              f"{r['in_run'] / base['in_run']:.2f} x | {r['load']:.2f} |")
    print("\nwall: the whole command, process start-up included; in-run: predict_summary.json's seconds "
          "(inputs checked to summary written, model loading and imports excluded)")
    print(f"\nspeed-up {a.ranks} ranks vs 1: {base['seconds'] / par['seconds']:.2f} x wall, "
          f"{base['in_run'] / par['in_run']:.2f} x in-run; masks byte-identical: "
          f"{same}/{a.files}")
    report = json.loads((runs["1 rank --vector"]["out"] / "predict_summary.json").read_text())
    gpkg = Path(a.workdir) / "vec" / "city.gpkg"
    print(f"polygons written by --vector: {report['polygons']} ({gpkg.stat().st_size / 2**20:.1f} MiB GeoPackage)")
    sizes = {name: sum(p.stat().st_size for p in runs[name]["out"].glob("*_mask.tif")) / 2**20
             for name in ("1 rank", "1 rank --cog")}
    print(f"masks on disk: plain {sizes['1 rank']:.1f} MiB, COG (with overviews) {sizes['1 rank --cog']:.1f} MiB")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=6000, help="side of the generated GeoTIFF")
    p.add_argument("--input", help="predict this raster instead of a generated one")
    p.add_argument("--light", action="store_true", help="small network (resnet18, thin Mamba) for quick runs")
    p.add_argument("--tiny", action="store_true", help="folder mode: the tests' tiny network (fastest)")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--batch", type=int, default=4, help="windows per forward (cmdb predict's default)")
    p.add_argument("--format", default="index", choices=["index", "color", "both"])
    p.add_argument("--workdir", default="/tmp/cmdb-bench-predict")
    p.add_argument("--preview", help="write a PNG rendering of the colour output here")
    p.add_argument("--repeat", type=int, default=1, help="alternate bare/predict runs; report the fastest of each")
    p.add_argument("--ranks", type=int, help="folder mode: 1 rank vs this many torchrun ranks, --cog, --vector")
    p.add_argument("--files", type=int, default=16, help="folder mode: generated tiles of --size (default 16)")
    p.add_argument("--child", choices=["predict", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--child-args", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        fn = child_predict if a.child == "predict" else child_bare
        print(json.dumps(fn(json.loads(a.child_args))), flush=True)
        return 0
    if a.ranks:
        return ranks_benchmark(a)

    import torch

    from cmdbnet.utils import format_bytes

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if a.input:
        src = Path(a.input)
    else:
        src = work / f"scene_{a.size}.tif"
        if not src.exists():
            t0 = time.perf_counter()
            write_scene(src, a.size)
            print(f"generated {src} ({a.size} x {a.size} x 3) in {time.perf_counter() - t0:.1f} s", flush=True)
    ckpt = work / ("light.pt" if a.light else "default.pt")
    make_checkpoint(ckpt, a.light)  # always fresh: the network code may have changed since last time
    import rasterio

    from cmdbnet.inference.rasters import quiet_georef

    with quiet_georef(), rasterio.open(src) as ds:
        width, height = ds.width, ds.height
    fmt = "both" if a.preview else a.format
    common = dict(ckpt=str(ckpt), tile=a.tile, overlap=a.overlap, batch=a.batch)
    load = os.getloadavg()[0]
    print(f"input {src.name}: {width} x {height}; network {'light' if a.light else 'default'}; tile {a.tile} "
          f"overlap {a.overlap} batch {a.batch}; torch threads {torch.get_num_threads()}; "
          f"load average {load:.2f} on {os.cpu_count()} CPUs", flush=True)
    bares, preds = [], []
    for _ in range(a.repeat):  # alternate, keep the fastest of each: other load only slows runs down
        bares.append(run_child("bare", dict(common, width=width, height=height)))
        print(f"bare forward ({bares[-1]['windows']} windows, no I/O, no blending): "
              f"{bares[-1]['seconds']:.1f} s (load {os.getloadavg()[0]:.2f})", flush=True)
        preds.append(run_child("predict", dict(common, input=str(src), out=str(work / "out"), format=fmt)))
        print(f"predict: {preds[-1]['seconds']:.1f} s (load {os.getloadavg()[0]:.2f})", flush=True)
    bare = min(bares, key=lambda r: r["seconds"])
    pred = min(preds, key=lambda r: r["seconds"])
    pred["peak_rss"] = max(r["peak_rss"] for r in preds)
    s = pred["summary"]
    ratio = pred["seconds"] / bare["seconds"]
    mpx = width * height / 1e6
    ok_time, ok_rss = ratio <= RATIO_LIMIT, pred["peak_rss"] <= RSS_LIMIT
    print(f"predict (read, forward, blend, write): {pred['seconds']:.1f} s = {ratio:.3f} x bare "
          f"[limit {RATIO_LIMIT}] {'PASS' if ok_time else 'FAIL'}")
    cpu_ratio = min(r["cpu_seconds"] for r in preds) / min(r["cpu_seconds"] for r in bares)
    print(f"CPU time (less sensitive to other load): predict {min(r['cpu_seconds'] for r in preds):.1f} s, "
          f"bare {min(r['cpu_seconds'] for r in bares):.1f} s = {cpu_ratio:.3f} x")
    print(f"throughput: predict {mpx / pred['seconds']:.3f} Mpx/s, bare {mpx / bare['seconds']:.3f} Mpx/s")
    print(f"peak RSS: predict {format_bytes(pred['peak_rss'])} [limit {format_bytes(RSS_LIMIT)}] "
          f"{'PASS' if ok_rss else 'FAIL'}; bare {format_bytes(bare['peak_rss'])}; strip buffer "
          f"{s['strip_shape']} = {format_bytes(s['accumulator_bytes'])}")
    print(f"outputs: {', '.join(s['outputs'].values())}; load average now {os.getloadavg()[0]:.2f}")
    if a.preview:
        preview_png(s["outputs"]["color"], a.preview)
        print(f"preview: {a.preview}")
    print("PASS" if ok_time and ok_rss else "FAIL")
    return 0 if ok_time and ok_rss else 1


if __name__ == "__main__":
    sys.exit(main())
