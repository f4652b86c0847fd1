"""The GPU check: one command, one table, written to benchmarks/RESULTS.md with the card's name.

Parts (each row of the table names its part):
  (a) every scan backend against the chunked CPU scan at the network's four stage shapes:
      max relative error (max |x - ref| / max |ref|) over the output and every gradient;
  (b) scan forward + backward time per backend at those shapes (median);
  (c) one training step (forward, losses, backward, AdamW) at batch 4, crop 256, fp16 and bf16
      autocast: our network per scan backend and a ResNet34 U-Net built here: median time,
      peak allocated memory, ratio ours / U-Net;
  (d) ``cmdb profile-vram``'s estimate against the measured peak for three recipes;
  (e) ``cmdb predict`` throughput on a generated 4096 x 4096 GeoTIFF (Mpx/s), tiled against
      whole-image agreement;
  (f) ``cmdb demo`` wall time.
Targets on a card: (a) <= 1e-4; the scan <= 15% of a training step; ours / U-Net <= 1.5 in fp16;
(d) within 15%. No downloads; about 5 minutes on a recent card (at most 8).

    python benchmarks/gpu.py                  # on a CUDA machine; appends to benchmarks/RESULTS.md
    python benchmarks/gpu.py --smoke          # every part at tiny shapes on CPU, writes nothing
    python benchmarks/gpu.py --smoke --results /tmp/r.md

``--smoke`` runs Triton through its interpreter (TRITON_INTERPRET=1, set before triton loads).
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cmdbnet.diagnostics import environment_report  # noqa: E402
from cmdbnet.models import scan  # noqa: E402
from gpu_parts import (  # noqa: E402
    check_scans,
    demo_time,
    predict_throughput,
    time_scans,
    train_steps,
    vram_estimates,
)

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


class Table:
    """Rows of (part, item, value, target, verdict), printed as they come and as markdown at the end."""

    def __init__(self, smoke: bool):
        self.rows: list[tuple[str, ...]] = []
        self.smoke = smoke  # tiny shapes on a CPU: the targets do not apply

    def add(self, part: str, item: str, value: str, target: str = "", ok: bool | None = None) -> None:
        target = "" if self.smoke else target
        verdict = "" if ok is None or self.smoke else ("met" if ok else "NOT met")
        self.rows.append((part, item, value, target, verdict))
        print(f"  ({part}) {item}: {value}" + (f"  [target {target}: {verdict}]" if target else ""), flush=True)

    def markdown(self) -> str:
        lines = ["| part | what | value | target | |", "|---|---|---|---|---|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in self.rows])


def device_line(dev: torch.device) -> str:
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (smoke run)"
    return f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {environment_report()['cudnn']}"


def backends_for(dev: torch.device) -> list[str]:
    """Every backend that can take tensors on ``dev`` here (triton on CPU: interpreted)."""
    names = [b for b in scan.available_backends()
             if (b != "mamba_ssm" or dev.type == "cuda") and (b != "native" or dev.type == "cpu")]
    if dev.type == "cpu":
        names = [b for b in names if b != "triton" or os.environ.get("TRITON_INTERPRET") == "1"]
    return names


def write_results(path: Path, table: Table, header: str, command: str) -> None:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"\n## GPU check (issue 11): `{command}`\n\n{header}; {date}; load average "
               f"{os.getloadavg()[0]:.2f}.\n\n{table.markdown()}\n")
    old = path.read_text() if path.exists() else ""
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(old.rstrip("\n") + "\n" + section)
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="every part at tiny shapes on CPU (writes nothing)")
    ap.add_argument("--results", type=Path, default=None, help=f"markdown file to append to [default: {RESULTS}]")
    ap.add_argument("--skip", default="", help="parts to skip, e.g. 'ef'")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu.py: no CUDA device; run with --smoke to check the script on CPU")
    dev = torch.device("cpu") if args.smoke else torch.device("cuda")
    backends = backends_for(dev)
    header = device_line(dev) + f"; scan backends: {', '.join(backends)}"
    print(header, flush=True)
    table, t0 = Table(args.smoke), time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="cmdb-gpu-"))
    parts = {"a": lambda: check_scans(table, dev, backends, args.smoke),
             "b": lambda: time_scans(table, dev, backends, args.smoke),
             "c": lambda: train_steps(table, dev, backends, args.smoke),
             "d": lambda: vram_estimates(table, dev, args.smoke),
             "e": lambda: predict_throughput(table, dev, work, args.smoke),
             "f": lambda: demo_time(table, dev, work, args.smoke)}
    for key, run in parts.items():
        if key in args.skip:
            continue
        print(f"part ({key}) ...", flush=True)
        t_part = time.monotonic()
        with _restored_env():
            try:
                run()
            except Exception as exc:  # noqa: BLE001 - one part failing on an untested card keeps the others
                if args.smoke:
                    raise
                table.add(key, "FAILED", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        print(f"part ({key}) took {time.monotonic() - t_part:.0f} s", flush=True)
    table.add("-", "whole check", f"{time.monotonic() - t0:.0f} s", "<= 480 s" if not args.smoke else "",
              None if args.smoke else time.monotonic() - t0 <= 480)
    print()
    print(table.markdown())
    out = args.results or (None if args.smoke else RESULTS)
    if out is not None:
        command = "python benchmarks/gpu.py" + (" --smoke" if args.smoke else "")
        write_results(out, table, header, command)
        print(f"\nwritten to {out}")
    return 0


@contextlib.contextmanager
def _restored_env():
    saved = os.environ.get(scan.BACKEND_ENV)
    try:
        yield
    finally:
        os.environ.pop(scan.BACKEND_ENV, None)
        if saved is not None:
            os.environ[scan.BACKEND_ENV] = saved


if __name__ == "__main__":
    sys.exit(main())
