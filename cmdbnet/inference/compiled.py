"""``cmdb predict --compile``: torch.compile the network, only where the raster pays it back.

Compiling the default network takes minutes on a small CPU (benchmarks/RESULTS.md) while it
saves a fraction of each forward, so it is worth it only over many windows; below
:data:`COMPILE_MIN_WINDOWS` the flag is ignored and the summary says why. The compile runs
before the first window, on a batch of the real shape, so its time is reported on its own.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from cmdbnet.inference.window import StripPredictor, forward_tta

__all__ = ["COMPILE_MIN_WINDOWS", "compile_predictor"]

# Windows (of any size) from which compiling is expected to win back its time; see the
# compile figures in benchmarks/RESULTS.md.
COMPILE_MIN_WINDOWS = 768


def compile_predictor(predictor: StripPredictor, windows: int, bands: int, enabled: bool,
                      min_windows: int = COMPILE_MIN_WINDOWS) -> dict[str, Any]:
    """Swap ``predictor.model`` for a compiled copy when ``enabled`` and ``windows`` make it pay.

    Returns the summary fields: ``compile`` ("off", "on" or why it was skipped) and, when it
    ran, ``compile_seconds`` (the first, compiling forward of one batch).
    """
    if not enabled:
        return {"compile": "off"}
    if windows < min_windows:
        return {"compile": f"skipped: {windows} windows, fewer than the {min_windows} that win back the compile time"}
    compiled = torch.compile(predictor.model, dynamic=False)
    x = torch.zeros((predictor.batch, bands, *predictor.tile), device=predictor.device)
    t0 = time.perf_counter()
    forward_tta(compiled, x, predictor.tta, predictor.amp)
    predictor.model = compiled
    return {"compile": "on", "compile_seconds": round(time.perf_counter() - t0, 2)}
