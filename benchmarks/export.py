"""Benchmark ``cmdb export``: export time, file size, node count, and onnxruntime's CPU throughput
against our PyTorch CPU path on the same windows.

The default network (random weights: timing does not depend on them) is exported at ``--tile``
(512) with a dynamic batch; both runtimes then segment the same ``--windows`` normalised windows
in batches of ``--batch`` with the same thread count (torch's intra-op threads; onnxruntime's
``intra_op_num_threads`` set to the same), alternating runtime per repeat so that the machine's
load falls on both alike. PyTorch runs what ``cmdb predict`` runs (``forward_tta``: inference
mode, the C scan and the other CPU fast paths, softmax); onnxruntime runs the file as Deepness or
a server would. Target: onnxruntime at least as fast (ratio >= 1.0).

``--ort117 DIR`` also loads the file with the onnxruntime installed in DIR (e.g. 1.17.3, the newest
QGIS's Deepness allows, ``pip install --target DIR onnxruntime==1.17.3 "numpy<2"``) in a child
process and compares its probabilities with this process's onnxruntime.

    python benchmarks/export.py                        # default network, tile 512
    python benchmarks/export.py --tile 256 --windows 8 --ort117 ~/ort117

:func:`cuda_rows` is the GPU check's part for onnxruntime's CUDA provider.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict import make_checkpoint  # noqa: E402

_ORT_CHILD = r"""
import json, sys, numpy as np, onnxruntime as ort
path, inp, out = sys.argv[1:4]
s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
meta = s.get_modelmeta().custom_metadata_map
x = np.load(inp)
np.save(out, s.run(None, {s.get_inputs()[0].name: x})[0])
print(json.dumps({"version": ort.__version__, "numpy": np.__version__, "keys": sorted(meta)}))
"""


def export_file(work: Path, tile: int, tiny: bool = False) -> tuple[Path, Path, dict]:
    """(checkpoint, .onnx, export summary) of the default (or the tests' tiny) network."""
    from cmdbnet.export import export

    ckpt = work / "net.pt"
    make_checkpoint(ckpt, "tiny" if tiny else False)
    path = work / f"net_{tile}.onnx"
    t0 = time.perf_counter()
    summary = export(ckpt, path, tile=tile)
    summary["wall_seconds"] = time.perf_counter() - t0
    return ckpt, path, summary


def windows(n: int, tile: int, seed: int = 0) -> torch.Tensor:
    from cmdbnet.data.registry import ISPRS_CLASSES
    from cmdbnet.data.synthetic import render_scene
    from cmdbnet.settings import IMAGENET_MEAN, IMAGENET_STD

    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.stack([render_scene(ISPRS_CLASSES, tile, tile, rng)[1][:3] for _ in range(n)])).float()
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def throughput(ckpt: Path, path: Path, x: torch.Tensor, batch: int, repeats: int,
               device: str = "cpu") -> dict:
    """Median seconds per pass over ``x`` of PyTorch (forward_tta) and onnxruntime, and their agreement."""
    from cmdbnet.checkpoint import load_model
    from cmdbnet.inference.onnx_runner import load_onnx_model
    from cmdbnet.inference.window import forward_tta

    model = load_model(ckpt, device)[0]
    runner = load_onnx_model(path, device)[0]
    x = x.to(device)
    chunks = [x[i:i + batch] for i in range(0, x.shape[0], batch)]

    def run_torch():
        return torch.cat([forward_tta(model, c)[0] for c in chunks])

    def run_ort():
        return torch.cat([runner(c)["probs"] for c in chunks])

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ref, got = run_torch(), run_ort()  # warm-up, and the outputs compared
    times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
    for r in range(repeats):
        for name, fn in (("torch", run_torch), ("onnxruntime", run_ort))[:: 1 if r % 2 == 0 else -1]:
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    mpx = x.shape[0] * x.shape[-1] * x.shape[-2] / 1e6
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"mpx": mpx, "seconds": med, "mpx_per_s": {k: mpx / v for k, v in med.items()},
            "ratio": med["torch"] / med["onnxruntime"], "max_abs_diff": float((got - ref).abs().max()),
            "argmax_agreement": float((got.argmax(1) == ref.argmax(1)).float().mean()),
            "providers": runner.sess.get_providers()}


def ort117(path: Path, x: torch.Tensor, target: Path) -> dict:
    """Load and run the file with the onnxruntime in ``target`` (a child process); compare with ours."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        inp, out = Path(d) / "x.npy", Path(d) / "y.npy"
        np.save(inp, x.numpy())
        env = {**os.environ, "PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1"}
        proc = subprocess.run([sys.executable, "-c", _ORT_CHILD, str(path), str(inp), str(out)], env=env,
                              capture_output=True, text=True, timeout=900)
        if proc.returncode:
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        theirs = np.load(out)
    ours = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    return {**info, "newest": ort.__version__, "max_abs_diff_vs_newest": float(np.abs(theirs - ours).max())}


def cuda_rows(ctx):
    """GPU check part (o): the exported default network in onnxruntime's CUDA provider against
    PyTorch on the card (fp32): max |dp| (target <= 1e-3), arg-max agreement, Mpx/s of both at
    tile 512, batch 8. In ``--smoke``: the tiny network at tile 64 on CPU providers (checks the
    code, not the card). Rows ``(what, value, target, met)`` as ``benchmarks/gpu.py`` takes them."""
    import onnxruntime as ort

    smoke, dev = ctx.smoke, ctx.dev
    tile, n, batch = (64, 2, 2) if smoke else (512, 16, 8)
    if not smoke and "CUDAExecutionProvider" not in ort.get_available_providers():
        yield ("onnxruntime CUDA provider", f"not available in onnxruntime {ort.__version__} "
               f"({', '.join(ort.get_available_providers())}); install onnxruntime-gpu", "", None)
        return
    ckpt, path, summary = export_file(ctx.work, tile, tiny=smoke)
    r = throughput(ckpt, path, windows(n, tile), batch, 1 if smoke else 5, "cpu" if smoke else dev.type)
    net = "tiny" if smoke else "default"
    yield (f"onnxruntime {ort.__version__} ({r['providers'][0]}) vs PyTorch, exported {net} network, "
           f"tile {tile}: max abs probability difference", f"{r['max_abs_diff']:.1e}; arg-max agreement "
           f"{r['argmax_agreement']:.4%}", "<= 1e-3", r["max_abs_diff"] <= 1e-3)
    yield (f"throughput, batch {batch} (fp32)", f"onnxruntime {r['mpx_per_s']['onnxruntime']:.2f} Mpx/s, "
           f"PyTorch {r['mpx_per_s']['torch']:.2f} Mpx/s (ratio {r['ratio']:.2f})", "", None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8, help="windows per pass (default 8)")
    ap.add_argument("--batch", type=int, default=4, help="windows per call (default 4, predict's default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny network (a quick check of the script)")
    ap.add_argument("--ort117", type=Path, default=None, help="folder with onnxruntime 1.17 (pip --target)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        ckpt, path, s = export_file(Path(d), args.tile, args.tiny)
        x = windows(args.windows, args.tile)
        r = throughput(ckpt, path, x, args.batch, args.repeats)
        old = ort117(path, x[:1], args.ort117) if args.ort117 else None
    report = {"tile": args.tile, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "onnxruntime": ort.__version__, "onnx": onnx.__version__, "export": s, "throughput": r,
              "ort117": old, "load_average": os.getloadavg()[0]}
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    c = s["check"]
    print(f"export: {s['export_seconds']:.1f} s trace ({s['wall_seconds']:.1f} s with the check), "
          f"{s['bytes'] / 2**20:.1f} MiB, {s['nodes']} nodes, opset {s['opset']}, IR {s['ir_version']}, "
          f"exporter {s['exporter']}; check max |dp| {c['max_abs_diff']:.1e}, agreement {c['argmax_agreement']:.4%}")
    print(f"{args.windows} windows of {args.tile}, batch {args.batch}, {report['threads']} threads: "
          f"PyTorch {r['mpx_per_s']['torch']:.3f} Mpx/s, onnxruntime {ort.__version__} "
          f"{r['mpx_per_s']['onnxruntime']:.3f} Mpx/s; ratio {r['ratio']:.2f} "
          f"[target >= 1.0: {'met' if r['ratio'] >= 1.0 else 'NOT met'}]; max |dp| {r['max_abs_diff']:.1e}")
    if old:
        print(f"onnxruntime {old.get('version', '?')} (numpy {old.get('numpy', '?')}): "
              + (old["error"] if "error" in old else f"loads and runs it; max |dp| vs {old['newest']} "
                 f"{old['max_abs_diff_vs_newest']:.1e}"))
    print(f"load average {report['load_average']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
