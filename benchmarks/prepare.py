"""Throughput and memory of ``cmdb prepare`` on one full-size Potsdam tile.

Generates one synthetic 6000 x 6000 RGB GeoTIFF tile with its colour label in the Potsdam
download layout (not timed), then runs ``python -m cmdbnet prepare`` in a child process
and reports:

* MB/s of source pixels: image bytes read (H x W x bands x 1 byte, MB = 10**6) / wall s,
* peak RSS: the larger of the child's own ``ru_maxrss`` (``os.wait4``; its largest process)
  and the sum of RSS over its process tree sampled every 20 ms (pool workers together).

Targets: >= 30 MB/s and <= 1 GiB peak RSS on 2 cores. Prints PASS or FAIL.

    python benchmarks/prepare.py [--size 6000] [--crop 256] [--workers 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import rasterio
from affine import Affine
from rasterio.crs import CRS

from cmdbnet.data.registry import get_spec
from cmdbnet.data.synthetic import render_scene

TARGET_MBPS = 30.0
TARGET_RSS = 1 << 30


def make_tile(root: Path, size: int, seed: int = 0) -> int:
    """Write one RGB tile and its colour label; return the image's pixel bytes."""
    spec = get_spec("potsdam")
    band = spec.band("rgb")
    tile_id = spec.official_train[0]
    cls, refl = render_scene(spec.classes, size, size, np.random.default_rng(seed))
    profile = {"driver": "GTiff", "height": size, "width": size, "dtype": "uint8",
               "crs": CRS.from_epsg(spec.crs_epsg), "transform": Affine(0.05, 0.0, 500_000.0, 0.0, -0.05, 5_500_000.0)}
    image = root / band.download_folders[0] / spec.image_template.format(id=tile_id, tag=band.tag)
    label = root / spec.label_folders[0] / spec.label_templates[0].format(id=tile_id)
    for path, array in ((image, refl[:3]), (label, np.moveaxis(np.array(spec.palette, np.uint8)[cls], -1, 0))):
        path.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(path, "w", count=array.shape[0], **profile) as dst:
            dst.write(array)
    return size * size * band.count


def run_prepare(root: Path | None, out: Path, crop: int, workers: int,
                dataset: str = "potsdam") -> tuple[float, float, int, dict]:
    """Wall seconds, CPU seconds, peak RSS and manifest of one ``cmdb prepare`` child process
    (``dataset`` a dataset YAML: ``root`` None)."""
    cmd = [sys.executable, "-m", "cmdbnet", "prepare", dataset, *(["--root", str(root)] if root else []),
           "--out", str(out), "--crop", str(crop), "--workers", str(workers), "--json"]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc, tree_peak = psutil.Process(child.pid), 0
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)  # this child's own rusage, no one else's
        if pid:
            break
        try:
            tree_peak = max(tree_peak, sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = child.stdout.read(), child.stderr.read()
    if child.returncode != 0:
        sys.exit(f"prepare failed ({child.returncode}): {stderr.strip()}")
    maxrss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return wall, usage.ru_utime + usage.ru_stime, max(maxrss, tree_peak), json.loads(stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=6000)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2, help="prepare --workers (default 2: the 2-core target)")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = ap.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="cmdb-bench-prepare-"))
    try:
        t0 = time.perf_counter()
        stamp = work / "raw" / f".size-{args.size}"
        if stamp.exists():  # --keep: reuse the tile of an earlier run
            nbytes = args.size * args.size * 3
            print(f"reusing the {args.size}x{args.size} tile in {work / 'raw'}")
        else:
            # generate in a separate process so this one stays small (a child inherits its parent's peak)
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                nbytes = pool.submit(make_tile, work / "raw", args.size).result()
            stamp.touch()
            print(f"generated one {args.size}x{args.size} RGB tile + label in {time.perf_counter() - t0:.1f} s "
                  "(not timed)")
        shutil.rmtree(work / "out", ignore_errors=True)
        wall, cpu, peak, manifest = run_prepare(work / "raw", work / "out", args.crop, args.workers)
        crops = sum(s["crops"] for s in manifest["splits"].values())
        mbps = nbytes / 1e6 / wall
        print(f"prepare: {crops} crops of {args.crop} in {wall:.2f} s wall (process start included), "
              f"workers {args.workers}, load average {psutil.getloadavg()[0]:.2f} on {psutil.cpu_count()} CPUs")
        print(f"throughput: {mbps:.1f} MB/s of source pixels ({nbytes / 1e6:.0f} MB)   target >= {TARGET_MBPS:.0f}")
        print(f"CPU time:   {cpu:.2f} s user+sys over all processes = {nbytes / 1e6 / cpu:.1f} MB per CPU-second "
              "(what a busy machine cannot hide)")
        print(f"peak RSS:   {peak / 2**20:.0f} MiB   target <= {TARGET_RSS / 2**20:.0f} MiB")
        ok = mbps >= TARGET_MBPS and peak <= TARGET_RSS
        print("PASS" if ok else "FAIL")
        sys.exit(0 if ok else 1)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
