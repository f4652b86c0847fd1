"""The torch selective scan: chunked sequential recurrence with a hand-written reverse-time backward.

Runs on any device; on CPU it is the default. Backward recomputes each chunk's states from
checkpointed chunk starts, so memory never exceeds one chunk of per-step states.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cmdbnet.models.scan.buffers import Scratch, load, run_parts, softplus, store

__all__ = ["KEEP_ALL_MAX_N", "ChunkedScan", "chunk_plan", "state_bytes"]

# Elements of one (T, B, D, N) state buffer (four are live in backward) and of one (T2, B, D)
# block of per-step inputs: 2 MiB and 1 MiB in fp32 stay in a small CPU's L2/L3, where the scan
# is bandwidth-bound. Profiling sizes ctx.states through chunk_plan and KEEP_ALL_MAX_N.
_CHUNK_ELEMS = 1 << 19
_BLOCK_ELEMS = 1 << 18
_MAX_CHUNK = 256
# With every state kept (d_state <= KEEP_ALL_MAX_N) a chunk's length no longer sets what is
# saved, and longer chunks make the two-level scan's ops wider: only _CHUNK_ELEMS bounds them.
_MAX_CHUNK_KEPT = 1024
# At d_state <= 2 every state costs no more than the inputs: keep them all in forward so
# backward skips recomputing each chunk (the recompute was 40% of backward at d_state 1).
KEEP_ALL_MAX_N = 2
# Floats per time step (B*D*N) below which one op per step costs more in overhead than in
# arithmetic, so the scan runs in two levels (see _scan_forward).
_TWO_LEVEL_MAX_STEP = 1 << 13


# Inside the Function everything is time-major. Per-step inputs (delta, u, z, B, C, the
# incoming gradient) are copied T2 steps (a block) at a time into (T2, B, G, 1, D/G) or
# (T2, B, G, N, 1) buffers, and states T <= T2 steps (a chunk) at a time into (T, B, G, N, D/G)
# ones: time outermost makes each step's state one contiguous block (one fused addcmul_ per
# step), and N before D/G makes the sums over N outer reductions. The (B, D, L)-sized pointwise
# work (bias, softplus, D, z) is done per block too: whole-tensor temporaries cost more in page
# faults and cache misses than the scan itself on a small CPU.


def chunk_plan(b: int, d: int, l: int, n: int) -> tuple[int, int]:  # noqa: E741
    """(T, T2): chunk and block lengths; T2 is a multiple of T so chunks never straddle blocks."""
    cap = _MAX_CHUNK_KEPT if n <= KEEP_ALL_MAX_N else _MAX_CHUNK
    T = max(1, min(l, cap, _CHUNK_ELEMS // (b * d * n)))
    return T, min(l, T * max(1, _BLOCK_ELEMS // (T * b * d)))


def _chunk_states(dt, du, Bc, At, h0, a, x, p):
    """Fill ``a`` with exp(delta*A) and ``x`` with the chunk's states, starting from ``h0``.

    Sequential over time on purpose: each step is one bandwidth-bound addcmul_ over B*D*N
    contiguous floats, which beats log-depth parallel scans (2-3x the memory traffic) on CPU
    and never overflows the way a cumulative-log-decay closed form does for long chunks.
    Where a step is too small to pay for an op (d_state 1-2), see :func:`_scan_forward`.
    """
    torch.mul(dt, At, out=a).exp_()
    torch.mul(du, Bc, out=x)
    _scan_forward(x, a, h0, p)


def _sub_length(k: int, step: int) -> int:
    """Sub-chunk length of a two-level scan over ``k`` steps of ``step`` floats (``k``: sequential).

    Two levels cost about 2 sqrt(k) ops instead of k, for twice the memory traffic: they pay
    only while a step is small enough for the per-op overhead to dominate.
    """
    return k if step > _TWO_LEVEL_MAX_STEP or k < 16 else max(2, math.isqrt(k))


def _scan_forward(x, a, h0, p):
    """x_t += a_t x_{t-1} along dim 0 in place, x_{-1} = h0 (or 0); ``p`` is scratch like ``x``.

    Two levels: scan m sub-chunks of c steps side by side (each op covers m steps), carry the
    sub-chunk ends across with the sub-chunks' decay products (cumprod of decays, in [0, 1]),
    then add each sub-chunk's incoming state times the decay products to its steps.
    """
    k, c = x.shape[0], _sub_length(x.shape[0], x[0].numel())
    m = k // c
    if h0 is not None:
        x[0].addcmul_(a[0], h0)
    if m > 1:
        X, A = x[:m * c].view(m, c, *x.shape[1:]), a[:m * c].view(m, c, *x.shape[1:])
        xs, as_ = X.unbind(1), A.unbind(1)  # views made once: a Python-level index costs an op too
        for t in range(1, c):
            xs[t].addcmul_(as_[t], xs[t - 1])
        P = torch.cumprod(A, dim=1, out=p[:m * c].view(A.shape))
        ends, decays = X[:, -1].unbind(0), P[:, -1].unbind(0)
        for j in range(1, m):
            ends[j].addcmul_(decays[j], ends[j - 1])
        X[1:, :-1].addcmul_(P[1:, :-1], X[:-1, -1:])
    for t in range(m * c if m > 1 else 1, k):
        x[t].addcmul_(a[t], x[t - 1])


def _scan_reverse(g, a, q):
    """g_t += a_{t+1} g_{t+1} along dim 0 in place (the adjoint of :func:`_scan_forward`).

    Two levels as there, with the sub-chunks aligned to the end and the short remainder at
    the start; ``q`` (scratch like ``g``) holds each step's decay product to its sub-chunk end.
    """
    k, c = g.shape[0], _sub_length(g.shape[0], g[0].numel())
    m = k // c
    r = k - m * c
    if m > 1:
        G, A, Q = (t[r:].view(m, c, *g.shape[1:]) for t in (g, a, q))
        gs, as_, qs = G.unbind(1), A.unbind(1), Q.unbind(1)
        qs[-1].fill_(1.0)
        for t in range(c - 2, -1, -1):
            gs[t].addcmul_(as_[t + 1], gs[t + 1])
            torch.mul(qs[t + 1], as_[t + 1], out=qs[t])
        R = Q[:-1, 0].mul_(A[1:, 0]).unbind(0)  # decay from a sub-chunk's first step to the next one's
        firsts = G[:, 0].unbind(0)
        for j in range(m - 2, -1, -1):
            firsts[j].addcmul_(R[j], firsts[j + 1])
        G[:-1, 1:].addcmul_(Q[:-1, 1:], torch.mul(A[1:, 0], G[1:, 0]).unsqueeze(1))
    for t in range(r - 1 if m > 1 else k - 2, -1, -1):
        g[t].addcmul_(a[t + 1], g[t + 1])


def _dot(x, v, out, tmp):
    """out = x @ v.mT, x (..., N, D/G), v (..., 1, D/G): at N = 1 a multiply and a sum, which on
    CPU beat a batched matmul of thousands of 1 x D/G by D/G x 1 products."""
    if x.shape[-2] != 1:
        return torch.matmul(x, v.mT, out=out)
    return torch.sum(torch.mul(x, v, out=tmp), dim=-1, keepdim=True, out=out)


def _sum_n(x, v, out, tmp):
    """out = (x * v).sum over N (dim -2), written straight into ``out`` at N = 1."""
    if x.shape[-2] == 1:
        return torch.mul(x, v, out=out)
    return torch.sum(torch.mul(x, v, out=tmp), dim=-2, keepdim=True, out=out)


def _outer(b, g, out):
    """out = b.mT @ g, b (..., N, 1), g (..., N, D/G): at N = 1 exactly a broadcast multiply."""
    return torch.matmul(b.mT, g, out=out) if b.shape[-2] != 1 else torch.mul(g, b, out=out)


class _Part:
    """One batch slice's share of the scan; workers each run one and write disjoint outputs."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, softplus, sl=slice(None)):  # noqa: N803
        (b, d, self.l), self.g, self.n = u.shape, B.shape[1], A.shape[1]
        self.T, self.T2 = chunk_plan(b, d, self.l, self.n)  # of the whole batch: chunks match ctx.states
        self.u, self.delta, self.z, self.B, self.C = (t if t is None else t[sl] for t in (u, delta, z, B, C))
        dg = d // self.g
        self.At = A.view(self.g, dg, self.n).transpose(1, 2).contiguous()
        self.bias, self.Dv = (t if t is None else t.view(self.g, 1, dg) for t in (delta_bias, D))
        self.softplus, self.ws = softplus, Scratch(u)
        self.state = (self.u.shape[0], self.g, self.n, dg)

    def blocks(self, reverse=False):
        """Per block: (s0, s1, [(chunk index, chunk length, its steps within the block), ...])."""
        T, T2, l = self.T, self.T2, self.l  # noqa: E741
        for s0 in reversed(range(0, l, T2)) if reverse else range(0, l, T2):
            s1 = min(s0 + T2, l)
            chunks = [(t0 // T, min(T, s1 - t0), slice(t0 - s0, min(t0 + T, s1) - s0))
                      for t0 in range(s0, s1, T)]
            yield s0, s1, chunks[::-1] if reverse else chunks

    def load(self, name, x, s0, s1):
        """Steps s0..s1-1 of a (B, D, L) tensor as (T2, B, G, 1, D/G)."""
        return load(self.ws, name, x, s0, s1).view(s1 - s0, *self.state[:2], 1, -1)

    def inputs(self, s0, s1):
        """Per-step inputs of steps s0..s1-1: (delta before softplus, delta, u, delta*u, B, C)."""
        pre = self.load("pre", self.delta, s0, s1)
        pre = pre if self.bias is None else pre.add_(self.bias)
        dt = softplus(self.ws, pre) if self.softplus else pre
        uc = self.load("u", self.u, s0, s1)
        du = torch.mul(dt, uc, out=self.ws("du", *uc.shape))
        Bc, Cc = (load(self.ws, name, t, s0, s1).unsqueeze(-1) for name, t in (("B", self.B), ("C", self.C)))
        return pre, dt, uc, du, Bc, Cc

    def forward(self, out, states, full=None):
        ws = self.ws
        for s0, s1, chunks in self.blocks():
            _, dt, uc, du, Bc, Cc = self.inputs(s0, s1)
            y = ws("y", *uc.shape)
            for c, k, r in chunks:
                a, x, p = (ws(name, k, *self.state) for name in ("a", "x", "p"))
                _chunk_states(dt[r], du[r], Bc[r], self.At, states[c] if c else None, a, x, p)
                states[c + 1].copy_(x[-1])
                if full is not None:
                    full[s0 + r.start:s0 + r.stop].copy_(x)
                # Not a matmul as in backward: FlopCounterMode would count it, and profiling.complexity
                # counts the scan by scan_macs instead, whether or not a worker thread runs it.
                _sum_n(x, Cc[r], y[r], a)
            if self.Dv is not None:
                y.addcmul_(uc, self.Dv)
            if self.z is not None:
                y.mul_(F.silu(self.load("z", self.z, s0, s1), inplace=True))
            store(ws, out, s0, s1, y)

    # Long on purpose: one reverse-time pass per block, whose buffers are shared step to step.
    def backward(self, gout, glast, states, need, grads, full=None):
        """Fill this slice of ``grads`` {0: u, 1: delta, 3: B, 4: C, 6: z} and return its own
        {2: A, 5: D, 7: delta_bias} gradients, which the caller adds up over the slices."""
        ws, Dv, At = self.ws, self.Dv, self.At
        need_delta, gz = need[1] or need[7], grads.get(6)
        carry = None if glast is None else glast.reshape(*self.state[:2], -1, self.n).transpose(-1, -2)
        gA_acc = ws("gA_acc", self.T, *self.state).zero_() if need[2] else None
        sums = {i: At.new_zeros(self.g, 1, self.state[-1]) for i in (5, 7) if need[i]}
        for s0, s1, chunks in self.blocks(reverse=True):
            pre, dt, uc, du, Bc, Cc = self.inputs(s0, s1)
            gy = self.load("gy", gout, s0, s1)
            if self.z is not None:  # make gy the gradient reaching y, through the silu(z) gate
                zc = self.load("z", self.z, s0, s1)
                sz = torch.sigmoid(zc, out=ws("sz", *zc.shape))
                silu = zc.mul_(sz)
                if gz is not None:  # dL/dz = gout * y * silu'(z), silu' = sz + silu (1 - sz)
                    gz_b = torch.mul(silu, sz, out=ws("gz", *zc.shape)).neg_().add_(silu).add_(sz).mul_(gy)
                gy.mul_(silu)
            yb = ws("y", *uc.shape) if gz is not None else None
            gdu = ws("gdu", *uc.shape) if need[0] or need_delta else None
            gdtA = ws("gdtA", *uc.shape) if need_delta else None
            gBb, gCb = (ws(f"g{i}", *Bc.shape) if i in grads else None for i in (3, 4))
            for c, k, r in chunks:
                a, x, gx, w = (ws(name, k, *self.state) for name in ("a", "x", "gx", "w"))
                h0 = states[c] if c else None
                if full is None:
                    _chunk_states(dt[r], du[r], Bc[r], At, h0, a, x, w)
                else:  # states kept by forward: only the decays are recomputed
                    torch.mul(dt[r], At, out=a).exp_()
                    x = full[s0 + r.start:s0 + r.stop]
                if yb is not None:
                    torch.matmul(Cc[r].mT, x, out=yb[r])
                if gCb is not None:  # the sum over D/G, as (N, D/G) @ (D/G, 1)
                    _dot(x, gy[r], gCb[r], w)
                # Reverse-time scan of dL/dx_t: gx_t = gy_t C_t + exp(delta_{t+1} A) gx_{t+1}.
                torch.mul(gy[r], Cc[r], out=gx)
                if carry is not None:
                    gx[-1].add_(carry)
                _scan_reverse(gx, a, w)
                if gBb is not None:
                    _dot(gx, du[r], gBb[r], w)
                if gdu is not None:
                    _outer(Bc[r], gx, gdu[r])
                a.mul_(gx)  # a_t = dL/dx_{t-1} via the decay; a_0 is what the previous chunk gets
                carry = ws("carry", *self.state).copy_(a[0]) if c else None
                if need_delta or need[2]:  # S_t = dL/d(delta_t A) = a_t * x_{t-1}
                    a[1:].mul_(x[:-1])
                    a[0].mul_(h0) if c else a[0].zero_()
                    if gA_acc is not None:
                        gA_acc[:k].addcmul_(a, dt[r])
                    if gdtA is not None:
                        _sum_n(a, At, gdtA[r], w)
            tmp = ws("tmp", *uc.shape)
            if gz is not None:
                store(ws, gz, s0, s1, gz_b.mul_(yb if Dv is None else yb.addcmul_(uc, Dv)))
            if 5 in sums:
                sums[5] += torch.mul(gy, uc, out=tmp).sum((0, 1))
            if 0 in grads:
                gu = torch.mul(gdu, dt, out=tmp)
                store(ws, grads[0], s0, s1, gu if Dv is None else gu.addcmul_(gy, Dv))
            if need_delta:
                gdt = gdtA.addcmul_(gdu, uc)
                if self.softplus:
                    gdt.mul_(torch.sigmoid(pre, out=tmp))
                if 1 in grads:
                    store(ws, grads[1], s0, s1, gdt)
                if 7 in sums:
                    sums[7] += gdt.sum((0, 1))
            for i, val in ((3, gBb), (4, gCb)):
                if val is not None:
                    store(ws, grads[i], s0, s1, val)
        sums = {i: t.reshape(-1) for i, t in sums.items()}
        if gA_acc is not None:
            sums[2] = gA_acc.sum((0, 1)).transpose(1, 2).reshape(-1, self.n)
        return sums


class ChunkedScan(torch.autograd.Function):
    """Chunked scan; backward recomputes each chunk's states from checkpointed chunk starts.

    ``ctx.states`` (chunks + 1, B, G, N, D/G) holds the state before every chunk and the last
    one: the only activation saved beyond the inputs (profiling.tracing models it).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):  # noqa: N803
        b, d, l = u.shape  # noqa: E741
        g, n = B.shape[1], A.shape[1]
        states = u.new_empty((math.ceil(l / chunk_plan(b, d, l, n)[0]) + 1, b, g, n, d // g))
        states[0].zero_()
        out = u.new_empty((b, d, l))
        full = u.new_empty((l, b, g, n, d // g)) if n <= KEEP_ALL_MAX_N and any(ctx.needs_input_grad) else None
        args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        run_parts(u, lambda sl: _Part(*args, sl).forward(out[sl], states[:, sl],
                                                          None if full is None else full[:, sl]))
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.states, ctx.full, ctx.delta_softplus = states, full, delta_softplus
        ctx.set_materialize_grads(False)  # an unused last_state costs no zeros tensor in backward
        return out, states[-1].transpose(-1, -2).reshape(b, d, n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout, glast):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        args, need = (u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus), ctx.needs_input_grad
        gout = torch.zeros_like(u) if gout is None else gout
        grads = {i: u.new_empty(t.shape) for i, t in ((0, u), (1, delta), (3, B), (4, C), (6, u)) if need[i]}

        def part(sl):
            mine = {i: t[sl] for i, t in grads.items()}
            last = None if glast is None else glast[sl]
            full = None if ctx.full is None else ctx.full[:, sl]
            return _Part(*args, sl).backward(gout[sl], last, ctx.states[:, sl], need, mine, full)

        sums = run_parts(u, part)
        grads.update({i: sum(s[i] for s in sums) for i in sums[0]})
        return (*(grads.get(i) for i in range(8)), None)


def state_bytes(b: int, d: int, l: int, n: int) -> int:  # noqa: E741
    """Bytes of ``ctx.states``: the fp32 state before every chunk and the last one."""
    return (math.ceil(l / chunk_plan(b, d, l, n)[0]) + 1) * b * d * n * 4
