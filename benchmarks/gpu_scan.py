"""The scan parts of benchmarks/gpu.py: torch and cmdbnet.models alone (no data, settings or
workflow packages), so that they report on a machine that lacks the rest.

Each part is a generator of rows ``(what, value, target, met)``; see gpu.py's registry.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from cmdbnet.models import scan
from cmdbnet.models.scan import triton_grid

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
# The default network (dims 64-512, SS2D expand 0.5, d_state 1, depths 2/2/4/2, 4 directions):
# the figures of cmdbnet.settings' defaults, kept here so these parts need no settings package.
DIMS, EXPAND, D_STATE, DEPTHS = (64, 128, 256, 512), 0.5, 1, (2, 2, 4, 2)
SMOKE_SCANS = [(1, 8, 37, 1), (1, 16, 16, 2), (1, 8, 4, 1), (1, 16, 1, 1)]


def stage_shapes(batch: int, crop: int) -> list[tuple[int, int, int, int]]:
    """(B, D, L, N) of the default network's scan calls per stage (4 directions x d_inner channels)."""
    return [(batch, 4 * max(1, int(EXPAND * dim)), (crop // 4 >> i) ** 2, D_STATE) for i, dim in enumerate(DIMS)]


@contextmanager
def backend(name: str):
    os.environ[scan.BACKEND_ENV] = name
    try:
        yield
    finally:
        os.environ.pop(scan.BACKEND_ENV, None)


def median_seconds(fn, reps: int, dev: torch.device, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``reps`` runs after ``warmup``, synchronising CUDA."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def scan_inputs(b: int, d: int, l: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:  # noqa: E741
    """Inputs as a freshly initialised block makes them: S4D-real A, dt in [1e-3, 0.1], 4 groups."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(d, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return {"u": torch.randn(b, d, l, generator=g), "delta": 0.1 * torch.randn(b, d, l, generator=g),
            "A": -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),
            "B": torch.randn(b, 4, n, l, generator=g), "C": torch.randn(b, 4, n, l, generator=g),
            "D": torch.ones(d), "delta_bias": dt + torch.log(-torch.expm1(-dt))}


def _call(x: dict) -> torch.Tensor:
    return scan.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], delta_bias=x["delta_bias"],
                               delta_softplus=True)


def run_scan(name: str, inputs: dict, dev: torch.device) -> list[torch.Tensor]:
    """Output and every input's gradient, on the CPU, from backend ``name`` on ``dev``."""
    x = {k: v.to(dev).requires_grad_() for k, v in inputs.items()}
    with backend(name):
        out = _call(x)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dev)
        grads = torch.autograd.grad((out * weights).sum(), list(x.values()))
    return [t.detach().cpu() for t in (out, *grads)]


def failure(exc: BaseException) -> str:
    """One line for any exception, whatever its message (or none)."""
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def check_scans(ctx):
    """(a) every backend against the chunked CPU scan at the network's stage shapes."""
    shapes = SMOKE_SCANS if ctx.smoke else stage_shapes(4, 256)
    refs = [run_scan("torch", scan_inputs(*s), torch.device("cpu")) for s in shapes]
    for b in ctx.backends:
        try:
            worst = (-1.0, None)
            for shape, ref in zip(shapes, refs):
                got = run_scan(b, scan_inputs(*shape), ctx.dev)
                err = max(float((o - r).abs().max() / r.abs().max().clamp(min=1e-30)) for o, r in zip(got, ref))
                worst = max(worst, (err, shape), key=lambda e: e[0])
        except Exception as exc:  # noqa: BLE001 - one backend failing keeps the others' rows
            yield f"`{b}` vs CPU chunked scan", f"FAILED {failure(exc)}", "", False
            continue
        yield (f"`{b}` vs CPU chunked scan, worst over 4 stages (B, D, L, N = {worst[1]})", f"{worst[0]:.1e}",
               f"<= {TOL:.0e}", worst[0] <= TOL)


def _scan_seconds(shape, dev, smoke: bool) -> float:
    x = {k: v.to(dev).requires_grad_() for k, v in scan_inputs(*shape).items()}
    return median_seconds(lambda: _call(x).sum().backward(), 1 if smoke else 5, dev, warmup=0 if smoke else 2)


def time_scans(ctx):
    """(b) scan forward + backward per backend and stage; the sum per training step."""
    shapes = SMOKE_SCANS if ctx.smoke else stage_shapes(4, 256)
    for b in ctx.backends:
        try:
            with backend(b):
                times = [_scan_seconds(s, ctx.dev, ctx.smoke) for s in shapes]
        except Exception as exc:  # noqa: BLE001 - see check_scans
            yield f"`{b}` scan forward+backward", f"FAILED {failure(exc)}", "", False
            continue
        ctx.scan_per_step[b] = sum(t * k for t, k in zip(times, DEPTHS))
        yield (f"`{b}` scan forward+backward, stages 1-4 (ms)",
               " / ".join(f"{1e3 * t:.2f}" for t in times) + f"; per training step {1e3 * ctx.scan_per_step[b]:.1f}",
               "", None)


def triton_grid_rows(ctx):
    """(g) programs per grid for the network's calls, 16-channel blocks (the old grid) against the
    plan for this card; on a card, the Triton scan timed under both in the same run."""
    sms = torch.cuda.get_device_properties(ctx.dev).multi_processor_count if ctx.dev.type == "cuda" else 132
    calls = [("stage 1-4, batch 4, crop 256", s) for s in stage_shapes(4, 256)]
    calls.append(("stage 1, batch 1, whole 4096 window", stage_shapes(1, 4096)[0]))
    for what, (b, d, l, n) in calls:  # noqa: E741
        old, new = (triton_grid.plan(b, 4, d // 4, n, l, s) for s in (0, sms))
        yield (f"Triton grid, {what}: (B, D, L, N) = {(b, d, l, n)}, {sms} SMs{'' if ctx.dev.type == 'cuda' else ' (assumed)'}",
               f"{old.programs} -> {new.programs} programs ({new.block_d} channels each, {new.n_chunks} chunks)",
               f">= {2 * sms}", new.programs >= 2 * sms)
    if ctx.dev.type != "cuda" or "triton" not in ctx.backends:
        yield "Triton grid timing", "skipped: needs a CUDA card with the triton backend", "", None
        return
    from cmdbnet.models.scan import triton as triton_scan

    real = triton_scan._sm_count
    with backend("triton"):
        for what, shape in (calls[0], calls[-1]):
            try:
                triton_scan._sm_count = lambda device: 0  # the old grid
                t_old = _scan_seconds(shape, ctx.dev, False)
                triton_scan._sm_count = real
                t_new = _scan_seconds(shape, ctx.dev, False)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory at the whole window
                yield f"Triton scan fwd+bwd, {what}, old vs new grid", f"FAILED {failure(exc)}", "", False
                continue
            finally:
                triton_scan._sm_count = real
            yield (f"Triton scan fwd+bwd, {what} {shape}: old grid / new grid (ms)",
                   f"{1e3 * t_old:.2f} / {1e3 * t_new:.2f} (x{t_old / t_new:.2f})", "", None)


def compile_rows(ctx):
    """(k) the compile test's full table (sm_75/80/86/90, d_state 1/4/16) under this image's Triton."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "models" / "triton_compile.py")],
                          capture_output=True, text=True, cwd=ROOT, timeout=240,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("| sm_")]
    yield "compile test", (proc.stdout.splitlines() or ["(no output)"])[0], "", None
    for ln in lines:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        yield (f"{cells[0]}, d_state {cells[1]}, {cells[2]}, grid for {cells[3]}",
               f"{cells[4]} channels, {cells[5]} warps: {cells[6]} registers, {cells[7]} bytes spilled", "0 spilled",
               cells[7] == "0")
    if proc.returncode and not lines:
        yield "compile test", f"FAILED (exit {proc.returncode}): {proc.stderr.strip()[-300:]}", "", False
