"""Interrupt ``prepare``, ``train`` and ``predict`` at random points, re-run them, check what is left.

The slow half of the reliability matrix (``tests/test_reliability.py``). For each case a
command runs in a child process and receives, after a seeded random delay, either SIGINT
sent to its whole process group (what Ctrl-C does) or SIGKILL sent to the command's own
process (``kill -9 PID``). Then the same command is run again (``train`` with ``--resume``
when a ``last.pt`` exists) and its results are compared with an uninterrupted reference run.

Per case it checks:

* clean: the interrupted run printed no traceback (SIGINT: ``cmdb: interrupted`` and exit 130);
  the re-run exited 0 without a traceback,
* partial files: files under final names (not ``.*.part*``) that do not read back whole,
* orphans: processes of the command's tree still running 3 s after it ended,
* bit-identical: the re-run's crops / final weights and buffers / mask equal the reference's,
* finite: every checkpoint ever found holds only finite weights.

Disk full (``--disk-full N`` cases): a command runs under a file size limit (``ulimit -f``,
SIGXFSZ ignored, so a write past it fails with EFBIG as on a full disk) drawn log-uniformly
between 1 kB and the largest file its reference run wrote. It must exit 0 (everything fitted) or 2 with one
``cmdb: error:`` line that says the disk is full; nothing unreadable under a final name; then
the same command without the limit finishes with the reference's results.

    python benchmarks/faults.py [--cases 12] [--disk-full 6] [--seed 0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import rasterio
import torch
import yaml

CONFIG = {"model": {"backbone": "resnet18", "pretrained": "off", "mamba_depths": [1, 1, 1, 1], "d_state": 4,
                    "fusion_channels": 32},
          "data": {"crop": 64, "workers": 0},
          "train": {"batch": 4, "accum": 2, "max_steps": 6, "amp": False, "device": "cpu", "seed": 1,
                    "warmup_steps": 1, "log_images": 0}}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@dataclass
class Outcome:
    command: str
    sig: str
    delay: float
    clean: bool = True
    traceback: bool = False
    partial: list[str] = field(default_factory=list)
    orphans: int = 0
    identical: bool = False
    checkpoints: int = 0
    finite: int = 0


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            kids = {int(c) for t in Path(f"/proc/{p}/task").iterdir()
                    for c in (t / "children").read_text().split()}
        except OSError:
            continue
        todo.extend(kids - found)
        found |= kids
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def interrupted_run(cmd: list[str], sig: int, delay: float) -> tuple[int, str, int]:
    """Run ``cmd``, signal it after ``delay`` s; (exit status, stderr, processes left running)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # Ctrl-C as a terminal delivers it, even from a background job:
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    tree: set[int] = set()
    end = time.monotonic() + delay
    while time.monotonic() < end and proc.poll() is None:
        tree |= _descendants(proc.pid)
        time.sleep(0.02)
    if proc.poll() is None:
        tree |= _descendants(proc.pid)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches every process of the foreground group
        else:
            os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    time.sleep(3.0)
    left = [p for p in tree if _alive(p)]
    for p in left:  # leave the machine clean for the next case
        os.kill(p, signal.SIGKILL)
    return proc.returncode, err, len(left)


def rerun(cmd: list[str]) -> tuple[int, str]:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    return proc.returncode, proc.stderr


def unreadable(folder: Path) -> list[str]:
    """Files under final names that do not read back whole."""
    bad = []
    for path in folder.rglob("*"):
        if not path.is_file() or path.name.startswith(".") or "tb" in path.relative_to(folder).parts:
            continue
        try:
            if path.suffix == ".tif":
                with rasterio.open(path) as src:
                    src.read()
            elif path.suffix == ".pt":
                torch.load(path, weights_only=True)
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".yaml":
                yaml.safe_load(path.read_text())
        except Exception:  # noqa: BLE001 - any failure to read back is what is counted
            bad.append(str(path.relative_to(folder)))
    return bad


def checkpoints_finite(folder: Path, o: Outcome) -> None:
    for path in folder.glob("*.pt"):
        o.checkpoints += 1
        state = torch.load(path, weights_only=True)["model"]
        o.finite += all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.tif"))}


def judge(o: Outcome, code: int, err: str, sig: int) -> None:
    o.traceback = "Traceback" in err
    if sig == signal.SIGINT:
        # -SIGINT: CPython ends with SIGINT (a shell shows 130 either way) when the interrupt landed
        # inside an import run by C code (torch's), even after cmdb caught it and printed its line.
        o.clean = code == 0 or (code in (130, -signal.SIGINT) and "cmdb: interrupted" in err and not o.traceback)
    else:
        o.clean = code in (0, -signal.SIGKILL) and not o.traceback


def interrupt_then_rerun(o: Outcome, first: list[str], again, target: Path, sig: int, delay: float,
                         after_kill=None) -> int:
    """Interrupt ``first`` after ``delay`` s, judge what it left in ``target``, run ``again()``; its exit code."""
    code, err, o.orphans = interrupted_run(first, sig, delay)
    judge(o, code, err, sig)
    o.partial = unreadable(target) if target.exists() else []
    if after_kill is not None:
        after_kill()
    code, err = rerun(again())
    o.traceback |= "Traceback" in err
    o.clean &= code == 0
    return code


def case_prepare(work: Path, i: int, sig: int, delay: float, ref: Path, cmd) -> Outcome:
    o = Outcome("prepare", sig.name, delay)
    out = work / f"prep{i}"
    code = interrupt_then_rerun(o, cmd(out), lambda: cmd(out), out, sig, delay)
    o.identical = (code == 0 and tree_bytes(out) == tree_bytes(ref)
                   and (out / "manifest.json").read_text() == (ref / "manifest.json").read_text()
                   and not list(out.rglob(".*.part*")))
    return o


def case_train(work: Path, i: int, sig: int, delay: float, ref: Path, cmd) -> Outcome:
    o = Outcome("train", sig.name, delay)
    run = work / f"run{i}"
    again = lambda: cmd(run) + (["--resume", str(run)] if (run / "last.pt").is_file() else [])  # noqa: E731
    code = interrupt_then_rerun(o, cmd(run), again, run, sig, delay, lambda: checkpoints_finite(run, o))
    checkpoints_finite(run, o)
    if code == 0:
        a = torch.load(ref / "last.pt", weights_only=True)["model"]
        b = torch.load(run / "last.pt", weights_only=True)["model"]
        o.identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    o.identical &= not list(run.glob(".*.part*"))
    return o


def case_predict(work: Path, i: int, sig: int, delay: float, ref: Path, cmd) -> Outcome:
    o = Outcome("predict", sig.name, delay)
    out = work / f"pred{i}"
    code = interrupt_then_rerun(o, cmd(out), lambda: cmd(out), out, sig, delay)
    o.identical = code == 0 and tree_bytes(out) == tree_bytes(ref) and not list(out.rglob(".*.part*"))
    return o


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: a write past the limit fails with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def largest_file(folder: Path) -> int:
    return max((p.stat().st_size for p in folder.rglob("*") if p.is_file()), default=1024)


def case_disk_full(work: Path, i: int, name: str, limit: int, ref: Path, cmd) -> Outcome:
    """``cmd(out)`` under a file size limit of ``limit`` bytes, then again without it (train: ``--resume``)."""
    o = Outcome(name, "FSIZE", limit / 1024)
    out = work / f"full{i}"
    proc = subprocess.run(cmd(out), env=ENV, capture_output=True, text=True, timeout=900,
                          preexec_fn=_file_size_limit(limit))
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("cmdb: error:")]
    o.traceback = "Traceback" in proc.stderr
    o.clean = not o.traceback and (proc.returncode == 0 or (
        proc.returncode == 2 and len(errors) == 1 and "disk full" in errors[0]))
    o.partial = unreadable(out) if out.exists() else []
    again = cmd(out) + (["--resume", str(out)] if name == "train" and (out / "last.pt").is_file() else [])
    code, err = rerun(again)
    o.traceback |= "Traceback" in err
    o.clean &= code == 0
    if name == "train":
        checkpoints_finite(out, o)
        if code == 0:
            a = torch.load(ref / "last.pt", weights_only=True)["model"]
            b = torch.load(out / "last.pt", weights_only=True)["model"]
            o.identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    else:
        o.identical = code == 0 and tree_bytes(out) == tree_bytes(ref)
    o.identical &= not list(out.rglob(".*.part*"))
    return o


def run_disk_full(work: Path, n: int, rng: random.Random, refs: dict[str, Path], cmds: dict) -> list[Outcome]:
    outcomes = []
    for i in range(n):
        name = ("prepare", "train", "predict")[i % 3]
        limit = int(math.exp(rng.uniform(math.log(1024), math.log(largest_file(refs[name])))))  # small files too
        o = case_disk_full(work, i, name, limit, refs[name], cmds[name])
        print(f"{name:8s} FSIZE   at {limit / 1024:8.1f} kB: clean {o.clean} traceback {o.traceback} partial "
              f"{len(o.partial)} identical {o.identical} finite {o.finite}/{o.checkpoints}", flush=True)
        outcomes.append(o)
    return outcomes


def timed(cmd: list[str]) -> float:
    t0 = time.monotonic()
    code, err = rerun(cmd)
    if code != 0:
        raise SystemExit(f"reference run failed: {' '.join(cmd)}\n{err[-2000:]}")
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=12, help="cases in all, spread over the three commands")
    ap.add_argument("--disk-full", type=int, default=6, help="disk-full cases, spread over the three commands")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it")
    ap.add_argument("--cache-only", action="store_true", help="only the C library cache's cases")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="cmdb-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.cache_only:
        cache = cache_faults(work)
        print(f"\nC library cache: {sum(held for _, held, _ in cache)}/{len(cache)} cases held")
        return
    cli = [sys.executable, "-m", "cmdbnet"]
    raw = work / "raw"
    if not raw.exists():
        subprocess.run(cli + ["synth", "potsdam", "-o", str(raw), "-n", "6", "-s", "384"], env=ENV, check=True,
                       capture_output=True)
    cfg = work / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    scene = raw / "2_Ortho_RGB" / "top_potsdam_2_13_RGB.tif"
    cmds = {
        "prepare": lambda out: cli + ["prepare", "potsdam", "-r", str(raw), "-o", str(out), "--crop", "64",
                                      "--workers", "2"],
        "train": lambda out: cli + ["train", "-c", str(cfg), "--data", str(work / "ref-prep"), "--out", str(out)],
        "predict": lambda out: cli + ["predict", str(scene), "-o", str(out), "-k", str(work / "ref-run"),
                                      "--tile", "64", "--device", "cpu"],
    }
    for path in ("ref-prep", "ref-run", "ref-pred"):
        shutil.rmtree(work / path, ignore_errors=True)
    durations = {name: timed(cmds[name](work / ref)) for name, ref in
                 (("prepare", "ref-prep"), ("train", "ref-run"), ("predict", "ref-pred"))}
    refs = {"prepare": work / "ref-prep", "train": work / "ref-run", "predict": work / "ref-pred"}
    runners = {"prepare": case_prepare, "train": case_train, "predict": case_predict}
    rng = random.Random(args.seed)
    outcomes = []
    for i in range(args.cases):
        name = ("prepare", "train", "predict")[i % 3]
        sig = (signal.SIGINT, signal.SIGKILL)[(i // 3) % 2]
        delay = round(rng.uniform(0.25, 1.0) * durations[name], 2)
        o = runners[name](work, i, sig, delay, refs[name], cmds[name])
        print(f"{name:8s} {sig.name:7s} at {delay:6.2f} s: clean {o.clean} traceback {o.traceback} partial "
              f"{len(o.partial)} orphans {o.orphans} identical {o.identical} finite {o.finite}/{o.checkpoints}",
              flush=True)
        outcomes.append(o)
    full = run_disk_full(work, args.disk_full, rng, refs, cmds)
    report(outcomes, durations)
    if full:
        print("\ndisk full (file size limit):")
        report(full, {})
    cache = cache_faults(work)
    print(f"\nC library cache: {sum(held for _, held, _ in cache)}/{len(cache)} cases held")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


PLANTED_C = """#include <stdio.h>
__attribute__((constructor)) static void plant(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("planted code ran", f); fclose(f); }
}
int cmdb_openmp(void) { return 0; }
"""


def _doctor(env: dict[str, str]) -> tuple[int, dict, list[str]]:
    """``cmdb doctor --json`` in a fresh process: (exit status, its native_scan report, stderr lines)."""
    proc = subprocess.run([sys.executable, "-m", "cmdbnet", "doctor", "--json"], env=env, capture_output=True,
                          text=True, timeout=600)
    try:
        native = json.loads(proc.stdout)["native_scan"]
    except (ValueError, KeyError):
        native = {}
    return proc.returncode, native, proc.stderr.strip().splitlines()


def _library_name(env: dict[str, str]) -> str:
    code = ("from cmdbnet.models.scan import build\n"
            "print(f'scan-{build._key(build.compiler(), build.TUNINGS)[:16]}.so')")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def cache_faults(work: Path) -> list[tuple[str, bool, str]]:
    """The C library cache's faults, each with its own cache and temporary folder: (case, held, detail).

    Held means: no planted code ran, the process did not die by a signal, the library in use
    passes its check (or the message names the real cause), and stderr holds only cmdb lines.
    """
    results = []

    def fresh(name: str) -> tuple[Path, dict[str, str]]:
        root = work / "cache-faults" / name
        shutil.rmtree(root, ignore_errors=True)
        (root / "tmp").mkdir(parents=True, mode=0o700)
        return root, {**ENV, "PYTHONWARNINGS": "default", "CMDB_CACHE_DIR": str(root / "cache"),
                      "TMPDIR": str(root / "tmp")}

    def record(name: str, held: bool, detail: str) -> None:
        results.append((name, held, detail))
        print(f"cache {name:28s} held {held}  {detail}", flush=True)

    def clean(err: list[str]) -> bool:
        return all(line.startswith("cmdb: ") for line in err)

    root, env = fresh("planted-temp-folder")
    folder = root / "tmp" / f"cmdbnet-kernels-{os.getuid()}"
    folder.mkdir()
    (root / "p.c").write_text(PLANTED_C)
    subprocess.run(["cc", "-shared", "-fPIC", f'-DMARKER="{root / "marker"}"', str(root / "p.c"), "-o",
                    str(folder / _library_name(env))], check=True)
    folder.chmod(0o777)
    (root / "blocker").write_text("")
    env["CMDB_CACHE_DIR"] = str(root / "blocker")
    code, native, err = _doctor(env)
    record("planted-temp-folder", code == 0 and not (root / "marker").exists() and native.get("ok")
           and not str(native.get("library")).startswith(str(folder)) and clean(err), "; ".join(err)[:160])

    for how in ("truncated", "corrupt", "stale"):
        root, env = fresh(how)
        code, native, _ = _doctor(env)
        lib = Path(native["library"])
        if how == "truncated":
            data = lib.read_bytes()[: lib.stat().st_size // 2]
        elif how == "corrupt":
            data = os.urandom(lib.stat().st_size)
        else:
            (root / "old.c").write_text("int cmdb_openmp(void) { return 0; }\n")
            subprocess.run(["cc", "-shared", "-fPIC", str(root / "old.c"), "-o", str(root / "old.so")], check=True)
            data = (root / "old.so").read_bytes()
            Path(str(lib) + ".json").unlink()
        lib.write_bytes(data)
        code, native, err = _doctor(env)
        record(how, code == 0 and native.get("ok") and native.get("openmp") and clean(err) and len(err) == 1,
               f"exit {code}; " + "; ".join(err)[:160])

    root, env = fresh("hanging-compiler")
    cc = root / "cc"
    cc.write_text(f'#!/bin/sh\nfor a; do [ "$a" = --version ] && {{ echo hang; exit 0; }}; done\n'
                  f'sleep 300 &\necho $! > {root / "child"}\nwait\n')
    cc.chmod(0o755)
    code = ("from cmdbnet.models.scan import build, native\nbuild.COMPILE_TIMEOUT = 2\n"
            "print(native.library_error())")
    out = subprocess.run([sys.executable, "-c", code], env={**env, "CC": str(cc)}, capture_output=True, text=True,
                         timeout=120).stdout.strip()
    time.sleep(0.5)
    child = int((root / "child").read_text())
    record("hanging-compiler", "did not finish" in out and not _alive(child), out[:160])

    root, env = fresh("killed-build-part")
    kernels = root / "cache" / "kernels"
    kernels.mkdir(parents=True, mode=0o700)
    part = kernels / ".scan-0123456789abcdef.so.x1y2z3.part"
    part.write_bytes(b"half")
    os.utime(part, (time.time() - 3600, time.time() - 3600))
    code, native, err = _doctor(env)
    record("killed-build-part", code == 0 and native.get("ok") and not part.exists(), "; ".join(err)[:160])

    root, env = fresh("cc-with-flags")
    code, native, err = _doctor({**env, "CC": "gcc -std=gnu11"})
    record("cc-with-flags", code == 0 and native.get("ok") and clean(err), "; ".join(err)[:160])

    root, env = fresh("read-only-cache")
    (root / "blocker").write_text("")
    env.update(CMDB_CACHE_DIR=str(root / "blocker"), TMPDIR=str(root / "blocker" / "tmp"))
    code, native, err = _doctor(env)
    reason = native.get("reason") or ""
    record("read-only-cache", code == 0 and "cannot store the C library" in reason and "compiler" not in reason
           and clean(err), reason[:160])
    return results


def report(outcomes: list[Outcome], durations: dict[str, float]) -> None:
    if durations:
        print("\nreference runs: " + ", ".join(f"{k} {v:.1f} s" for k, v in durations.items()))
    print("| command | cases | clean errors | tracebacks | partial files | orphan processes | "
          "resumes bit-identical | checkpoints finite |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("prepare", "train", "predict", "all"):
        os_ = [o for o in outcomes if name in ("all", o.command)]
        ck = sum(o.checkpoints for o in os_)
        print(f"| {name} | {len(os_)} | {sum(o.clean for o in os_)} | {sum(o.traceback for o in os_)} | "
              f"{sum(len(o.partial) for o in os_)} | {sum(o.orphans for o in os_)} | "
              f"{sum(o.identical for o in os_)}/{len(os_)} | "
              + (f"{sum(o.finite for o in os_)}/{ck}" if ck else "-") + " |")


if __name__ == "__main__":
    main()
