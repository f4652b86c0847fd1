"""The GPU check: one command, one table, written to benchmarks/RESULTS.md with the card's name.

Parts (each row of the table names its part; ``--parts`` picks some, e.g. ``--parts a,b,g``):
  a  every scan backend against the chunked CPU scan at the network's four stage shapes:
     max relative error (max |x - ref| / max |ref|) over the output and every gradient;
  b  scan forward + backward time per backend at those shapes (median);
  g  the Triton grid: programs per launch for the network's calls, old (16-channel blocks) and
     new plan, and on a card the Triton scan timed under both;
  k  the Triton compile test's table (sm_75/80/86/90, d_state 1/16: registers, spills) under
     the installed Triton;
  c  one training step (forward, losses, backward, AdamW) at batch 4, crop 256, fp16 and bf16
     autocast: our network per scan backend and a ResNet34 U-Net built here;
  d  ``cmdb profile-vram``'s estimate against the measured peak for three recipes;
  e  ``cmdb predict`` throughput on a generated 4096 x 4096 GeoTIFF, tiled against one window;
  f  ``cmdb demo`` wall time;
  o  the exported ONNX file in onnxruntime's CUDA provider against PyTorch (``export.py``);
  x  one training step of every ablation entry, baselines included (``accuracy.py``).
Targets on a card: (a) <= 1e-4; the scan <= 15% of a training step; ours / U-Net <= 1.5 in fp16;
(d) within 15%. No downloads. The plan (``PARTS``' seconds) fits 8 minutes with a fresh
machine's warm-up; a part that would not fit is skipped with a row saying so.

The scan parts (a, b, g, k) import torch and cmdbnet.models alone; c-f import the workflow
packages when they run. A part that fails (any exception) leaves one FAILED row and the rest run;
the results file is rewritten after every part, so a run cut short keeps what it measured.
A part is a generator of rows ``(what, value, target, met)``: a new one is a function and one
line in ``PARTS``.

    python benchmarks/gpu.py                  # on a CUDA machine; appends to benchmarks/RESULTS.md
    python benchmarks/gpu.py --parts a,b,g    # some parts
    python benchmarks/gpu.py --smoke          # every part at tiny shapes on CPU, writes nothing
    python benchmarks/gpu.py --smoke --results /tmp/r.md

``--smoke`` runs Triton through its interpreter (TRITON_INTERPRET=1, set before triton loads);
without CUDA it skips the compile table (k) and the grid timing, and measures no memory.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import shutil  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cmdbnet.models import scan  # noqa: E402
from gpu_scan import failure  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
LIMIT_S, WARMUP_S = 480, 30

# key -> (module:function, planned seconds on an H200, what it is)
PARTS = {
    "a": ("gpu_scan:check_scans", 30, "scan accuracy"),
    "b": ("gpu_scan:time_scans", 30, "scan time"),
    "g": ("gpu_scan:triton_grid_rows", 20, "Triton grid"),
    "k": ("gpu_scan:compile_rows", 100, "Triton compile table"),
    "c": ("gpu_parts:train_steps", 90, "training step"),
    "d": ("gpu_parts:vram_estimates", 45, "profile-vram"),
    "e": ("gpu_parts:predict_throughput", 45, "predict"),
    "f": ("gpu_parts:demo_time", 80, "demo"),
    "o": ("export:cuda_rows", 60, "ONNX export in onnxruntime's CUDA provider"),
    "x": ("accuracy:gpu_rows", 60, "ablation step per entry"),
}
SMOKE_SKIPS = {"k": "compile table: run tests/models/triton_compile.py (no GPU needed, about a minute)"}


@dataclass
class Context:
    """What a part gets: the device, the backends to compare, a scratch folder, and the scan
    time per training step that (b) measures and (c) divides by."""

    dev: torch.device
    backends: list[str]
    smoke: bool
    work: Path
    scan_per_step: dict[str, float] = field(default_factory=dict)


class Table:
    """Rows of (part, item, value, target, verdict), printed as they come."""

    def __init__(self, smoke: bool):
        self.rows: list[tuple[str, ...]] = []
        self.smoke = smoke  # tiny shapes on a CPU: the targets do not apply

    def add(self, part: str, item: str, value: str, target: str = "", ok: bool | None = None) -> None:
        target = "" if self.smoke else target
        verdict = "" if ok is None or self.smoke else ("met" if ok else "NOT met")
        self.rows.append((part, item, value, target, verdict))
        self.failed = getattr(self, "failed", False) or item == "FAILED" or str(value).startswith("FAILED")
        print(f"  ({part}) {item}: {value}" + (f"  [target {target}: {verdict}]" if target else ""), flush=True)

    def markdown(self) -> str:
        lines = ["| part | what | value | target | |", "|---|---|---|---|---|"]
        cell = lambda s: str(s).replace("|", "/")  # noqa: E731
        return "\n".join(lines + ["| " + " | ".join(cell(c) for c in r) + " |" for r in self.rows])


def device_line(dev: torch.device) -> str:
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (smoke run)"
    return f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"


def launcher_check() -> tuple[bool, str]:
    """Whether Triton can build its CUDA launcher here (it does at first launch, with a C
    compiler and Python.h), and what that means for the triton rows."""
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    missing = [m for m, ok in (("a C compiler", cc and shutil.which(cc.split()[0])), (f"{header}", header.exists()))
               if not ok]
    if not missing:
        return True, f"C compiler {cc} and Python.h found: Triton builds its launcher and runs"
    return False, (f"missing {' and '.join(missing)}: Triton cannot build its launcher; the triton backend is "
                   f"left out here (auto falls back to torch_parallel)")


def backends_for(dev: torch.device, launcher_ok: bool) -> list[str]:
    """Every backend that can take tensors on ``dev`` here (triton on CPU: interpreted)."""
    names = [b for b in scan.available_backends()
             if (b != "mamba_ssm" or dev.type == "cuda") and (b != "native" or dev.type == "cpu")]
    if dev.type == "cpu":
        return [b for b in names if b != "triton" or os.environ.get("TRITON_INTERPRET") == "1"]
    return [b for b in names if b != "triton" or launcher_ok]


def write_results(path: Path, old: str, table: Table, header: str, command: str) -> None:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"\n## GPU check: `{command}`\n\n{header}; {date}; load average "
               f"{os.getloadavg()[0]:.2f}.\n\n{table.markdown()}\n")
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(old.rstrip("\n") + "\n" + section)
    os.replace(tmp, path)


def run_part(key: str, ctx: Context, table: Table) -> None:
    """Every row the part yields, as it comes; an exception (import included) becomes one row."""
    target, _, _ = PARTS[key]
    module, name = target.split(":")
    saved = os.environ.get(scan.BACKEND_ENV)
    try:
        for item, value, tgt, ok in getattr(importlib.import_module(module), name)(ctx):
            table.add(key, item, value, tgt, ok)
    except Exception as exc:  # noqa: BLE001 - one part failing on an untested card keeps the others
        table.add(key, "FAILED", failure(exc), "", False)
    finally:
        os.environ.pop(scan.BACKEND_ENV, None)
        if saved is not None:
            os.environ[scan.BACKEND_ENV] = saved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="every part at tiny shapes on CPU (writes nothing)")
    ap.add_argument("--results", type=Path, default=None, help=f"markdown file to append to [default: {RESULTS}]")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts [default: {','.join(PARTS)}]")
    args = ap.parse_args()
    keys = [k.strip() for k in args.parts.split(",") if k.strip()]
    if unknown := [k for k in keys if k not in PARTS]:
        print(f"gpu.py: error: unknown part(s) {', '.join(unknown)}; parts are {', '.join(PARTS)}", file=sys.stderr)
        return 2
    if not args.smoke and not torch.cuda.is_available():
        print("gpu.py: error: no CUDA device; run with --smoke to check the script on CPU", file=sys.stderr)
        return 2
    dev = torch.device("cpu") if args.smoke else torch.device("cuda")
    launcher_ok, launcher = launcher_check()
    backends = backends_for(dev, launcher_ok)
    header = device_line(dev) + f"; scan backends: {', '.join(backends)}"
    planned = WARMUP_S + sum(PARTS[k][1] for k in keys)
    print(f"{header}\nTriton launcher: {launcher}\nplan: {', '.join(f'{k} {PARTS[k][1]} s' for k in keys)}; "
          f"{planned} s with {WARMUP_S} s warm-up (limit {LIMIT_S} s)", flush=True)
    table, t0 = Table(args.smoke), time.monotonic()
    table.add("-", "Triton launcher", launcher if dev.type == "cuda" else "not needed: interpreted on CPU")
    out = args.results or (None if args.smoke else RESULTS)
    old = out.read_text() if out is not None and out.exists() else ""
    command = "python benchmarks/gpu.py" + (" --smoke" if args.smoke else "") + (
        f" --parts {args.parts}" if args.parts != ",".join(PARTS) else "")
    ctx = Context(dev, backends, args.smoke, Path(tempfile.mkdtemp(prefix="cmdb-gpu-")))
    for key in keys:
        if args.smoke and dev.type != "cuda" and key in SMOKE_SKIPS:
            table.add(key, "skipped in --smoke without CUDA", SMOKE_SKIPS[key])
        elif not args.smoke and time.monotonic() - t0 + WARMUP_S + PARTS[key][1] > LIMIT_S:
            table.add(key, "skipped", f"its {PARTS[key][1]} s would pass the {LIMIT_S} s plan; run --parts {key}")
        else:
            print(f"part ({key}) {PARTS[key][2]} ...", flush=True)
            t_part = time.monotonic()
            run_part(key, ctx, table)
            print(f"part ({key}) took {time.monotonic() - t_part:.0f} s", flush=True)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if out is not None:
            write_results(out, old, table, header, command)
    took = time.monotonic() - t0
    table.add("-", "whole check", f"{took:.0f} s", "" if args.smoke else f"<= {LIMIT_S - WARMUP_S} s",
              None if args.smoke else took <= LIMIT_S - WARMUP_S)
    print()
    print(table.markdown())
    if out is not None:
        write_results(out, old, table, header, command)
        print(f"\nwritten to {out}")
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
