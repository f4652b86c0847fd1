"""The launch-light torch scan: a log-depth Hillis-Steele scan on (decay, input) pairs.

For CUDA tensors when neither mamba-ssm nor Triton can run (Windows wheels, ROCm, old cards).
The chunked scan issues one small op per time step, and on a GPU each op is a kernel launch;
here a call issues a few dozen ops whatever L is, plus three per doubling of the shift
(ceil(log2 L) doublings): L = 4096 costs 18 launches more than L = 64, not 4032.

Numerics: level k combines pairs ``(a, x)`` at distance 2**k as ``(a a', a x' + x)``, so the
state is built from products of decays only; nothing ever computes exp of a positive
cumulative sum, and a decay that underflows to 0 simply cuts the history, as it should.

Backward is a hand-written Function rather than autograd through the levels: autograd would
save both halves of every level (2 ceil(log2 L) copies of the (B, D, N, L) states), while here
backward recomputes the states with one forward scan and runs the reverse-time recurrence of
the state gradient, ``g_t = C_t gy_t + a_{t+1} g_{t+1}``, as one more scan of the same kind:
three (B, D, N, L)-sized scans in flight at most, none of them kept between forward and
backward. The price is O(L log L) work instead of O(L), which a GPU absorbs and a CPU does not
(CPU tensors keep the chunked scan unless this backend is forced). The Triton backend reuses
this backward when its own kernel fails to compile or launch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ParallelScan", "export_scan", "linear_scan", "parallel_backward"]


def linear_scan(a: torch.Tensor, x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """``h_t = a_t h_{t-1} + x_t`` along the last dim from ``h_{-1} = 0``; ``reverse`` runs
    ``h_t = a_t h_{t+1} + x_t`` from the end. ``a`` and ``x`` have one shape; returns ``h``.

    Two ping-pong buffers hold the stacked pair (a, x) behind (or ahead of, in reverse) an
    identity pad (1, 0) as long as the largest shift, so each level reads its shifted operand as
    a plain slice: three ops a level (slice, multiply, addcmul), whatever the tensors' size.
    """
    L = a.shape[-1]  # noqa: N806
    if L == 1:
        return x.clone()
    pad = 1 << ((L - 1).bit_length() - 1)  # the largest shift used: largest power of 2 below L
    ident = a.new_tensor([1.0, 0.0]).view(2, *(1,) * a.dim()).expand(2, *a.shape[:-1], pad)
    pair = torch.stack((a, x))
    first = torch.cat((pair, ident) if reverse else (ident, pair), -1)
    bufs = [first, first.clone()]  # the clone brings its own pad
    body = slice(0, L) if reverse else slice(pad, pad + L)
    srcs = [b[..., body] for b in bufs]
    decays = [s[0] for s in srcs]
    keep = a.new_tensor([0.0, 1.0]).view(2, *(1,) * a.dim())  # (a, x) * keep = (0, x)
    cur, s = 0, 1
    while s < L:
        shifted = bufs[cur][..., s:s + L] if reverse else bufs[cur][..., pad - s:pad - s + L]
        # (a, x) o (a', x') = (a a', a x' + x): one addcmul over the stacked pair
        torch.addcmul(srcs[cur] * keep, decays[cur], shifted, out=srcs[1 - cur])
        cur, s = 1 - cur, 2 * s
    return srcs[cur][1]


def _delta(delta, delta_bias, softplus):
    """(pre-softplus delta, delta) as the recurrence sees it."""
    pre = delta if delta_bias is None else delta + delta_bias[:, None]
    return pre, (F.softplus(pre) if softplus else pre)


def _operands(u, dt, A, B, g):  # noqa: N803
    """Decays exp(delta A) and inputs delta u B as (B, G, D/G, N, L)."""
    b, d, l = u.shape  # noqa: E741
    n = A.shape[1]
    dt5 = dt.view(b, g, d // g, 1, l)
    a = torch.exp(dt5 * A.view(g, d // g, n, 1))
    du = dt5 * u.view(b, g, d // g, 1, l)
    return a, du, du * B.unsqueeze(2)


class ParallelScan(torch.autograd.Function):
    """ChunkedScan's signature and semantics on the log-depth scan; saves only its inputs."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):  # noqa: N803
        b, d, l = u.shape  # noqa: E741
        g, n = B.shape[1], A.shape[1]
        _, dt = _delta(delta, delta_bias, delta_softplus)
        a, _, x = _operands(u, dt, A, B, g)
        h = linear_scan(a, x)
        y = (h * C.unsqueeze(2)).sum(-2).view(b, d, l)
        if D is not None:
            y = y.addcmul_(u, D[:, None])
        if z is not None:
            y = y.mul_(F.silu(z))
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.delta_softplus = delta_softplus
        ctx.set_materialize_grads(False)
        return y, h[..., -1].reshape(b, d, n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout, glast):
        return parallel_backward(ctx.saved_tensors, ctx.delta_softplus, ctx.needs_input_grad, gout, glast)


def parallel_backward(saved, delta_softplus, need, gout, glast):
    """Gradients of (u, delta, A, B, C, D, z, delta_bias, delta_softplus) from the saved inputs.

    A function of its own so that the Triton backend can fall back to it in backward."""
    u, delta, A, B, C, D, z, delta_bias = saved[:8]  # noqa: N806
    b, d, l = u.shape  # noqa: E741
    g, n = B.shape[1], A.shape[1]
    pre, dt = _delta(delta, delta_bias, delta_softplus)
    a, du, x = _operands(u, dt, A, B, g)
    h = linear_scan(a, x)
    Cx = C.unsqueeze(2)  # noqa: N806
    gout = torch.zeros_like(u) if gout is None else gout
    gy, gz = gout, None
    if z is not None:
        sz = torch.sigmoid(z)
        gy = gout * z * sz
        if need[6]:
            y = (h * Cx).sum(-2).view(b, d, l)
            y = y if D is None else y.addcmul_(u, D[:, None])
            gz = gout * y * sz * (1 + z * (1 - sz))  # silu'(z) = sz (1 + z (1 - sz))
    gy5 = gy.view(b, g, d // g, 1, l)
    c = gy5 * Cx
    if glast is not None:
        c[..., -1] += glast.view(b, g, d // g, n)
    a_next = torch.roll(a, -1, -1)  # a_{t+1}; the wrapped last one is unused
    gh = linear_scan(a_next, c, reverse=True)
    gC = (gy5 * h).sum(2) if need[4] else None  # noqa: N806
    gB = (gh * du).sum(2) if need[3] else None  # noqa: N806
    gdu = (gh * B.unsqueeze(2)).sum(-2).view(b, d, l)
    # S_t = dL/d(delta_t A) = g_t a_t h_{t-1}, h_{-1} = 0
    s = gh.mul_(a).mul_(F.pad(h[..., :-1], (1, 0)))
    gA = (s * dt.view(b, g, d // g, 1, l)).sum((0, -1)).reshape(d, n) if need[2] else None  # noqa: N806
    gdt = (s * A.view(g, d // g, n, 1)).sum(-2).view(b, d, l).addcmul_(gdu, u)
    if delta_softplus:
        gdt.mul_(torch.sigmoid(pre))
    gu = gdu * dt if D is None else torch.addcmul(gy * D[:, None], gdu, dt)
    gD = (gy * u).sum((0, 2)) if D is not None and need[5] else None  # noqa: N806
    gbias = gdt.sum((0, 2)) if delta_bias is not None and need[7] else None
    return gu, gdt, gA, gB, gC, gD, gz, gbias, None


EXPORT_CHUNK = 8  # steps scanned together before the carries (see _export_states)


def _combine_levels(a: torch.Tensor, x: torch.Tensor, keep_a: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Hillis-Steele along the last dim by slicing and concatenating: (a, x) o (a', x') = (a a', a x' + x).
    Returns the prefix decays (only when ``keep_a``: the last level's are never read otherwise) and states."""
    n, s = x.shape[-1], 1
    while s < n:
        x = torch.cat((x[..., :s], x[..., s:] + a[..., s:] * x[..., :-s]), -1)
        if keep_a or 2 * s < n:
            a = torch.cat((a[..., :s], a[..., s:] * a[..., :-s]), -1)
        s *= 2
    return a, x


def _export_states(a: torch.Tensor, x: torch.Tensor, chunk: int = EXPORT_CHUNK) -> torch.Tensor:
    """``h_t = a_t h_{t-1} + x_t`` along the last dim, as plain ops for an exporter.

    The steps are cut into chunks of ``chunk``; one Split per operand hands out each step of
    every chunk, and the chunks advance together, one step at a time, with multiply-adds; their
    end states are scanned the same way (recursively, on 1/chunk of the data), and each chunk's
    carry-in times its prefix decays is added. The log-depth form instead slices and
    concatenates the whole sequence once per doubling of L, which an ONNX runtime copies at
    every level. Lengths that do not split evenly take the log-depth form.
    """
    n = x.shape[-1]
    if n <= chunk or n % chunk:
        return _combine_levels(a, x, keep_a=False)[1]
    lead, m = x.shape[:-1], n // chunk
    steps_a = a.expand_as(x).reshape(*lead, m, chunk).split(1, -1)  # one Split: each step's column
    steps_x = x.reshape(*lead, m, chunk).split(1, -1)
    hs, decays = [steps_x[0]], [steps_a[0]]
    for ai, xi in zip(steps_a[1:], steps_x[1:]):
        hs.append(xi + ai * hs[-1])
        decays.append(ai * decays[-1])
    ends = _export_states(decays[-1].squeeze(-1), hs[-1].squeeze(-1), chunk)
    carry = torch.cat((torch.zeros_like(ends[..., :1]), ends[..., :-1]), -1).unsqueeze(-1)
    h = torch.cat([hi + di * carry for hi, di in zip(hs, decays)], -1)
    return h.reshape(*lead, n)


def export_scan(u, delta, A, B, C, D, delta_bias):  # noqa: N803
    """ParallelScan's forward (softplus delta, no z) without in-place ops or ``out=``: the form an
    ONNX exporter traces into a fixed graph of slices, multiply-adds and concatenations (the
    combination :func:`linear_scan` uses, in chunks joined by their carries: ``_export_states``)."""
    b, d, l = u.shape  # noqa: E741
    g = B.shape[1] if B.dim() == 4 else 1
    B, C = (t.view(b, 1, *t.shape[1:]) if t.dim() == 3 else t for t in (B, C))  # noqa: N806
    pre = delta if delta_bias is None else delta + delta_bias[:, None]
    dt = F.relu(pre) + torch.log1p(torch.exp(-pre.abs()))  # softplus in ops a runtime vectorises (its own does not)
    a, _, x = _operands(u, dt, A, B, g)
    x = _export_states(a, x)
    y = (x * C.unsqueeze(2)).sum(-2).reshape(b, d, l)
    return y if D is None else y + u * D[:, None]
