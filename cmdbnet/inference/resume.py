"""What makes a folder run safe to kill and re-run: a run lock, fingerprints, completeness checks.

Why: a city is thousands of tiles and a job that dies must lose only the files in flight.
Outputs are renamed into place only when whole (``utils.atomic_path``), and every product
carries a ``cmdb_fingerprint`` tag (checkpoint hash, the settings that change pixels, the
input's size, mtime, ctime and inode: :func:`input_fingerprint`). A re-run skips an input
only when every one of its products opens, carries the same fingerprint, has the input's size
and all its blocks lie inside the file; anything else (truncated, another checkpoint, other
settings) is predicted again.

One run per output folder: a lock file holding the first run's pid, host and start time
refuses a second run; a lock left by a dead process on this host is taken over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import rasterio
from rasterio.errors import RasterioError

from cmdbnet.errors import CmdbError
from cmdbnet.inference.rasters import quiet_georef
from cmdbnet.settings import PredictSettings

LOCK_NAME = ".cmdb-predict.lock"
FINGERPRINT_TAG = "cmdb_fingerprint"
# settings that change the pixels written; device, batch and progress do not
PIXEL_SETTINGS = ("tile", "overlap", "tta", "amp", "format", "probs", "boundary", "cog")


def run_fingerprint(ckpt_sha256: str, s: PredictSettings) -> str:
    """Hash of what decides the pixels of every output of a run (per-input parts added later)."""
    dumped = s.model_dump(mode="json")
    picked = {k: dumped[k] for k in PIXEL_SETTINGS if k in dumped}
    return hashlib.sha256(json.dumps([ckpt_sha256, picked], sort_keys=True).encode()).hexdigest()[:24]


def input_fingerprint(run_fp: str, path: Path) -> str:
    """``run_fp`` plus the input's size, mtime, ctime and inode: any write to its pixels changes it.

    Why not a hash of the pixels: it would read every input in full on every run and resume.
    The kernel sets ctime on every write, rename or chmod and no tool can set it back (mtime can
    be, by ``touch -d`` or a copy that keeps times), so an input edited in place or replaced is
    predicted again; the cost is a false alarm: a copied, moved or chmod-ed input is predicted again.
    """
    st = path.stat()
    ident = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
    return hashlib.sha256(f"{run_fp}:{ident}".encode()).hexdigest()[:24]


def output_complete(path: Path, fingerprint: str, width: int, height: int) -> bool:
    """True when ``path`` is a whole product of this run for this input (see module doc)."""
    if not path.is_file():
        return False
    try:
        with quiet_georef(), rasterio.open(path) as src:
            if src.tags().get(FINGERPRINT_TAG) != fingerprint or (src.width, src.height) != (width, height):
                return False
    except (RasterioError, OSError):
        return False
    return blocks_intact(path)


def blocks_intact(path: Path) -> bool:
    """Every block of every band lies inside the file and the last one decodes.

    Also the check after writing: GDAL reports some write failures (a full disk at the
    final flush) only in its log, so a product is checked before it is renamed into place.
    """
    try:
        size = path.stat().st_size
        with quiet_georef(), rasterio.open(path) as src:
            for bidx in src.indexes:
                last = None
                for (row, col), win in src.block_windows(bidx):
                    off = src.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=bidx)
                    n = src.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=bidx)
                    if not off or not n or int(off) + int(n) > size:
                        return False
                    last = win
                if last is not None:
                    src.read(bidx, window=last)
    except (RasterioError, OSError, ValueError):
        return False
    return True


def clean_parts(finals: list[Path]) -> int:
    """Remove temporary files a killed run left beside ``finals`` (only under the run lock).

    Only this run's own leftovers: ``.<final name>.*.part*`` (``utils.atomic_path``, COG
    intermediates, GeoPackage parts) and ``.<stem>.band*.part.tif`` (band parts, and their
own temporary files, which start with two dots); another
    program's temporary files in the same folder are left alone.
    """
    by_folder: dict[Path, list[str]] = {}
    for f in finals:
        by_folder.setdefault(f.parent, []).extend([f".{f.name}.", f".{f.stem}.band", f"..{f.stem}.band"])
    removed = 0
    for folder, prefixes in by_folder.items():
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith(".") and ".part" in p.name and p.name.startswith(tuple(prefixes)):
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed += 1
    return removed


def lock_path(out: Path, single_file: bool) -> Path:
    return out.parent / f".{out.name}.cmdb-lock" if single_file else out / LOCK_NAME


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock file (``O_EXCL``) naming this run's pid and host; see module doc."""

    def __init__(self, path: Path, target: Path):
        self.path, self.target, self.held = path, target, False
        self.made_folder = False  # a run that fails before writing leaves no empty folder behind

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        try:
            self.made_folder = not self.path.parent.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CmdbError(f"cannot create output folder {self.path.parent}: {exc.strerror or exc}") from None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                h = self._holder()
                stale = h.get("host") == socket.gethostname() and isinstance(h.get("pid"), int) \
                    and not _pid_alive(h["pid"])
                if stale:
                    with contextlib.suppress(OSError):
                        self.path.unlink()
                    continue
                raise CmdbError(f"another cmdb predict (pid {h.get('pid', '?')} on {h.get('host', '?')}, started "
                                f"{h.get('started', '?')}) is writing to {self.target}; wait for it to end, or "
                                f"delete {self.path} if that run is dead") from None
            except OSError as exc:
                raise CmdbError(f"cannot create lock {self.path}: {exc.strerror or exc}") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, f)
            self.held = True
            return
        raise CmdbError(f"cannot take the lock {self.path}; delete it if no run is writing to {self.target}")

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(OSError):
                self.path.unlink()
            if self.made_folder:
                with contextlib.suppress(OSError):
                    self.path.parent.rmdir()  # only if the run wrote nothing there
            self.held = False
