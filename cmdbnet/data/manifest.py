"""The prepared folder as a contract: its layout, its manifest, and the per-tile done markers.

Why a module of its own: ``prepare`` writes these files and the Dataset, the trainer and
``evaluate`` read them; keeping both sides here keeps them in step.

    OUT/{split}/images/<stem>.tif, OUT/{split}/labels/<stem>.tif   one pair per crop
    OUT/manifest.json        what was cut, from what (sha256), how, class pixel counts
    OUT/.cmdb-done/<key>.json  a tile finished by an earlier run, with the source stats it saw
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cmdbnet.data.raw import RasterInfo, RawScan, RawTile
from cmdbnet.data.registry import BandChoice, DatasetSpec
from cmdbnet.errors import CmdbError
from cmdbnet.utils import write_text_atomic

MANIFEST = "manifest.json"
FORMAT = "cmdbnet-prepared"
VERSION = 1
DONE_DIR = ".cmdb-done"
SPLIT_ORDER = ("train", "val", "test")


class ManifestSchema(BaseModel):
    """What readers rely on in manifest.json; other keys are kept as they are."""

    model_config = ConfigDict(extra="allow")

    format: str
    version: int = Field(ge=1)
    dataset: str
    classes: list[str] = Field(min_length=1, max_length=254)
    palette: list[tuple[int, int, int]]
    ignore_index: int = Field(ge=0, le=255)
    crop: int = Field(ge=1)
    band_count: int = Field(ge=1)
    dtype: str
    splits: dict[str, dict[str, int]]
    crops: dict[str, list[str]]
    mean: list[float] | None = None  # per-band statistics of non-8-bit data
    std: list[float] | None = None


def _schema_error(path: Path, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        got = err.get("input")
        shown = "" if isinstance(got, (dict, list)) or err.get("type") == "missing" else f" (got {got!r})"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}{shown}")
    return f"not a prepared folder: {path}: " + "; ".join(parts)


def crop_paths(out: Path, split: str, stem: str) -> tuple[Path, Path]:
    """(image, label) files of one crop."""
    return out / split / "images" / f"{stem}.tif", out / split / "labels" / f"{stem}.tif"


def run_params(dataset: str, crop: int, stride: int, bands: str, eroded: bool) -> dict[str, Any]:
    """The settings a prepared folder is tied to: a re-run with others must not mix into it."""
    return {"dataset": dataset, "crop": crop, "stride": stride, "bands": bands, "eroded": eroded}


def _stat(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _marker_path(out: Path, key: str) -> Path:
    return out / DONE_DIR / f"{key}.json"


def finished_record(out: Path, tile: RawTile, params: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a tile done by an earlier run, if its sources, settings and crops still match.

    Sources are compared by size and mtime (as make does): hashing every source on each
    re-run would cost as much reading as cutting it again.
    """
    try:
        marker = json.loads(_marker_path(out, tile.key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    record = marker.get("record", {})
    if (marker.get("params") != params or record.get("split") != tile.split
            or marker.get("sources") != [_stat(tile.image), _stat(tile.label)]):
        return None
    for stem in record.get("crops", []):
        if not all(p.is_file() for p in crop_paths(out, tile.split, stem)):
            return None
    return record


def mark_done(out: Path, tile: RawTile, params: dict[str, Any], record: dict[str, Any]) -> None:
    marker = {"params": params, "sources": [_stat(tile.image), _stat(tile.label)], "record": record}
    write_text_atomic(_marker_path(out, tile.key), json.dumps(marker))


def check_out(out: Path, root: Path, params: dict[str, Any]) -> None:
    """Refuse an output folder that cannot be written or was prepared with other settings."""
    if out.resolve() == root.resolve():
        raise CmdbError(f"the output folder must differ from the raw folder: {out}")
    if out.exists() and not out.is_dir():
        raise CmdbError(f"output is not a folder: {out}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CmdbError(f"cannot write to output folder {out}: {exc.strerror or exc}") from None
    if (out / MANIFEST).is_file():
        try:
            old = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        except ValueError:
            return  # a damaged manifest is rebuilt from the done markers
        old_params = {k: old.get(k) for k in params}
        if old_params != params:
            diff = ", ".join(f"{k} {old_params[k]!r} (now {params[k]!r})" for k in params if old_params[k] != params[k])
            raise CmdbError(f"{out} was prepared with other settings: {diff}; choose another --out or delete it")


def build_manifest(spec: DatasetSpec, band: BandChoice, params: dict[str, Any], scan: RawScan,
                   infos: list[RasterInfo], records: list[dict], root: Path, edge_rule: str) -> dict[str, Any]:
    """The manifest from the tile records; no timestamps, so an unchanged re-run rewrites nothing."""
    splits = sorted({r["split"] for r in records}, key=lambda s: (SPLIT_ORDER + (s,)).index(s))
    per_split: dict[str, Any] = {}
    pixels: dict[str, Any] = {}
    crops: dict[str, list[str]] = {}
    for split in splits:
        rs = [r for r in records if r["split"] == split]
        per_split[split] = {"tiles": len(rs), "crops": sum(len(r["crops"]) for r in rs)}
        counts = np.sum([r["class_pixels"] for r in rs], axis=0).tolist()
        pixels[split] = {**dict(zip(spec.classes, counts)), "ignored": sum(r["ignored"] for r in rs)}
        crops[split] = sorted(s for r in rs for s in r["crops"])
    return {
        "format": FORMAT, "version": VERSION, **params,
        "title": spec.title, "classes": list(spec.classes), "palette": [list(c) for c in spec.palette],
        "ignore_index": spec.ignore_index, "num_classes": spec.num_classes,
        "excluded_in_means": list(spec.excluded_in_means),
        "band_names": list(band.band_names), "band_count": infos[0].count, "dtype": infos[0].dtype,
        "georeferenced": all(i.georeferenced for i in infos), "crs": infos[0].crs,
        "root": str(root.resolve()), "layout": scan.layout, "edge_rule": edge_rule,
        "split_policy": {"policy": scan.split_policy, "val_tiles": list(spec.val_tiles),
                         "unlisted_in_train": [r["tile_id"] for r in records if not r["listed"]]},
        "notes": list(scan.notes),
        "splits": per_split, "class_pixels": pixels,
        "sources": [{k: r[k] for k in ("key", "tile_id", "split", "image", "label", "height", "width")}
                    | {"crops": len(r["crops"])} | ({"window": list(r["window"])} if r.get("window") else {})
                    for r in records],
        "crops": crops,
    }


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Write OUT/manifest.json atomically, and only when its content changed (mtimes stay put)."""
    text = json.dumps(manifest, indent=1) + "\n"
    path = out / MANIFEST
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_text_atomic(path, text)


def read_manifest(prepared_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a prepared folder, or one clear error saying to run ``cmdb prepare``."""
    path = Path(prepared_dir) / MANIFEST
    hint = "run cmdb prepare"
    if not path.is_file():
        raise CmdbError(f"not a prepared folder: {prepared_dir} has no {MANIFEST}: {hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CmdbError(f"not a prepared folder: {path} is not valid JSON ({exc}): {hint}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CmdbError(f"not a prepared folder: {path} is not a cmdbnet manifest: {hint}")
    try:
        checked = ManifestSchema.model_validate(manifest)
    except ValidationError as exc:
        raise CmdbError(f"{_schema_error(path, exc)}: {hint} again") from None
    if len(checked.palette) != len(checked.classes):
        raise CmdbError(f"not a prepared folder: {path}: palette has {len(checked.palette)} colours for "
                        f"{len(checked.classes)} classes: {hint} again")
    return {**manifest, **checked.model_dump(exclude_unset=True, exclude={"palette"})}
