"""Throughput and memory of ``cmdb prepare`` on a user's dataset with vector labels.

Generates (not timed) four 6000 x 6000 RGB GeoTIFFs in UTM 33N and one GeoPackage of
polygons over them in EPSG:4326 (buildings, tree crowns, ponds; about 9,000 features, so
every image needs its polygons reprojected and burnt), plus the dataset YAML; then runs
``python -m cmdbnet prepare dataset.yaml`` in a child process. As the baseline, measured in
the same run: one built-in Potsdam tile of the same size (``benchmarks/prepare.py``'s tile).

Reports MB/s of source image bytes and the peak RSS of the whole process tree (see
``benchmarks/prepare.py``). Target: peak RSS <= 2 GiB. Prints PASS or FAIL.

    nice python benchmarks/prepare_custom.py [--size 6000] [--images 4] [--workers 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import rasterio
import rasterio.features
import rasterio.warp
from affine import Affine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare import make_tile, run_prepare  # noqa: E402

TARGET_RSS = 2 << 30
CLASSES = ("background", "building", "tree", "water")
PX = 0.05


def _polygons(rng: np.random.Generator, size: int, x0: float, y0: float) -> list[tuple[object, str]]:
    """Rotated rectangles (buildings), 24-gons (trees, ponds) in image CRS coordinates."""
    import shapely

    out = []
    extent = size * PX
    for kind, n, r_lo, r_hi in (("building", 2000, 3, 12), ("tree", 200, 4, 15), ("water", 50, 10, 40)):
        cx = x0 + rng.uniform(0, extent, n)
        cy = y0 - rng.uniform(0, extent, n)
        r = rng.uniform(r_lo, r_hi, n)
        for i in range(n):
            if kind == "building":
                box = shapely.box(cx[i] - r[i], cy[i] - r[i] / 2, cx[i] + r[i], cy[i] + r[i] / 2)
                out.append((shapely.affinity.rotate(box, float(rng.uniform(0, 90))), kind))
            else:
                out.append((shapely.Point(cx[i], cy[i]).buffer(r[i], 6), kind))
    return out


def make_dataset(root: Path, size: int, images: int, seed: int = 0) -> int:
    """Write the images, the GeoPackage (EPSG:4326) and dataset.yaml; return the images' pixel bytes."""
    import pyogrio
    import shapely
    import yaml

    rng = np.random.default_rng(seed)
    geoms, kinds = [], []
    for i in range(images):
        x0, y0 = 500_000.0 + i * size * PX * 1.1, 5_800_000.0
        tf = Affine(PX, 0, x0, 0, -PX, y0)
        polys = _polygons(rng, size, x0, y0)
        label = rasterio.features.rasterize(((g, CLASSES.index(k)) for g, k in polys), out_shape=(size, size),
                                            transform=tf, dtype="uint8")
        pixels = (np.array([[90, 100, 80], [200, 90, 70], [40, 130, 50], [30, 60, 140]], np.uint8)[label]
                  + rng.integers(0, 30, (size, size, 1), dtype=np.uint8))
        path = root / "images" / f"ortho_{i}.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(path, "w", driver="GTiff", height=size, width=size, count=3, dtype="uint8",
                           crs="EPSG:32633", transform=tf, tiled=True) as dst:
            dst.write(np.moveaxis(pixels, -1, 0))
        del label, pixels
        for g, k in polys:
            geoms.append(shapely.geometry.shape(rasterio.warp.transform_geom("EPSG:32633", "EPSG:4326", g)))
            kinds.append(k)
    pyogrio.raw.write(str(root / "labels.gpkg"), shapely.to_wkb(np.array(geoms, dtype=object)),
                      [np.array(kinds, dtype=object)], ["kind"], geometry_type="Polygon", crs="EPSG:4326",
                      driver="GPKG", layer="labels")
    (root / "dataset.yaml").write_text(yaml.safe_dump({
        "name": "bench", "images": "images", "labels": "labels.gpkg", "vector": {"field": "kind"},
        "classes": [{"name": c} for c in CLASSES], "split": {"val": 0.25, "seed": 0}}, sort_keys=False))
    return images * size * size * 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=6000)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="cmdb-bench-custom-"))
    try:
        stamp = work / f".size-{args.size}-{args.images}"
        t0 = time.perf_counter()
        if not stamp.exists():
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                pool.submit(make_dataset, work / "custom", args.size, args.images).result()
                pool.submit(make_tile, work / "potsdam", args.size).result()
            stamp.touch()
            print(f"generated {args.images} images of {args.size}x{args.size} + GeoPackage, and one Potsdam tile, "
                  f"in {time.perf_counter() - t0:.1f} s (not timed)")
        nbytes = args.images * args.size * args.size * 3
        rows = []
        for what, root, dataset, n in (("built-in (Potsdam tile)", work / "potsdam", "potsdam", args.size ** 2 * 3),
                                       ("custom, vector labels", None, str(work / "custom" / "dataset.yaml"), nbytes)):
            out = work / f"out-{dataset.rsplit('/', 1)[-1]}"
            shutil.rmtree(out, ignore_errors=True)
            wall, cpu, peak, manifest = run_prepare(root, out, args.crop, args.workers, dataset)
            crops = sum(s["crops"] for s in manifest["splits"].values())
            rows.append((what, n / 1e6 / wall, crops, wall, n / 1e6 / cpu, peak))
        print(f"workers {args.workers}, crop {args.crop}, load average {psutil.getloadavg()[0]:.2f} on "
              f"{psutil.cpu_count()} CPUs\n")
        print("| dataset | throughput (source MB/s) | crops | wall s | MB per CPU-s | peak RSS |")
        print("|---|---|---|---|---|---|")
        for what, mbps, crops, wall, per_cpu, peak in rows:
            print(f"| {what} | {mbps:.1f} | {crops} | {wall:.1f} | {per_cpu:.1f} | {peak / 2**20:.0f} MiB |")
        print(f"\ncustom / built-in throughput: {rows[1][1] / rows[0][1]:.2f}; "
              f"peak RSS target <= {TARGET_RSS / 2**20:.0f} MiB")
        ok = rows[1][5] <= TARGET_RSS
        print("PASS" if ok else "FAIL")
        sys.exit(0 if ok else 1)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
