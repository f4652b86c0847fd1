"""Multiply-adds of the selective scan, for FLOP counters that cannot see inside it."""

from __future__ import annotations


def scan_macs(b: int, d: int, l: int, n: int, has_z: bool, has_D: bool) -> int:  # noqa: E741, N803
    """Multiply-adds of one forward scan, for FLOP counters (torch's cannot see inside it).

    Convention: one MAC per multiply or multiply-add, elementwise or in a reduction; lone
    additions, exp, softplus and silu are free (as fvcore/thop count convolutions). Per (b, d, l):
    ``delta*A`` (N), ``delta*u`` (1) and ``*B`` (N), the recurrence ``x = dA*x + dBu`` (N),
    ``y = sum_n x*C`` (N), ``u*D`` (1 if D) and ``*silu(z)`` (1 if z): ``b*d*l*(4N + 1 + D + z)``.
    Backward is not included; by the usual rule of thumb it costs about twice this.
    """
    return b * d * l * (4 * n + 1 + int(has_D) + int(has_z))
