"""The Triton scan kernels compile for real NVIDIA targets, here, without a GPU (triton_compile.py
binds and compiles every launch of a network call): no register spills, no reverse scan.

The interpreter (test_scan_backends) checks what the kernels compute, not that Triton's
compiler accepts them. CI compiles a Turing laptop card (sm_75) at d_state 1 and a Hopper card
(sm_90) at d_state 16 on a large card's grid, and an Ampere card (sm_86) with the largest tiles
at d_state 4; ``python tests/models/triton_compile.py`` prints the full table.
"""

from __future__ import annotations

import pytest
from triton_compile import rows


@pytest.mark.slow
@pytest.mark.parametrize(("capability", "d_state", "sms", "kernels"),
                         [(75, 1, 132, ("forward", "backward")), (90, 16, 132, ("forward", "backward")),
                          (86, 4, 0, ("backward",))])
def test_network_launches_compile_without_spills(monkeypatch, capability, d_state, sms, kernels):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    seen = set()
    for cap, n, name, _, _, registers, spilled, ttir in rows(sms, (d_state,), kernels, (capability,)):
        seen.add(name)
        assert spilled == 0, f"sm_{cap}, d_state {n}, {name}: {spilled} bytes spilled ({registers} registers)"
        # the reverse-time scan is a forward scan (triton-lang/triton#4362)
        assert "tt.scan" in ttir and "reverse = true" not in ttir
    assert seen == ({"forward", "forward carry pass", "backward", "backward carry pass"} if sms else {"backward"})
