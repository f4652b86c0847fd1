"""``prepare``: cut raw tiles into training crops, with a manifest; resumable and atomic.

The output layout and manifest are described in ``manifest``. Crops are GeoTIFFs with the
source's bands and dtype and the window's georeferencing; labels are single-band uint8
class indices (255 = ignore, also their nodata value). A crop is named
``<tile key>_<row>_<col>`` (pixel offsets of the crop in its tile, 5 digits).

Edge rule: crops start every ``stride`` pixels; when the last one does not reach the right
(bottom) edge, one more crop is added that ends exactly at the edge (it overlaps its
neighbour), so no pixel is dropped. A tile smaller than the crop is an error naming it.

Memory: a tile is read in strips of ``crop`` rows (``rasterio`` windows), never whole.
Parallelism: ``workers`` processes cut whole tiles, or runs of strips of one tile when
there are fewer tiles than workers, so one huge tile still uses every core.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from cmdbnet.data.custom import load_spec, scan_custom
from cmdbnet.data.manifest import (
    DONE_DIR,
    SPLIT_ORDER,
    build_manifest,
    check_out,
    crop_paths,
    finished_record,
    mark_done,
    run_params,
    write_manifest,
)
from cmdbnet.data.raw import UNKNOWN, LabelDecoder, RasterInfo, RawTile, check_tile, find_tiles, open_raster, read_rows
from cmdbnet.data.registry import DatasetSpec
from cmdbnet.data.splits import draw_split, image_size
from cmdbnet.data.stats import band_statistics, band_sums
from cmdbnet.data.vector import burn
from cmdbnet.errors import CmdbError
from cmdbnet.progress import progress_bar
from cmdbnet.utils import atomic_path, disk_full_error, remove_partial_files, write_failure

EDGE_RULE = "last crop of a row/column shifted back to end at the tile edge (overlaps its neighbour)"
NONFINITE_POLICY = "NaN/inf image pixels: every band set to 0, label set to the ignore index"


class PrepareWarning(UserWarning):
    """Something the user should know about a prepare run (unlisted tiles, skipped folders)."""


def axis_starts(length: int, crop: int, stride: int) -> list[int]:
    """Crop offsets along one axis of ``length`` pixels; see the edge rule in the module doc."""
    if length < crop:
        raise ValueError(f"length {length} < crop {crop}")
    starts = list(range(0, length - crop + 1, stride))
    if starts[-1] + crop < length:
        starts.append(length - crop)
    return starts


def window_transform(t: Affine, row: int, col: int) -> Affine:
    """The transform of a window starting at (row, col): the source's, moved to that pixel."""
    return Affine(t.a, t.b, t.c + t.a * col + t.b * row, t.d, t.e, t.f + t.d * col + t.e * row)


def crop_windows(height: int, width: int, crop: int, stride: int | None = None) -> list[tuple[int, int]]:
    """``(row, col)`` offsets of every crop of a ``height`` x ``width`` tile, row-major."""
    stride = stride or crop
    return [(r, c) for r in axis_starts(height, crop, stride) for c in axis_starts(width, crop, stride)]


@dataclass(frozen=True)
class TileJob:
    """One worker's share of a tile: some strips of crops, maybe a source checksum (picklable)."""

    dataset: str
    tile: RawTile
    info: RasterInfo
    crop: int
    stride: int
    eroded: bool
    root: str
    out: str
    rows: tuple[int, ...]  # row offsets of the strips this job cuts
    checksums: tuple[str, ...] = ()  # "image" and/or "label": sources this job hashes
    spec: DatasetSpec | None = None
    shapes: tuple = ()  # vector labels: ((wkb, class), ...) over this tile's image, in burn order


# GDAL settings while cutting: a small block cache (strips are read once, so caching a whole
# 6000 x 6000 tile only costs memory) and no directory listing per file opened.
GDAL_ENV = {"GDAL_CACHEMAX": 64, "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}


def _file_record(path: Path, root: Path) -> dict[str, Any]:
    st = path.stat()
    return _hashed(path, root, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)  # the blocks of one image hash it once per process
def _hashed(path: Path, root: Path, size: int, mtime_ns: int) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    try:
        rel = path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        rel = str(path.resolve())
    return {"path": rel, "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


# Size of a crop file that read back whole, per layout: the same layout gives the same size
# (uncompressed, fixed-size tags), so later crops are checked by their size alone; another
# size (a tile in another CRS) is read back again.
_WHOLE_SIZE: dict[str, int] = {}


def _write_tif(path: Path, array: np.ndarray, profile: dict[str, Any]) -> None:
    """Write one uncompressed crop and check it is whole before it gets its final name.

    Why: GDAL reports a write that failed at its final flush (a full disk) only in its log,
    and a crop that does not read back would otherwise be marked done and skipped forever.
    """
    layout = f"{path.parent}:{array.shape}:{array.dtype}:{profile.get('nodata')}"
    with atomic_path(path, suffix=".tif") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # sources without georeferencing
        try:
            with rasterio.open(tmp, "w", **profile) as dst:
                dst.write(array)
            size = tmp.stat().st_size
            whole = size == _WHOLE_SIZE.get(layout) or _reads_back(tmp, array)
        except RasterioError:
            whole = False
        if not whole:
            cause = write_failure(tmp.parent, array.nbytes + (64 << 10))
            raise disk_full_error(path, cause.strerror) if cause else CmdbError(f"{path} did not read back after "
                                                                                 "writing it; check the disk")
        _WHOLE_SIZE.setdefault(layout, size)


def _reads_back(path: Path, array: np.ndarray) -> bool:
    """Uncompressed: whole only if every pixel byte is in the file and it decodes."""
    with rasterio.open(path) as src:
        return path.stat().st_size >= array.nbytes and src.read().shape == array.shape


def cut_tile(job: TileJob, on_strip: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write the crops of ``job.rows``; on any failure remove the crops it wrote, then re-raise.

    Returns ``{"crops": stems, "counts": pixels per label value (256), "files": {what: record},
    "nonfinite": pixels}``; NaN/inf pixels are handled as ``NONFINITE_POLICY`` says.
    """
    spec, tile, info, crop = job.spec, job.tile, job.info, job.crop
    row0, col0 = tile.window[:2] if tile.window else (0, 0)
    span = (col0, info.width)
    decoder = LabelDecoder(spec, job.eroded)
    out = Path(job.out)
    cols = axis_starts(info.width, crop, job.stride)
    counts = np.zeros(256, np.int64)
    nonfinite = 0
    # per band: n, sum, sum of squares
    sums = np.zeros((3, info.count)) if info.dtype != "uint8" or spec.band_stats else None
    written: list[Path] = []
    stems: list[str] = []
    try:
        with rasterio.Env(**GDAL_ENV), open_raster(tile.image, "image") as img, \
                (contextlib.nullcontext() if spec.vector else open_raster(tile.label, "label")) as lab:
            geo = {"crs": img.crs} if info.georeferenced else {}
            # Uncompressed and band-interleaved: per-file cost dominates prepare, and training
            # reads every crop many times, so no codec on either side.
            image_profile = {"driver": "GTiff", "height": crop, "width": crop, "count": info.count,
                             "dtype": info.dtype, "nodata": img.nodata, "interleave": "band", **geo}
            if info.count not in (1, 3):  # RGBIR: the fourth band is data, never an alpha mask
                image_profile["photometric"] = "MINISBLACK"
            label_profile = {"driver": "GTiff", "height": crop, "width": crop, "count": 1, "dtype": "uint8",
                             "nodata": spec.ignore_index, **geo}
            if spec.vector:
                fill = spec.classes.index(spec.background) if spec.vector.outside == "background" else spec.ignore_index
                top = job.rows[0]
                burnt = burn(job.shapes, job.rows[-1] + crop - top, info.width,
                             window_transform(img.transform, row0 + top, col0), fill)
            for y in job.rows:
                strip = read_rows(img, row0 + y, crop, "image", info.indexes, span)
                if spec.vector:
                    index = burnt[y - top:y - top + crop].copy()
                else:
                    index = decoder(read_rows(lab, row0 + y, crop, "label", None, span))
                    if (index == UNKNOWN).any():
                        raise decoder.off_palette_error(lab)
                if spec.band_stats and img.nodata is not None:  # a user's nodata: not learnt, not scored
                    index[(strip == img.nodata).all(axis=0)] = spec.ignore_index
                bad = ~np.isfinite(strip).all(axis=0) if strip.dtype.kind == "f" else None
                if bad is not None and bad.any():
                    nonfinite += int(bad.sum())
                    strip[:, bad] = 0
                    index[bad] = spec.ignore_index
                if sums is not None:
                    sums += band_sums(strip, bad, img.nodata if spec.band_stats else None)
                for x in cols:
                    stem = f"{tile.key}_{row0 + y:05d}_{col0 + x:05d}"
                    where = {"transform": window_transform(img.transform, row0 + y, col0 + x)} if geo else {}
                    label = index[None, :, x:x + crop]
                    image_path, label_path = crop_paths(out, tile.split, stem)
                    _write_tif(image_path, strip[:, :, x:x + crop], {**image_profile, **where})
                    written.append(image_path)
                    _write_tif(label_path, label, {**label_profile, **where})
                    written.append(label_path)
                    counts += np.bincount(label.ravel(), minlength=256)
                    stems.append(stem)
                if on_strip:
                    on_strip(len(cols))
        root = Path(job.root)
        files = {what: _file_record(getattr(tile, what), root) for what in job.checksums}
        return {"crops": stems, "counts": counts.tolist(), "files": files, "nonfinite": nonfinite,
                "band_sums": sums.tolist() if sums is not None else None}
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def split_jobs(base: dict[str, Any], tile: RawTile, info: RasterInfo, parts: int) -> list[TileJob]:
    """Cut one tile as ``parts`` jobs of consecutive strips (so one big tile still uses every worker)."""
    rows = axis_starts(info.height, base["crop"], base["stride"])
    parts = max(1, min(parts, len(rows)))
    bounds = np.linspace(0, len(rows), parts + 1).round().astype(int)
    jobs = []
    for i in range(parts):
        sums = (("image",) if i == 0 else ()) + (("label",) if i == parts - 1 else ())
        jobs.append(TileJob(tile=tile, info=info, rows=tuple(rows[bounds[i]:bounds[i + 1]]), checksums=sums, **base))
    return jobs


# ---------------------------------------------------------------- running

class _Assembler:
    """Merges the parts of each tile; marks a tile done once all its parts are in."""

    def __init__(self, out: Path, params: dict[str, Any], num_classes: int, ignore_index: int,
                 jobs: list[TileJob]):
        self.out, self.params, self.k, self.ignore = out, params, num_classes, ignore_index
        self.left = {job.tile.key: 0 for job in jobs}
        for job in jobs:
            self.left[job.tile.key] += 1
        self.parts: dict[str, list[dict[str, Any]]] = {key: [] for key in self.left}
        self.records: dict[str, dict[str, Any]] = {}

    def add(self, job: TileJob, part: dict[str, Any]) -> None:
        key, tile = job.tile.key, job.tile
        self.parts[key].append(part)
        self.left[key] -= 1
        if self.left[key]:
            return
        parts = self.parts[key]
        counts = np.sum([p["counts"] for p in parts], axis=0)
        files = {what: rec for p in parts for what, rec in p["files"].items()}
        record = {"key": key, "tile_id": tile.tile_id, "split": tile.split, "listed": tile.listed,
                  "image": files["image"], "label": files["label"], "height": job.info.height,
                  "width": job.info.width, "crs": job.info.crs, "window": tile.window, "crops": sorted(s for p in parts for s in p["crops"]),
                  "class_pixels": counts[:self.k].tolist(), "ignored": int(counts[self.ignore]),
                  "nonfinite": sum(p.get("nonfinite", 0) for p in parts),
                  "band_sums": (np.sum([p["band_sums"] for p in parts], axis=0).tolist()
                                if all(p.get("band_sums") for p in parts) else None)}
        mark_done(self.out, tile, self.params, record)
        self.records[key] = record

    def discard_unfinished(self, jobs: list[TileJob]) -> None:
        """After a failure: remove the crops of tiles that did not finish (no partial tiles left)."""
        split = {job.tile.key: job.tile.split for job in jobs}
        for key, parts in self.parts.items():
            if self.left[key]:
                for stem in (s for p in parts for s in p["crops"]):
                    for path in crop_paths(self.out, split[key], stem):
                        path.unlink(missing_ok=True)


def _die_with_parent(parent: int) -> None:
    """Pool worker start-up: exit as soon as prepare's process dies, even by SIGKILL.

    Why: orphaned workers otherwise keep writing crops into the output folder, then wait
    forever. Linux: the kernel's parent-death signal; elsewhere a thread watching the parent.
    Workers ignore Ctrl-C: the parent stops the pool, and no worker prints a traceback.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: prepare itself stops the pool
    if sys.platform.startswith("linux"):
        import ctypes  # Linux only

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above ran
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def remove_stale_parts(out: Path) -> None:
    """Delete temporary files (``.<name>.*.part*``) that a killed run left in the output folder."""
    for folder in [out, out / DONE_DIR] + [out / s / k for s in SPLIT_ORDER for k in ("images", "labels")]:
        remove_partial_files(folder)


def _run_jobs(jobs: list[TileJob], workers: int, progress: bool, add: Callable[[TileJob, dict], None]) -> None:
    """Cut in this process (workers 0) or a process pool; stop at the first error."""
    total = sum(len(j.rows) * len(axis_starts(j.info.width, j.crop, j.stride)) for j in jobs)
    show = progress and sys.stderr.isatty() and total > 0
    bar = progress_bar("[bold]prepare[/]", "crops", enabled=show)
    with bar:
        task = bar.add_task("crops", total=total)
        if workers <= 0 or len(jobs) <= 1:
            for job in jobs:
                add(job, cut_tile(job, on_strip=lambda n: bar.advance(task, n)))
            return
        pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), initializer=_die_with_parent,
                                   initargs=(os.getpid(),))
        futures = {pool.submit(cut_tile, job): job for job in jobs}
        added = set()
        try:
            for fut in as_completed(futures):
                part = fut.result()  # re-raises a worker's error here
                added.add(fut)
                add(futures[fut], part)
                bar.advance(task, len(part["crops"]))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            for fut, job in futures.items():  # parts that finished meanwhile: track their crops
                if fut not in added and fut.done() and not fut.cancelled() and fut.exception() is None:
                    add(job, fut.result())
            raise
        finally:
            pool.shutdown(wait=True)


def _annotate(manifest: dict[str, Any], images: list[Path], ordered: list[dict[str, Any]],
              ignore_index: int, band_stats: bool = False) -> None:
    """Add NaN/inf pixel counts and non-8-bit band statistics to the manifest; warn about NaN pixels."""
    bad = {image: r.get("nonfinite", 0) for image, r in zip(images, ordered) if r.get("nonfinite", 0)}
    manifest["nonfinite_pixels"] = {"policy": NONFINITE_POLICY, "total": sum(bad.values()),
                                    "images": {str(k): v for k, v in bad.items()}}
    stats = band_statistics(ordered) if manifest["dtype"] != "uint8" or band_stats else None
    if stats:
        manifest.update(stats, stats_note=f"per-band mean/std of the training tiles ({manifest['dtype']} data): "
                                          "train uses them unless data.mean/data.std are set")
    if bad:
        first = next(iter(bad))
        warnings.warn(f"{sum(bad.values())} NaN/inf pixel(s) in {len(bad)} image(s) (e.g. {first}: {bad[first]} px): "
                      f"set to 0 and labelled ignore ({ignore_index}), so training and scores skip them",
                      PrepareWarning, stacklevel=3)


def prepare(dataset: str | DatasetSpec, root: str | os.PathLike | None, out: str | os.PathLike, crop: int = 256,
            stride: int | None = None, eroded: bool = False, bands: str | None = None, workers: int = 0,
            progress: bool = True) -> dict[str, Any]:
    """Cut a raw dataset into crops under ``out`` and return the manifest (also in OUT/manifest.json).

    Re-running with the same arguments skips tiles whose sources and crops are unchanged and
    leaves every file (manifest included) untouched when nothing changed.
    """
    spec = load_spec(dataset)
    band = spec.band(bands)
    stride = stride or crop
    if crop < 1 or not 1 <= stride <= crop:
        raise CmdbError(f"need 1 <= stride <= crop so every pixel lands in a crop (crop {crop}, stride {stride})")
    if root is None and not spec.source:
        raise CmdbError("no raw folder given: pass --root (or set data.root)")
    root, out = Path(root or Path(spec.source).parent), Path(out)
    scan, shapes = scan_custom(spec, band, crop) if spec.images_dir else (find_tiles(spec, root, band.name, eroded), {})
    for note in scan.notes:
        warnings.warn(note, PrepareWarning, stacklevel=2)
    infos = [check_tile(spec, band, tile) for tile in scan.tiles]
    if spec.band_stats and not band.count:  # a user's images, no band names given: name them by number
        band = replace(band, count=infos[0].count, band_names=tuple(f"band{i + 1}" for i in range(infos[0].count)))
    for tile, info in zip(scan.tiles, infos):
        if info.height < crop or info.width < crop:
            raise CmdbError(f"tile {tile.image} is {info.width}x{info.height} pixels, smaller than the crop {crop}: "
                            "use a smaller --crop")
    kinds = {(i.count, i.dtype) for i in infos}
    if len(kinds) > 1:
        raise CmdbError(f"images under {root} mix band counts / data types: "
                        + ", ".join(f"{c} x {d}" for c, d in sorted(kinds)))
    params = run_params(spec.name, crop, stride, band.name, eroded)
    check_out(out, root, params)
    remove_stale_parts(out)

    records: dict[str, dict[str, Any]] = {}
    todo = []
    for tile, info in zip(scan.tiles, infos):
        record = finished_record(out, tile, params)
        if record is not None:
            records[tile.key] = record
        else:
            todo.append((tile, info))
    base = {"dataset": spec.name, "crop": crop, "stride": stride, "eroded": eroded, "root": str(root),
            "out": str(out), "spec": spec}
    parts = -(-2 * workers // len(todo)) if workers > 0 and todo else 1  # >= 2 jobs per worker
    jobs = [job for tile, info in todo
            for job in split_jobs({**base, "shapes": shapes.get(str(tile.image), ())}, tile, info, parts)]
    assembler = _Assembler(out, params, spec.num_classes, spec.ignore_index, jobs)
    try:
        _run_jobs(jobs, workers, progress, assembler.add)
    except BaseException:
        assembler.discard_unfinished(jobs)
        raise
    records.update(assembler.records)
    ordered = [records[t.key] for t in scan.tiles]
    manifest = build_manifest(spec, band, params, scan, infos, ordered, root, EDGE_RULE)
    _annotate(manifest, [t.image for t in scan.tiles], ordered, spec.ignore_index, spec.band_stats)
    if spec.source:  # a user's dataset: its spec travels on, so train/evaluate/predict need nothing else
        manifest.update(dataset_spec=spec.to_dict(), band_indexes=list(band.indexes))
        manifest["split_policy"]["blocks"] = spec.split_plan.blocks if spec.split_plan else 0
    if any(t.window for t in scan.tiles):
        draw_split(out / "split.png", scan.tiles, {t.image: image_size(t.image) for t in scan.tiles})
    write_manifest(out, manifest)
    return manifest

