"""Build the C library (scan and depthwise sources) into a private cache, and check a cached file before it is loaded.

Why: loading a shared library runs its code (its constructors), so a file another local user
could plant or change must never be loaded, and a truncated, stale or corrupt file must be
rebuilt rather than crash the process (SIGBUS inside ``dlopen``) or be taken for a compiler
without OpenMP. As compiler caches do, a folder is used only when this user owns it and
neither group nor others may write it (created 0700 whatever the umask; no ancestor that others
may write without the sticky bit); otherwise one warning, and the build goes to a fresh private
folder. Each library has a build record beside it (``<name>.json``, 0600: its sha256, the
sources' key, the symbols it exports), written after a successful build and checked before the
library is loaded; a mismatch rebuilds it. The compiler runs in its own process group, killed
whole on timeout; temporary files of a killed build are removed once they are old.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

from cmdbnet.errors import CmdbError
from cmdbnet.utils import atomic_path, file_sha256

__all__ = ["CACHE_ENV", "SYMBOLS", "TUNINGS", "SERIAL_TUNINGS", "CacheError", "CompileError", "NoCompilerError",
           "compiler", "library_file"]

CACHE_ENV = "CMDB_CACHE_DIR"
_HERE = Path(__file__).parent
# The library's sources: the per-sequence scan, SS2D's plane scan and the depthwise convolution
# (cmdbnet/models/depthwise.py); the headers are part of the cache key.
_SOURCES = (_HERE / "native.c", _HERE / "plane.c", _HERE.parent / "depthwise.c")
_HEADERS = (_HERE / "parallel.h", _HERE / "vmath.h")
# -march=native: the library is built on the machine that runs it (the cache key holds the
# CPU's flags). -fopenmp: the C loops run on torch's OpenMP threads (parallel.h says why). A
# compiler that knows neither flag gets the later sets. No -ffast-math: it would let the compiler
# assume no NaN or inf.
_FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared")
TUNINGS = (("-march=native", "-fopenmp"), ("-fopenmp",), ("-march=native",), ())
SERIAL_TUNINGS = tuple(t for t in TUNINGS if "-fopenmp" not in t)
SYMBOLS = ("cmdb_openmp", "cmdb_xscan_lanes", "cmdb_set_threads", "cmdb_scan_fwd", "cmdb_scan_bwd", "cmdb_xscan_fwd",
           "cmdb_xscan_bwd", "cmdb_dw3x3_fwd", "cmdb_dw3x3_bwd_input", "cmdb_dw3x3_bwd_weight")
_RECORD_FORMAT = 1
COMPILE_TIMEOUT = 120.0  # seconds per compiler run
STALE_PART_AGE = 15 * 60.0  # seconds after which a build's temporary file is a dead build's


class NoCompilerError(OSError):
    """No C compiler runs here: the user installs one or sets CC."""


class CompileError(OSError):
    """The compiler ran and refused the source, or hung: another folder would not help."""


class CacheError(OSError):
    """No folder this user alone controls can hold the library."""


def compiler() -> list[str]:
    """``$CC`` (or ``cc``) as an argument list: ``CC="gcc -std=gnu11"`` is a compiler and a flag."""
    text = os.environ.get("CC") or "cc"
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise NoCompilerError(f"CC={text!r} cannot be read as a command ({exc})") from None
    path = shutil.which(argv[0]) if argv else None
    if path is None:
        raise NoCompilerError(f"no C compiler found ({argv[0] if argv else text!r} is not on PATH; "
                              f"install a C compiler or set CC)")
    return [path, *argv[1:]]


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run the compiler in its own process group; on timeout kill the group (a driver's children too)."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            stream.close()
        raise CompileError(f"{Path(argv[0]).name} did not finish within {timeout:g} s; stopped it and its "
                           f"children") from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _cpu_signature() -> str:
    """The CPU's instruction-set flags (a cache shared over NFS must not hand AVX-512 code to an
    older node)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _key(cc: list[str], tunings: tuple[tuple[str, ...], ...]) -> str:
    """The sources, flags, compiler (with its own flags and version) and CPU, hashed."""
    version = _run([*cc, "--version"], 30).stdout
    texts = [src.read_text() for src in _SOURCES + _HEADERS]
    parts = [*texts, *_FLAGS, repr(tunings), shlex.join(cc[1:]), version, _cpu_signature()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _note(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else -1


def _user_cache() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                     "cmdbnet")
    return Path(root) / "kernels"


def _temp_root() -> Path:
    """``$TMPDIR`` as set (never another folder in its place when it is unwritable), else the system's."""
    return Path(os.environ.get("TMPDIR") or tempfile.gettempdir())


def _make_private(folder: Path) -> None:
    """Create ``folder`` and its missing parents 0700 (whatever the umask)."""
    missing = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile: checked later
            os.mkdir(p, 0o700)
            os.chmod(p, 0o700)


def _unsafe(folder: Path) -> str:
    """Why another local user could change what ``folder`` holds, or ``""``."""
    if _uid() < 0:
        return ""
    real = Path(os.path.realpath(folder))
    st = os.stat(real)
    if not stat.S_ISDIR(st.st_mode):
        return f"{folder} is not a folder"
    if st.st_uid != _uid():
        return f"{folder} belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return f"{folder} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    for parent in real.parents:  # whoever may rename an ancestor may swap the folder
        st = os.stat(parent)
        others = st.st_mode & 0o002 or (st.st_mode & 0o020 and st.st_gid != os.getgid())
        if others and not st.st_mode & stat.S_ISVTX:
            return f"{parent} (above {folder}) is writable by others"
    return ""


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _record(key: str, digest: str) -> dict:
    return {"format": _RECORD_FORMAT, "sources": key, "sha256": digest, "symbols": list(SYMBOLS)}


def _private_file(path: Path) -> str:
    """Why ``path`` is not a regular file of this user's that only they may write, or ``""``."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if _uid() >= 0 and st.st_uid != _uid():
        return f"belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return ""


def _invalid(path: Path, key: str) -> str:
    """Why the cached library at ``path`` must not be loaded (``"missing"`` when absent), or ``""``."""
    if not os.path.lexists(path):
        return "missing"
    record = _record_path(path)
    why = _private_file(path) or (_private_file(record) if os.path.lexists(record) else "has no build record")
    if why:
        return why
    try:
        meta = json.loads(record.read_text())
    except (OSError, ValueError):
        return "has an unreadable build record"
    if not isinstance(meta, dict) or {k: v for k, v in meta.items() if k != "sha256"} != {
            k: v for k, v in _record(key, "").items() if k != "sha256"}:
        return "was built from other sources (a stale build record)"
    if file_sha256(path) != meta.get("sha256"):
        return "is damaged (its sha256 differs from the one recorded at build time)"
    return ""


def _remove_stale_parts(folder: Path) -> None:
    """Remove temporary files of builds that died (killed before their rename) and are old."""
    now = time.time()
    for part in folder.glob(".scan-*.part*"):
        with contextlib.suppress(OSError):
            if now - part.lstat().st_mtime > STALE_PART_AGE:
                part.unlink()


def _build(cc: list[str], dst: Path, tunings: tuple[tuple[str, ...], ...], key: str) -> None:
    """Compile with the first of ``tunings`` the compiler accepts to a temporary name beside
    ``dst``, made 0700 and renamed onto it, then write its build record (0600)."""
    with atomic_path(dst, suffix="") as tmp:
        for tuning in tunings:
            proc = _run([*cc, *_FLAGS, *tuning, *map(str, _SOURCES), "-o", str(tmp), "-lm"], COMPILE_TIMEOUT)
            if not proc.returncode:
                break
        else:
            raise CompileError(f"{Path(cc[0]).name} failed to compile the CPU scan: {proc.stderr.strip()[:300]}")
        os.chmod(tmp, 0o700)  # the linker creates its output with the umask's bits
        digest = file_sha256(tmp)
    with atomic_path(_record_path(dst)) as tmp:
        tmp.write_text(json.dumps(_record(key, digest)))
        os.chmod(tmp, 0o600)


def _fresh_folder() -> Path:
    """A new private folder under the temporary root, removed at exit (the library stays mapped)."""
    folder = Path(tempfile.mkdtemp(prefix="cmdbnet-kernels-", dir=_temp_root()))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def library_file(cc: list[str], tunings: tuple[tuple[str, ...], ...] = TUNINGS) -> Path:
    """A checked library for these sources, flags, compiler and CPU: from the user cache (or the
    per-user temporary folder where the cache cannot be written), rebuilt when its check fails."""
    key = _key(cc, tunings)
    name = f"scan-{key[:16]}.so"
    problems = []
    for folder in (_user_cache(), _temp_root() / f"cmdbnet-kernels-{_uid()}"):
        try:
            _make_private(folder)
            unsafe = _unsafe(folder)
        except OSError as exc:
            problems.append(f"{folder} cannot be created ({exc.strerror or exc})")
            continue
        if unsafe:
            try:
                fresh = _fresh_folder()
                again = _unsafe(fresh)
            except OSError as exc:
                again = exc.strerror or str(exc)
            if again:
                raise CacheError(f"{unsafe}, and no private folder can be made in {_temp_root()} ({again})")
            _note(f"not loading or building the C library in {folder}: {unsafe}; building it in {fresh}")
            _build(cc, fresh / name, tunings, key)
            return fresh / name
        path = folder / name
        _remove_stale_parts(folder)
        why = _invalid(path, key)
        if not why:
            return path
        if not os.access(folder, os.W_OK):
            problems.append(f"{folder} is read-only")
            continue
        try:
            _build(cc, path, tunings, key)
        except CmdbError as exc:  # the folder cannot be written (full disk, read-only file system)
            problems.append(str(exc))
            continue
        if why != "missing":
            _note(f"the cached C library {path} {why}; rebuilt it")
        return path
    raise CacheError(f"cannot store the C library: {'; '.join(problems)}")
