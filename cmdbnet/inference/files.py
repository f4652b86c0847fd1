"""Segment whole rasters of any size: the engine behind ``cmdb predict`` (``cmdbnet.predict``).

Why streamed: a Potsdam tile is 6000 x 6000 and mosaics are larger; holding its K-class
probabilities in memory (6 x 36 Mpx x 4 B = 864 MB, plus weights) is what makes peers'
predict scripts fall over. Here windows are read with rasterio, predicted in batches,
blended in strips (``sliding.StripPredictor``) and written with rasterio windows, so
memory follows the strip (K x tile x width), not the raster.

Everything about the classes, palette, bands and normalisation comes from the checkpoint.
Every check that can fail (checkpoint, inputs, output paths) runs before the first window
is predicted, and outputs are written under temporary names and renamed only when the
whole file succeeded: a failure never leaves a half-written mask that looks finished.

Many processes: under ``torchrun --nproc-per-node N -m cmdbnet predict`` the inputs are
sharded across ranks by pixel count, a raster too big for one rank is split into bands of
window rows (``shards``), each rank writes its own outputs, and rank 0 writes
``predict_summary.json``. A re-run skips outputs that are verifiably complete (``resume``),
and one lock file keeps two runs out of the same output folder. ``--cog`` and the VRT mosaic
are in ``gis``, ``--vector`` in ``vector``, QGIS styles in ``styles``; what happens to one file
is in ``writing``.

``forward_tta`` and ``predict_array`` (re-exported here) are the in-memory entry points
for ``cmdb evaluate``; they share the window and blend code with the raster path.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch.distributed as dist

from cmdbnet.checkpoint import resolve_checkpoint
from cmdbnet.errors import CmdbError
from cmdbnet.inference.compiled import compile_predictor
from cmdbnet.inference.gis import reference_crs, same_crs, write_vrt
from cmdbnet.inference.network import load_network, load_predictor_model
from cmdbnet.inference.rasters import (
    OUTPUT_EXTS,
    check_input,
    check_output_outside_inputs,
    expand_inputs,
    plan_outputs,
)
from cmdbnet.inference.resume import (
    RunLock,
    clean_parts,
    input_fingerprint,
    lock_path,
    output_complete,
    run_fingerprint,
)
from cmdbnet.inference.shards import PREDICT_TIMEOUT, Unit, assign, band_paths, gather, make_units
from cmdbnet.inference.styles import style_path, write_style
from cmdbnet.inference.vector import check_vector, merge_polygon_parts, polygonise, write_polygons
from cmdbnet.inference.window import StripPredictor, emitted_rows, forward_tta, predict_array
from cmdbnet.inference.writing import Progress, assemble, finish_summary, merge_band_summaries, predict_file
from cmdbnet.runtime import DistInfo, init_distributed, pick_device
from cmdbnet.settings import PredictSettings
from cmdbnet.utils import file_sha256, write_text_atomic

__all__ = ["predict", "forward_tta", "predict_array", "pick_device", "load_predictor_model", "PredictNote"]

SUMMARY_NAME = "predict_summary.json"
MOSAIC_NAME = "mosaic.vrt"
LARGE_RUN_WINDOWS = 5_000  # from this many windows on, say so before starting


class PredictNote(UserWarning):
    """Something a run left out on purpose (a raster outside the mosaic's CRS, ...)."""


def _on_main(info: DistInfo, fn) -> None:
    """Run ``fn`` on rank 0 only; its CmdbError is raised on every rank."""
    msg = None
    if info.is_main:
        try:
            fn()
        except CmdbError as exc:
            msg = str(exc)
    msg = gather(msg, info)[0]
    if msg:
        raise CmdbError(msg)


def predict(inputs: str | os.PathLike | Iterable[str | os.PathLike], out: str | os.PathLike,
            checkpoint: str | os.PathLike, settings: PredictSettings | None = None,
            progress: bool = True, overwrite: bool = False, vector: str | os.PathLike | None = None,
            vector_classes: list[str] | None = None, keep_going: bool = False) -> list[dict[str, Any]]:
    """Segment every input raster into GeoTIFF products; returns one summary per file.

    ``inputs``: files, folders or glob patterns. ``out``: a .tif file for a single input,
    else a folder (``<stem>_mask.tif``, ``_color``, ``_probs``, ``_boundary``, plus
    ``mosaic.vrt`` and ``predict_summary.json``). ``checkpoint``: a checkpoint file or a run
    folder (best.pt, else last.pt). Complete outputs of an earlier identical run are
    skipped unless ``overwrite``. ``vector``: a GeoPackage of the mask's polygons (classes
    ``vector_classes``, default all). ``keep_going``: an input that cannot be read or
    predicted is reported as ``{"input", "error"}`` and the others go on. Under torchrun every
    rank calls this (module doc).
    """
    s = settings or PredictSettings()
    owns_group = not dist.is_initialized()
    dinfo = init_distributed(s.device, PREDICT_TIMEOUT)
    try:
        items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
        files = expand_inputs(items)
        check_output_outside_inputs(items, out)
        plans = plan_outputs(files, out, s, overwrite)
        out = Path(out)
        single = not out.is_dir() and out.suffix.lower() in OUTPUT_EXTS
        run = _Run(s, files, plans, checkpoint, dinfo, progress, overwrite, keep_going)
        run.vector = Path(vector) if vector else None
        run.vector_ids = check_vector(run.vector, vector_classes, run.meta.classes)
        if run.vector and "mask" not in plans[0]:
            raise CmdbError("--vector traces the class-index mask: use --format index or both")
        run.survey_inputs()  # before the lock: a bad input leaves no output folder behind
        lock = RunLock(lock_path(out, single), out)
        finals = [p for plan in plans for p in plan.values()] + ([run.vector] if run.vector else [])
        _on_main(dinfo, lambda: (lock.acquire(), clean_parts(finals)))
        try:
            return run.go(None if single else out)
        finally:
            lock.release()
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


class _Run:
    """One predict run on one rank: survey, shard, predict, assemble, mosaic, vectorise, report."""

    def __init__(self, s: PredictSettings, files: list[Path], plans: list[dict[str, Path]],
                 checkpoint: str | os.PathLike, dinfo: DistInfo, progress: bool, overwrite: bool,
                 keep_going: bool = False):
        self.s, self.files, self.plans, self.dinfo = s, files, plans, dinfo
        self.keep_going, self.failed = keep_going, {}  # failed: input index -> its error
        self.progress, self.overwrite = progress and dinfo.is_main, overwrite
        self.device = pick_device(s.device, dinfo.local_rank)
        self.ckpt_path = resolve_checkpoint(checkpoint)
        self.model, self.meta, s = load_network(self.ckpt_path, s, self.device)
        self.s = s
        self.predictor = StripPredictor(self.model, self.meta.mean, self.meta.std, s.tile, s.overlap, s.tta,
                                        s.batch, self.device, s.amp, boundary=s.boundary, probs=s.probs)
        self.vector: Path | None = None
        self.vector_ids: list[int] = []
        self.notes: list[str] = []

    def survey_inputs(self) -> None:
        """Read every input's header and find the outputs an identical earlier run completed."""
        self.t0 = time.time()
        self.ckpt_sha = file_sha256(self.ckpt_path)
        self.run_fp = run_fingerprint(self.ckpt_sha, self.s)
        self.survey = self._survey()

    def go(self, folder: Path | None) -> list[dict[str, Any]]:
        t0 = self.t0
        results = gather(self._work(), self.dinfo)
        for r in results:
            self.failed.update(r["failed"])
        summaries = self._collect(results)
        error = next((r["error"] for r in results if r["error"]), None)
        if error and len(self.files) > 1:
            done = sum(1 for s in summaries if "error" not in s)
            error += f"; {done} of {len(self.files)} files done (--keep-going skips bad files)"
        if not error:
            error = next((e for e in gather(self._assemble(results), self.dinfo) if e), None)
        if not error and self.dinfo.is_main:
            self._styles()
        if not error and self.vector is not None:
            error = self._vectorise()
        late = None  # rank 0's own error (mosaic, summary; a full disk): said once the others are done
        try:
            if not error and folder is not None and self.dinfo.is_main:
                self._mosaic(folder)
        except CmdbError as exc:
            late = str(exc)
        try:
            if folder is not None and self.dinfo.is_main and (summaries or not error):  # a run that made nothing
                self._write_summary(folder, summaries, error or late, time.time() - t0)
        except CmdbError as exc:
            late = late or str(exc)
        error = error or next((e for e in gather(late, self.dinfo) if e), None)  # before anyone releases the lock
        if error:
            raise CmdbError(error)
        for note in self.notes:
            warnings.warn(note, PredictNote, stacklevel=3)
        return summaries

    def _survey(self) -> list[tuple[Any, str, bool]]:
        """(InputInfo, fingerprint, complete) per input; ranks share the header reads."""
        mine: dict[int, tuple[Any, str, bool]] = {}
        error, failed = None, {}
        for i in range(self.dinfo.rank, len(self.files), self.dinfo.world_size):
            try:
                info = check_input(self.files[i], self.meta)
            except CmdbError as exc:
                if not self.keep_going:
                    error = (i, str(exc))
                    break
                failed[i], mine[i] = str(exc), (None, "", True)  # done: never scheduled
                continue
            fp = input_fingerprint(self.run_fp, self.files[i])
            done = not self.overwrite and all(output_complete(p, fp, info.width, info.height)
                                              for p in self.plans[i].values())
            mine[i] = (info, fp, done)
        results = gather({"items": mine, "error": error, "failed": failed}, self.dinfo)
        errors = sorted(r["error"] for r in results if r["error"])
        if errors:
            raise CmdbError(errors[0][1])
        merged: dict[int, tuple[Any, str, bool]] = {}
        for r in results:
            merged.update(r["items"])
            self.failed.update(r["failed"])
        return [merged[i] for i in range(len(self.files))]

    def _units(self) -> list[list[Unit]]:
        todo = [i for i, (_, _, done) in enumerate(self.survey) if not done]
        infos = [self.survey[i][0] for i in todo]
        rows = [self.predictor.grids(inf.height, inf.width)[0].count for inf in infos]
        units = make_units([inf.width * inf.height for inf in infos], rows, self.dinfo.world_size)
        return assign([replace(u, file=todo[u.file]) for u in units], self.dinfo.world_size)

    def _band(self, u: Unit) -> tuple[int, int, int, int]:
        info = self.survey[u.file][0]
        gy = self.predictor.grids(info.height, info.width)[0]
        spans = emitted_rows(gy)
        i0, i1 = u.rows
        return i0, i1, spans[i0][0], spans[i1 - 1][1]

    def _tags(self, i: int) -> dict[str, str]:
        return {"source": self.files[i].name, "checkpoint": self.ckpt_path.name, "software": "cmdbnet",
                "cmdb_fingerprint": self.survey[i][1]}

    def _work(self) -> dict[str, Any]:
        """Predict this rank's shard; stops at its first error, other ranks carry on."""
        self.shards = self._units()
        mine = self.shards[self.dinfo.rank]
        summaries, error, failed = [], None, {}
        total = sum(self.predictor.count_windows(self.survey[u.file][0].height, self.survey[u.file][0].width,
                                                 u.rows) for u in mine)
        if self.dinfo.is_main:
            self._announce()
        # each rank compiles its own copy, so its own share of windows must pay the compile back
        self.compiled = compile_predictor(self.predictor, total, self.meta.band_count, self.s.compile)
        with Progress(self.progress, total) as bar:
            for u in mine:
                info, plan = self.survey[u.file][0], self.plans[u.file]
                bar.file(info.path.name + (f" band {u.part + 1}/{u.parts}" if u.parts > 1 else ""))
                band = self._band(u) if u.parts > 1 else None
                out = band_paths(plan, u.part, u.parts) if band else plan
                try:
                    summary = predict_file(self.predictor, info, out, self.meta, self._tags(u.file), bar,
                                           self.s.cog, band)
                except CmdbError as exc:
                    if self.keep_going:
                        failed[u.file] = str(exc)
                        continue
                    error = str(exc)
                    break
                summaries.append({**summary, "file": u.file, "part": u.part, "parts": u.parts,
                                  "rank": self.dinfo.rank})
        return {"summaries": summaries, "error": error, "failed": failed}

    def _announce(self) -> None:
        """One line before a long run starts: how many windows and pixels lie ahead (all ranks)."""
        units = [u for shard in self.shards for u in shard]
        windows = sum(self.predictor.count_windows(self.survey[u.file][0].height, self.survey[u.file][0].width,
                                                   u.rows) for u in units)
        if windows < LARGE_RUN_WINDOWS:
            return
        files = {u.file for u in units}
        mpx = sum(self.survey[i][0].height * self.survey[i][0].width for i in files) / 1e6
        sys.stderr.write(f"cmdb: note: {windows:,} windows of {self.s.tile} x {self.s.tile} px to predict "
                         f"({mpx:,.1f} Mpx in {len(files)} file{'s' * (len(files) != 1)}, "
                         f"{self.dinfo.world_size} process{'es' * (self.dinfo.world_size != 1)})\n")
        sys.stderr.flush()

    def _collect(self, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One summary per input in input order: predicted (bands merged), skipped, or none if failed."""
        by_file: dict[int, list[dict[str, Any]]] = {}
        for r in results:
            for s in r["summaries"]:
                by_file.setdefault(s["file"], []).append(s)
        out = []
        for i, (info, _, done) in enumerate(self.survey):
            plan = self.plans[i]
            if i in self.failed:
                out.append({"input": str(self.files[i]), "error": self.failed[i]})
                continue
            if done:
                out.append({"input": str(self.files[i]), "outputs": {n: str(p) for n, p in plan.items()},
                            "width": info.width, "height": info.height, "skipped": True})
                continue
            parts = sorted(by_file.get(i, []), key=lambda s: s["part"])
            if not parts or len(parts) < parts[0]["parts"]:
                continue
            s = parts[0] if len(parts) == 1 else merge_band_summaries(parts, plan)
            s = finish_summary({k: v for k, v in s.items() if k not in ("file", "part", "parts")},
                               self.meta.classes)
            s.update(device=str(self.device), tile=self.s.tile, overlap=self.s.overlap, tta=self.s.tta,
                     batch=self.s.batch, amp=self.s.amp, checkpoint=str(self.ckpt_path), **self.compiled)
            out.append(s)
        return out

    def _assemble(self, results: list[dict[str, Any]]) -> str | None:
        """This rank's share of split rasters: copy their bands into the final products."""
        if any(r["error"] for r in results):
            return None
        split = sorted({s["file"] for r in results for s in r["summaries"]
                        if s["parts"] > 1 and s["file"] not in self.failed})
        for k, i in enumerate(split):
            if k % self.dinfo.world_size != self.dinfo.rank:
                continue
            units = sorted((u for shard in self.shards for u in shard if u.file == i), key=lambda u: u.part)
            parts = [(*self._band(u)[2:], band_paths(self.plans[i], u.part, u.parts)) for u in units]
            try:
                assemble(self.predictor, self.survey[i][0], self.plans[i], self.meta, self._tags(i), parts,
                         self.s.cog)
            except CmdbError as exc:
                return str(exc)
        return None

    def _vectorise(self) -> str | None:
        """Each rank traces its share of masks into a part; rank 0 merges them into one GeoPackage."""
        assert self.vector is not None
        world, rank = self.dinfo.world_size, self.dinfo.rank
        ok = [i for i in range(len(self.files)) if i not in self.failed]
        if not ok:
            return None
        shards = assign([Unit(i, 0, 1, None, self.survey[i][0].width * self.survey[i][0].height) for i in ok],
                        world)
        part = self.vector.parent / f".{self.vector.name}.rank{rank}.part.gpkg"
        sets, notes, error, ref_crs = [], [], None, None
        try:
            ref = reference_crs([self.plans[i]["mask"] for i in ok])  # the mosaic's rule too
            ref_crs = ref.to_wkt() if ref else None
            for u in shards[rank]:
                p = polygonise(self.plans[u.file]["mask"], self.vector_ids, self.meta.classes)
                if not same_crs(p["crs"], ref):
                    notes.append(f"--vector: {self.plans[u.file]['mask'].name} is "
                                 f"{'without a CRS' if p['crs'] is None else 'in another CRS'}, not in "
                                 f"{ref.to_string()} (the CRS of most masks); its polygons are left out of "
                                 f"{self.vector.name}")
                    continue
                sets.append(p)
            part.parent.mkdir(parents=True, exist_ok=True)
            part.unlink(missing_ok=True)
            write_polygons(part, sets, ref_crs)
        except (CmdbError, OSError) as exc:
            error = str(exc)
        results = gather({"part": str(part), "notes": notes, "error": error}, self.dinfo)
        error = next((r["error"] for r in results if r["error"]), None)
        if self.dinfo.is_main:
            try:
                if not error:
                    self.polygons = merge_polygon_parts([Path(r["part"]) for r in results], self.vector, ref_crs)
                    self.notes += [n for r in results for n in r["notes"]]
            except CmdbError as exc:
                error = str(exc)
            finally:
                for r in results:
                    Path(r["part"]).unlink(missing_ok=True)
        return gather(error, self.dinfo)[0]

    def _mosaic(self, folder: Path) -> None:
        product = "mask" if "mask" in self.plans[0] else "color"
        paths = [p[product] for p in self.plans if p[product].is_file()]
        self.vrt, notes = write_vrt(paths, folder / MOSAIC_NAME, self.meta.classes if product == "mask" else ())
        self.notes += notes
        if self.vrt and product == "mask":
            self._style(self.vrt)

    def _styles(self) -> None:
        """A QGIS style (``<mask>.qml``) beside every class mask this run wrote (a skipped mask's
        style may hold the user's edits): class names and colours in its legend."""
        for i, plan in enumerate(self.plans):
            mask = plan.get("mask")
            if mask is None or i in self.failed or not mask.is_file():
                continue
            if not (self.survey[i][2] and style_path(mask).is_file()):
                self._style(mask)

    def _style(self, raster: Path) -> None:
        try:
            write_style(raster, self.meta.classes, self.meta.palette)
        except (CmdbError, OSError) as exc:  # the masks are whole; a missing style is worth a note only
            self.notes.append(f"cannot write the QGIS style beside {raster.name}: {exc}")

    def _map_crs(self) -> str | None:
        """The CRS of the mosaic and the GeoPackage: the one most masks share."""
        product = "mask" if "mask" in self.plans[0] else "color"
        crs = reference_crs([p[product] for p in self.plans if p[product].is_file()])
        return crs.to_string() if crs else None

    def _write_summary(self, folder: Path, summaries: list[dict[str, Any]], error: str | None,
                       seconds: float) -> None:
        report = {
            "checkpoint": str(self.ckpt_path), "checkpoint_sha256": self.ckpt_sha,
            "settings": self.s.model_dump(mode="json"), "ranks": self.dinfo.world_size,
            "seconds": round(seconds, 3), "error": error,
            "inputs": [str(f) for f in self.files],
            "outputs": [o for s in summaries for o in s.get("outputs", {}).values()],
            "skipped": sum(1 for s in summaries if s.get("skipped")),
            "failed": [s for s in summaries if "error" in s],
            "mosaic": str(getattr(self, "vrt", None) or "") or None,
            "crs": self._map_crs(),
            "vector": str(self.vector) if self.vector and not error else None,
            "polygons": getattr(self, "polygons", None),
            "notes": self.notes, "files": summaries,
        }
        write_text_atomic(folder / SUMMARY_NAME, json.dumps(report, indent=2, default=str) + "\n")
