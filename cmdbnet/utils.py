"""Small helpers shared across layers (no torch-model or dataset knowledge here)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cmdbnet.errors import CmdbError


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``final`` and rename it over ``final`` on success.

    Why: a crash, Ctrl-C or full disk must never leave a half-written crop, manifest,
    checkpoint or mask that a later run would trust. The temporary file lives in the same
    folder so the final ``os.replace`` is atomic on every platform.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CmdbError(f"cannot create folder {final.parent}: {exc.strerror or exc}") from None
    sfx = suffix if suffix is not None else "".join(final.suffixes[-1:])
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".part{sfx}", dir=final.parent)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(final, exc.strerror) from None
        raise CmdbError(f"cannot write in {final.parent}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; give the result the permissions a plain open() would
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        full = disk_full_cause(exc)
        if full is not None:
            raise disk_full_error(final, full.strerror) from None
        raise


def broken_link(path: Path) -> str:
    """``""``, or why ``path`` is a symbolic link that leads to no file (dangling, or a loop).

    Why: a folder listing skips such an entry as "not a file"; the user must hear that an input
    they linked in was left out.
    """
    if not path.is_symlink():
        return ""
    try:
        path.stat()
    except FileNotFoundError:
        return f"{path} is a symbolic link to {os.readlink(path)}, which does not exist; skipped"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path} is a symbolic link loop; skipped"
        return f"{path} is a symbolic link that cannot be followed ({exc.strerror}); skipped"
    return ""
# "no space left", "file too large" (a file size limit such as ulimit -f), "quota exceeded"
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def disk_full_cause(exc: BaseException | None) -> OSError | None:
    """The disk-full OSError behind ``exc``, if any: libraries (torch.save) wrap it in their own error."""
    seen = 0
    if isinstance(exc, CmdbError):  # already said in one line
        return None
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def disk_full_error(path: str | os.PathLike, why: str | None) -> CmdbError:
    """The one line for a write that ran out of space; nothing is left under ``path``'s name."""
    return CmdbError(f"disk full writing {path} ({why or 'no space left'}): free some space (or raise the file "
                     "size limit) and run the same command again")


def write_failure(folder: str | os.PathLike, nbytes: int) -> OSError | None:
    """Why writing ``nbytes`` into ``folder`` fails now (a full disk, a size limit), or None if it does not.

    For libraries that report a failed write without its cause (GDAL): try the same amount.
    """
    try:
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(bytes(max(1, nbytes)))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return exc
    return None


def check_output_file(path: str | os.PathLike, option: str, overwrite: bool = False,
                      ours: tuple[str, ...] = ()) -> Path:
    """Refuse, before any work, an output that is a folder, cannot be made, or is someone else's file.

    An existing file is replaced only with ``overwrite`` or when it is a JSON object holding every
    key of ``ours`` (an earlier result of the same command); anything else may be the user's data.
    """
    p = Path(path)
    if p.is_dir():
        raise CmdbError(f"{option} {p} is a folder; name a file (e.g. {p / 'scores.json'})")
    if p.exists() and not overwrite and not (ours and _json_with(p, ours)):
        raise CmdbError(f"{option} {p} already exists and is not a result of this command; choose another name, "
                        "or pass --overwrite to replace it")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CmdbError(f"{option} {p}: cannot write in {parent}" + ("" if parent.is_dir() else " (a file)"))
    return p


def _json_with(path: Path, keys: tuple[str, ...]) -> bool:
    try:
        if path.stat().st_size > 16 << 20:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(k in data for k in keys)


def remove_partial_files(folder: Path, name: str = "*") -> int:
    """Delete the temporary files :func:`atomic_path` left in ``folder`` for final ``name`` (any
    name by default) when a process died before its rename; return how many."""
    removed = 0
    for stale in folder.glob(f".{name}.*.part*") if folder.is_dir() else ():
        with contextlib.suppress(OSError):
            stale.unlink()
            removed += 1
    return removed


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a small text file (manifest, settings) so readers never see half of it."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def parse_bytes(text: str | int | float) -> int:
    """Parse sizes such as ``6GB``, ``5.5GiB``, ``800MB`` or a plain byte count.

    GB and GiB are both read as 2**30 bytes: cards are sold as "6 GB" and hold 6 GiB.
    """
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().lower().replace(" ", "")
    units = {"tib": 2**40, "tb": 2**40, "t": 2**40, "gib": 2**30, "gb": 2**30, "g": 2**30,
             "mib": 2**20, "mb": 2**20, "m": 2**20, "kib": 2**10, "kb": 2**10, "k": 2**10, "b": 1}
    for unit, factor in units.items():  # noqa: B007 - factor is read after the loop
        if s.endswith(unit):
            number = s[: -len(unit)]
            break
    else:
        number, factor = s, 1
    try:
        value = float(number)
    except ValueError:
        raise CmdbError(f"cannot read {text!r} as a size; write it like 6GB or 800MB") from None
    if not math.isfinite(value):
        raise CmdbError(f"size must be a finite number of bytes, got {text!r}; write it like 6GB or 800MB")
    if value <= 0:
        raise CmdbError(f"size must be positive, got {text!r}")
    return int(value * factor)


def format_bytes(n: float) -> str:
    """Human size in binary units, as nvidia-smi and torch report memory."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux/macOS), for benchmarks and CPU logging."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# mallopt parameters (glibc's malloc.h) and the largest mmap threshold glibc accepts
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX = -1, -3, 32 << 20


@functools.cache
def reuse_freed_memory() -> bool:
    """Let glibc's malloc keep freed tensor memory for reuse instead of returning it to the kernel.

    By default a MiB-sized tensor is a fresh mmap whose every page the kernel zero-fills on
    first touch; a network with many such activations per step spends a measurable share of its
    CPU time there. With the mmap threshold at its 32 MiB maximum and
    no trimming, freed blocks are reused: the peak is the same, memory is just not handed
    back between peaks. Process-wide, so the CLI calls it, not the library. False off glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def file_sha256(path: Path, chunk: int = 2**20) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints and weights are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@functools.cache
def quiet_libtiff() -> bool:
    """Stop libtiff printing its own errors (``_tiffWriteProc: File too large.``) straight to stderr.

    Why: GDAL reports the same failure to the caller, who prints one ``cmdb: error:`` line; the
    raw line before it comes from libtiff's process-wide default handler, which GDAL's error
    handling and ``CPL_LOG`` do not reach. Call after rasterio is imported; False where no
    libtiff is loaded.
    """
    try:
        with open("/proc/self/maps") as maps:
            path = next((line.split()[-1] for line in maps if "libtiff" in line.rsplit("/", 1)[-1]), None)
    except OSError:
        return False
    try:
        setter = ctypes.CDLL(path).TIFFSetErrorHandler if path else None
    except (OSError, AttributeError):
        return False
    if setter is None:
        return False
    setter.restype, setter.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    setter(None)
    return True


def callable_package(name: str, fn) -> None:
    """Make package ``name`` callable as ``fn``: ``cmdbnet.export(...)`` and ``cmdbnet.ablation(...)``
    mirror their commands although the name is also the package's (whose import would shadow a
    plain function of that name on ``cmdbnet``)."""
    import sys
    import types

    class _Callable(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return fn(*args, **kwargs)

    sys.modules[name].__class__ = _Callable
