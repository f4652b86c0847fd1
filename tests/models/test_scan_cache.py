"""The C library's cache: nothing another user could plant or change is loaded, and a truncated,
stale or corrupt library, a hanging compiler, a dead build's leftovers, a compiler with flags and
a cache nobody can write each end in a rebuild or one clear message.

A fake compiler copies the library this process already built (fast); the planted libraries are
real ones, built here, whose constructor writes a marker file when loaded.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
import warnings
from pathlib import Path

import pytest

from cmdbnet.models import scan
from cmdbnet.models.scan import build, dispatch, native
from cmdbnet.utils import file_sha256

_PLANTED = """#include <stdio.h>
__attribute__((constructor)) static void plant(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("planted code ran", f); fclose(f); }
}
""" + "".join(f"int {name}(void) {{ return 0; }}\n" for name in build.SYMBOLS)


@pytest.fixture(scope="module")
def real_library() -> Path:
    path = native.library_path()
    if path is None:
        pytest.skip(f"no C library here: {native.library_error()}")
    return Path(path)


@pytest.fixture
def cache(monkeypatch, tmp_path, real_library):
    """A private cache and temporary root, a fake compiler that copies the real library (its runs
    logged), and no memory of earlier loads; the process's own library afterwards."""
    log = tmp_path / "cc.log"
    cc = tmp_path / "fake-cc"
    cc.write_text(f'#!/bin/sh\nfor a; do [ "$a" = --version ] && {{ echo "fake-cc 1"; exit 0; }}; done\n'
                  f'echo "$*" >> {log}\nout=; prev=\nfor a; do [ "$prev" = -o ] && out=$a; prev=$a; done\n'
                  f'cp {real_library} "$out"\n')
    cc.chmod(0o755)
    (tmp_path / "tmp").mkdir(mode=0o700)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(scan.BACKEND_ENV, raising=False)
    native._load.cache_clear()
    dispatch._native_or_torch.cache_clear()
    yield tmp_path
    native._load.cache_clear()
    dispatch._native_or_torch.cache_clear()


def _builds(tmp_path: Path) -> list[str]:
    log = tmp_path / "cc.log"
    return log.read_text().splitlines() if log.exists() else []


def _library_name() -> str:
    return f"scan-{build._key(build.compiler(), build.TUNINGS)[:16]}.so"


def _plant(folder: Path, marker: Path, *, record: bool = True) -> Path:
    """A library under the name cmdb would load, with a build record that matches it."""
    folder.mkdir(parents=True, exist_ok=True)
    src = folder.parent / "planted.c"
    src.write_text(_PLANTED)
    path = folder / _library_name()
    subprocess.run(["cc", "-shared", "-fPIC", f'-DMARKER="{marker}"', str(src), "-o", str(path)], check=True)
    if record:
        meta = build._record(build._key(build.compiler(), build.TUNINGS), file_sha256(path))
        path.with_name(path.name + ".json").write_text(json.dumps(meta))
    return path


def _load_quietly() -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        native.library()
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("where", ["temp folder 0777, cache empty", "temp folder 0777, cache unwritable",
                                   "cache folder 0775", "library file 0666"])
def test_a_planted_library_never_runs(cache, where):
    marker, tmp = cache / "marker", cache / "tmp"
    if where.startswith("temp folder"):
        folder = tmp / f"cmdbnet-kernels-{os.getuid()}"
        _plant(folder, marker)
        folder.chmod(0o777)  # what another user's folder (or ours under umask 000) looks like
        if where.endswith("unwritable"):
            (cache / "blocker").write_text("")
            os.environ[native.CACHE_ENV] = str(cache / "blocker")  # restored by monkeypatch
    else:
        folder = cache / "cache" / "kernels"
        planted = _plant(folder, marker)
        (folder.chmod(0o775) if where.startswith("cache") else planted.chmod(0o666))
    messages = _load_quietly()
    assert native.library() is not None and native.library_error() == ""
    assert not marker.exists(), "the planted library's code ran"
    used = Path(native.library_path())
    assert used.parent != folder or where == "library file 0666"
    assert not used.parent.stat().st_mode & 0o022 and stat.S_IMODE(used.stat().st_mode) == 0o700
    if where == "temp folder 0777, cache empty":
        assert used.parent == cache / "cache" / "kernels" and messages == []
    elif where == "library file 0666":
        assert messages == [f"the cached C library {used} is writable by group or others (mode 666); rebuilt it"]
    else:
        (message,) = messages
        assert f"not loading or building the C library in {folder}" in message and "writable by group" in message
        assert used.parent.parent == tmp and used.parent.name.startswith("cmdbnet-kernels-")


def test_umask_000_still_gives_private_folders_and_files(cache):
    os.environ[native.CACHE_ENV] = str(cache / "new" / "deeper")
    old = os.umask(0)
    try:
        assert native.library() is not None
        native._load.cache_clear()
        (cache / "blocker").write_text("")
        os.environ[native.CACHE_ENV] = str(cache / "blocker")  # now the per-user temporary folder
        assert native.library() is not None
    finally:
        os.umask(old)
    made = [cache / "new", cache / "new" / "deeper", cache / "new" / "deeper" / "kernels",
            cache / "tmp" / f"cmdbnet-kernels-{os.getuid()}"]
    assert [oct(stat.S_IMODE(p.stat().st_mode)) for p in made] == [oct(0o700)] * 4
    for folder in made[2:]:
        lib, record = sorted(folder.iterdir())
        assert (stat.S_IMODE(lib.stat().st_mode), stat.S_IMODE(record.stat().st_mode)) == (0o700, 0o600)


def test_an_unwritable_tmpdir_is_reported_not_replaced_by_the_system_one(cache, monkeypatch):
    (cache / "blocker").write_text("")
    monkeypatch.setenv(native.CACHE_ENV, str(cache / "blocker"))
    monkeypatch.setenv("TMPDIR", str(cache / "blocker" / "tmp"))
    assert native.library() is None
    error = native.library_error()
    assert error.startswith("cannot store the C library: ") and str(cache / "blocker" / "kernels") in error
    assert str(cache / "blocker" / "tmp") in error and "compiler" not in error
    with pytest.warns(RuntimeWarning) as caught:
        assert scan.resolve_backend("cpu") == "torch"
    assert "compiler" not in str(caught[0].message)


def _damage(path: Path, how: str, tmp_path: Path) -> None:
    """Replace the library under a new inode (this process may have the old one mapped)."""
    if how == "truncated":
        data = path.read_bytes()[: path.stat().st_size // 2]
    elif how == "corrupt":
        data = os.urandom(path.stat().st_size)
    else:  # an older source's library: a valid one without today's symbols, and its own record
        src = tmp_path / "old.c"
        src.write_text("int cmdb_openmp(void) { return 0; }\n")
        subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(tmp_path / "old.so")], check=True)
        data = (tmp_path / "old.so").read_bytes()
        record = path.with_name(path.name + ".json")
        meta = json.loads(record.read_text())
        record.write_text(json.dumps({**meta, "sources": "0" * 64, "sha256": file_sha256(tmp_path / "old.so")}))
    new = path.with_name("new")
    new.write_bytes(data)
    new.chmod(0o700)
    os.replace(new, path)


@pytest.mark.parametrize(("how", "why"), [("truncated", "is damaged"), ("corrupt", "is damaged"),
                                          ("stale", "was built from other sources (a stale build record)")])
def test_a_damaged_or_stale_library_is_rebuilt_with_one_line(cache, how, why):
    path = build.library_file(build.compiler())
    assert len(_builds(cache)) == 1
    _damage(path, how, cache)
    messages = _load_quietly()
    assert messages == [f"the cached C library {path} {why}"
                        + (" (its sha256 differs from the one recorded at build time)" if why == "is damaged" else "")
                        + "; rebuilt it"]
    lib = native.library()
    assert lib is not None and lib.openmp and lib.path == str(path) and len(_builds(cache)) == 2
    assert build._invalid(path, build._key(build.compiler(), build.TUNINGS)) == ""


def test_a_library_without_its_build_record_is_rebuilt(cache):
    path = build.library_file(build.compiler())
    path.with_name(path.name + ".json").unlink()
    assert _load_quietly() == [f"the cached C library {path} has no build record; rebuilt it"]
    assert len(_builds(cache)) == 2


def test_a_hanging_compiler_is_killed_with_its_children(cache, monkeypatch):
    pidfile = cache / "child.pid"
    cc = cache / "hanging-cc"
    cc.write_text(f'#!/bin/sh\nfor a; do [ "$a" = --version ] && {{ echo "hang 1"; exit 0; }}; done\n'
                  f'sleep 300 &\necho $! > {pidfile}\nwait\n')
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setattr(build, "COMPILE_TIMEOUT", 1.0)
    assert native.library() is None
    assert native.library_error() == "hanging-cc did not finish within 1 s; stopped it and its children"
    child = int(pidfile.read_text())
    for _ in range(50):
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            break
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the compiler's child {child} still runs")
    assert not any((cache / "cache" / "kernels").iterdir())


def test_a_dead_builds_temporary_file_is_removed_once_old(cache):
    folder = cache / "cache" / "kernels"
    folder.mkdir(parents=True, mode=0o700)
    old, recent = folder / ".scan-0123456789abcdef.so.x1y2z3.part", folder / ".scan-0123456789abcdef.so.a1b2c3.part"
    for part in (old, recent):
        part.write_bytes(b"\x7fELF half")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    assert native.library() is not None
    assert not old.exists() and recent.exists()  # a build still running in another process keeps its file


def test_cc_with_flags_is_a_compiler_and_its_flags(cache):
    os.environ["CC"] = f"{os.environ['CC']} -std=gnu11"
    assert native.library() is not None, native.library_error()
    assert all(line.startswith("-std=gnu11 ") for line in _builds(cache))
