"""What each scan backend keeps for backward beyond its inputs, for the memory estimate.

The estimate traces the network with a stand-in scan; this says how many bytes of state the
backend a CUDA run would use saves per call, so profile-vram models that backend rather than
the CPU's.
"""

from __future__ import annotations

import math

from cmdbnet.models.scan.chunked import KEEP_ALL_MAX_N, state_bytes

# Steps per block of the Triton kernels; forward saves the fp32 state at every block start.
TRITON_BLOCK_L = 32
# mamba-ssm's CUDA kernel saves (B, D, ceil(L / 2048), 2N) fp32 for its backward.
MAMBA_CHUNK = 2048


def saved_state_bytes(backend: str, b: int, d: int, l: int, n: int) -> int:  # noqa: E741
    """Bytes of fp32 state ``backend`` saves for backward in one training call, beyond its inputs.

    ``torch``: the chunk-start states, plus every state at small d_state (kept so backward
    skips the recompute); ``triton``: one state per block; ``mamba_ssm``: its chunk states;
    ``torch_parallel`` recomputes everything from its inputs.
    """
    if backend == "torch":
        return state_bytes(b, d, l, n) + (b * d * l * n * 4 if n <= KEEP_ALL_MAX_N else 0)
    if backend == "triton":
        return b * d * n * math.ceil(l / TRITON_BLOCK_L) * 4
    if backend == "mamba_ssm":
        return b * d * math.ceil(l / MAMBA_CHUNK) * 2 * n * 4
    return 0
