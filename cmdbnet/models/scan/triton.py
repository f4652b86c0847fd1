"""The Triton selective scan: forward and backward kernels, compiled just in time at first use.

One program per (batch, group, block of channels, chunk of L) walks its steps in blocks of
``BLOCK_L``. Within a block the recurrence is a ``tl.associative_scan`` over (decay, input)
pairs of a (channels, d_state, BLOCK_L) tile, and the state carried between blocks stays in
registers. Chosen over a sequential loop over single steps because each block then loads its
inputs as contiguous rows of L (a step-by-step loop reads one strided float per channel and
step), and the interpreter (TRITON_INTERPRET=1, how the tests run it on CPU) runs a block in
one numpy call instead of one call per step. The combine ``(a, x) o (a', x') = (a a', a' x + x')``
uses products of decays only, as the chunked scan does. How many channels a program takes and
whether L is cut into chunks (joined by a carry pass) is :mod:`triton_grid`'s choice.

Forward stores the state before every block (the "chunk checkpoints"). Backward walks the
blocks in reverse: it recomputes h_{t-1} of the block from its checkpoint with one more scan
over inputs loaded one step back, runs the reverse-time scan of the state gradient
``g_t = C_t gy_t + a_{t+1} g_{t+1}`` with the carry ``a_{t0} g_{t0}`` handed to the previous
block, and forms every gradient from those. The reverse-time scan is a forward scan over a tile
whose index runs backwards in time (inputs loaded at reversed steps, gy and the result reversed
with ``tl.flip``, a bit-exact permutation): ``associative_scan(reverse=True)`` with a combine
that is not commutative has compiled to wrong results upstream (triton-lang/triton#4362), and
the interpreter cannot show it. Sums over channels (dB, dC) are written per channel block, over
batch and chunks (dA, dD, d delta_bias) per program row, and torch adds them up: no atomics, so
a result does not depend on scheduling.

Offsets that grow with B*D*L or B*D*N*(L / BLOCK_L) are 64-bit (:func:`_rows`, :func:`_bc_base`);
within one B/C row (N x L elements) they stay 32-bit.

The kernels are built by :func:`kernels` at first use, not at import, so ``TRITON_INTERPRET``
is read then (tests set it per test), and importing this module never needs a GPU.
"""

from __future__ import annotations

import functools
import types

import numpy as np
import torch
import triton
import triton.language as tl

from cmdbnet.models.scan.footprint import TRITON_BLOCK_L
from cmdbnet.models.scan.parallel import parallel_backward
from cmdbnet.models.scan.triton_grid import backward_launches, forward_launches

__all__ = ["TritonScan", "backward_launches", "forward_launches", "interpreter_ready", "jitted", "kernels"]

BLOCK_L = TRITON_BLOCK_L


def _combine(a1, x1, a2, x2):
    return a1 * a2, a2 * x1 + x2


def _mul(a, b):
    return a * b


def _softplus(x):
    e = tl.exp(-tl.abs(x))
    # log(1 + e) loses e's digits when e is tiny; its series does not
    small = e * (1.0 - e * (0.5 - e * (1.0 / 3.0)))
    return tl.maximum(x, 0.0) + tl.where(e < 1e-3, small, tl.log(1.0 + e))


def _load_dt(delta_p, bias, rows, t, ok, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):  # noqa: N803
    """(pre-softplus delta, delta) at steps ``t`` of ``rows`` (channel offsets into (B, D, L))."""
    pre = tl.load(delta_p + rows[:, None] + t[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        pre = pre + bias[:, None]
    dt = pre
    if SOFTPLUS:
        dt = _softplus(pre)
    return pre, dt


def _load_bc(ptr, base, sn, sl, offs_n, t, mask_n, mask_t):
    return tl.load(ptr + base + offs_n[:, None] * sn + t[None, :] * sl,
                   mask=mask_n[:, None] & mask_t[None, :], other=0.0).to(tl.float32)


def _rows(b, ch, dim, L, N, offs_n):  # noqa: N803
    """64-bit offsets of channels ``ch`` of batch row ``b``: into (B, D, L) and into (B, D, N)."""
    chan = b.to(tl.int64) * dim + ch
    return chan * L, chan[:, None] * N + offs_n[None, :]


def _bc_base(b, g, sb, sg):
    """64-bit offset of (batch row ``b``, group ``g``) into B or C."""
    return b.to(tl.int64) * sb + g.to(tl.int64) * sg


def _chunk_rows(k, G, dim, N, dn_rows):  # noqa: N803
    """Offsets into a (chunks, B, D, N) buffer at chunk ``k``."""
    return (tl.num_programs(0) // G).to(tl.int64) * dim * N * k + dn_rows


def _program(dim, dg, G, L, N, BLOCK_D: tl.constexpr, N_PAD: tl.constexpr):  # noqa: N803
    """This program's (batch, group, channels and their mask, row and state offsets, d_state
    offsets and masks)."""
    pid_bg, pid_d = tl.program_id(0), tl.program_id(1)
    b, g = pid_bg // G, pid_bg % G
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dg
    ch = g * dg + offs_d
    offs_n = tl.arange(0, N_PAD)
    mask_n = offs_n < N
    rows, dn_rows = _rows(b, ch, dim, L, N, offs_n)
    return b, g, ch, mask_d, rows, dn_rows, offs_n, mask_n, mask_d[:, None] & mask_n[None, :]


def _params(A_p, bias_p, D_p, ch, offs_n, N, mask_d, mask_dn,  # noqa: N803
            HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr):  # noqa: N803
    """A (channels, d_state), delta_bias and D of this program's channels (0.0 when absent)."""
    A = tl.load(A_p + ch[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_p + ch, mask=mask_d, other=0.0).to(tl.float32)
    Dv = 0.0
    if HAS_D:
        Dv = tl.load(D_p + ch, mask=mask_d, other=0.0).to(tl.float32)
    return A, bias, Dv


def _states_before(delta_p, u_p, B_p, bias, rows, A, Bbase, sBn, sBl, offs_n, mask_d, mask_n,  # noqa: N803
                   t, t0, L, h0, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):  # noqa: N803
    """h_{t-1} at steps ``t`` of the block starting at ``t0`` with state ``h0``: the scan over the
    inputs loaded one step back (no division by a decay, which may have underflowed)."""
    tp = t - 1
    mp = (tp >= t0) & (tp < L)
    okp = mask_d[:, None] & mp[None, :]
    _, dtp = _load_dt(delta_p, bias, rows, tp, okp, HAS_BIAS, SOFTPLUS)
    up = tl.load(u_p + rows[:, None] + tp[None, :], mask=okp, other=0.0).to(tl.float32)
    Bp = _load_bc(B_p, Bbase, sBn, sBl, offs_n, tp, mask_n, mp)  # noqa: N806
    ap = tl.where(mp[None, None, :], tl.exp(dtp[:, None, :] * A[:, :, None]), 1.0)
    acp, xcp = tl.associative_scan((ap, (dtp * up)[:, None, :] * Bp[None, :, :]), 2, _combine)
    return xcp + acp * h0[:, :, None]


def _state_grads(delta_p, C_p, gout_p, bias, rows, A, Cbase, sCn, sCl, offs_n, mask_d, mask_n,  # noqa: N803
                 gy, t0, end, L, carry, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,  # noqa: N803
                 SOFTPLUS: tl.constexpr, BL: tl.constexpr):  # noqa: N803
    """g_t = C_t gy_t + a_{t+1} g_{t+1} over the block, in time order; the carry from the next
    block enters at its last step. Scanned forward over a tile whose index j holds step
    t0 + BL - 1 - j: inputs loaded at those steps (gy, computed in time order, flipped)."""
    tr = t0 + (BL - 1) - tl.arange(0, BL)
    mr = tr < L
    tn = tr + 1
    mn = tn < end
    _, dtn = _load_dt(delta_p, bias, rows, tn, mask_d[:, None] & mn[None, :], HAS_BIAS, SOFTPLUS)
    an = tl.where(mn[None, None, :], tl.exp(dtn[:, None, :] * A[:, :, None]), 1.0)
    if HAS_Z:
        gyr = tl.flip(gy, 1)
    else:  # gy is the output gradient itself
        gyr = tl.load(gout_p + rows[:, None] + tr[None, :], mask=mask_d[:, None] & mr[None, :], other=0.0)
    Cr = _load_bc(C_p, Cbase, sCn, sCl, offs_n, tr, mask_n, mr)  # noqa: N806
    cg = gyr.to(tl.float32)[:, None, :] * Cr[None, :, :]
    cg = cg + tl.where((tr == end - 1)[None, None, :], carry[:, :, None], 0.0)
    _, ghr = tl.associative_scan((an, cg), 2, _combine)
    return tl.flip(ghr, 2)


def _gate_backward(gout_p, z_p, gz_p, rows, t, ok, h, Ct, uu, Dv,  # noqa: N803
                   HAS_Z: tl.constexpr, HAS_D: tl.constexpr, LOCAL: tl.constexpr):  # noqa: N803
    """The gradient reaching y through the silu(z) gate; stores dL/dz (but in the carry pass)."""
    go = tl.load(gout_p + rows[:, None] + t[None, :], mask=ok, other=0.0).to(tl.float32)
    gy = go
    if HAS_Z:
        zz = tl.load(z_p + rows[:, None] + t[None, :], mask=ok, other=0.0).to(tl.float32)
        sz = tl.sigmoid(zz)
        gy = go * zz * sz
        if not LOCAL:
            y = tl.sum(h * Ct[None, :, :], 1)
            if HAS_D:
                y = y + uu * Dv[:, None]
            tl.store(gz_p + rows[:, None] + t[None, :], go * y * sz * (1.0 + zz * (1.0 - sz)), mask=ok)
    return gy


def _fwd(u_p, delta_p, A_p, B_p, C_p, D_p, z_p, bias_p, out_p, states_p, last_p, hloc_p, prod_p,  # noqa: N803
         dim, dg, G, L, N, n_blocks, chunk, n_chunks, sBb, sBg, sBn, sBl, sCb, sCg, sCn, sCl,  # noqa: N803
         HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
         LOCAL: tl.constexpr, BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, BL: tl.constexpr):
    """Chunk k = program_id(2). LOCAL: its scan from a zero state, keeping the end state and the
    product of decays; else: from the carry of the chunks before, storing everything."""
    b, g, ch, mask_d, rows, dn_rows, offs_n, mask_n, mask_dn = _program(dim, dg, G, L, N, BLOCK_D, N_PAD)
    A, bias, Dv = _params(A_p, bias_p, D_p, ch, offs_n, N, mask_d, mask_dn, HAS_BIAS, HAS_D)
    Bbase, Cbase = _bc_base(b, g, sBb, sBg), _bc_base(b, g, sCb, sCg)  # noqa: N806
    k = tl.program_id(2)
    h = tl.zeros((BLOCK_D, N_PAD), dtype=tl.float32)
    prod = tl.full((BLOCK_D, N_PAD), 1.0, tl.float32)
    if not LOCAL:
        for j in range(0, k):
            r = _chunk_rows(j, G, dim, N, dn_rows)
            h = tl.load(prod_p + r, mask=mask_dn, other=0.0) * h + tl.load(hloc_p + r, mask=mask_dn, other=0.0)
    last_col = (tl.arange(0, BL) == BL - 1)[None, None, :]
    for c in range(k * chunk, tl.minimum(k * chunk + chunk, n_blocks)):
        if not LOCAL:
            tl.store(states_p + dn_rows * n_blocks + c, h, mask=mask_dn)
        t = c * BL + tl.arange(0, BL)
        mask_t = t < L
        ok = mask_d[:, None] & mask_t[None, :]
        _, dt = _load_dt(delta_p, bias, rows, t, ok, HAS_BIAS, SOFTPLUS)
        uu = tl.load(u_p + rows[:, None] + t[None, :], mask=ok, other=0.0).to(tl.float32)
        Bt = _load_bc(B_p, Bbase, sBn, sBl, offs_n, t, mask_n, mask_t)  # noqa: N806
        a = tl.where(mask_t[None, None, :], tl.exp(dt[:, None, :] * A[:, :, None]), 1.0)  # past L: identity
        x = (dt * uu)[:, None, :] * Bt[None, :, :]
        ac, xc = tl.associative_scan((a, x), 2, _combine)
        hs = xc + ac * h[:, :, None]
        if LOCAL:
            prod = prod * tl.sum(tl.where(last_col, ac, 0.0), 2)
        else:
            Ct = _load_bc(C_p, Cbase, sCn, sCl, offs_n, t, mask_n, mask_t)  # noqa: N806
            y = tl.sum(hs * Ct[None, :, :], 1)
            if HAS_D:
                y = y + uu * Dv[:, None]
            if HAS_Z:
                zz = tl.load(z_p + rows[:, None] + t[None, :], mask=ok, other=0.0).to(tl.float32)
                y = y * zz * tl.sigmoid(zz)
            tl.store(out_p + rows[:, None] + t[None, :], y, mask=ok)
        # masked steps are identities, so the block's last column is the state after its last step
        h = tl.sum(tl.where(last_col, hs, 0.0), 2)
    if LOCAL:
        r = _chunk_rows(k, G, dim, N, dn_rows)
        tl.store(hloc_p + r, h, mask=mask_dn)
        tl.store(prod_p + r, prod, mask=mask_dn)
    else:
        tl.store(last_p + dn_rows, h, mask=mask_dn & (k == n_chunks - 1))


def _bwd(u_p, delta_p, A_p, B_p, C_p, D_p, z_p, bias_p, states_p, gout_p, glast_p, gcar_p, prod_p,  # noqa: N803
         gu_p, gdelta_p, gz_p, gB_p, gC_p, gA_p, gD_p, gbias_p,  # noqa: N803
         dim, dg, G, L, N, n_blocks, n_dblk, chunk, n_chunks, c_first,  # noqa: N803
         sBb, sBg, sBn, sBl, sCb, sCg, sCn, sCl,  # noqa: N803
         HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
         HAS_GLAST: tl.constexpr, LOCAL: tl.constexpr, BLOCK_D: tl.constexpr, N_PAD: tl.constexpr,
         BL: tl.constexpr):
    """Chunk k = program_id(2) + c_first, its blocks in reverse. LOCAL: from a zero gradient,
    keeping the carry it hands back and its product of decays; else: from the carry folded over
    the chunks after it, storing every gradient."""
    b, g, ch, mask_d, rows, dn_rows, offs_n, mask_n, mask_dn = _program(dim, dg, G, L, N, BLOCK_D, N_PAD)
    A, bias, Dv = _params(A_p, bias_p, D_p, ch, offs_n, N, mask_d, mask_dn, HAS_BIAS, HAS_D)
    Bbase, Cbase = _bc_base(b, g, sBb, sBg), _bc_base(b, g, sCb, sCg)  # noqa: N806
    k = tl.program_id(2) + c_first
    # sums of the (channel block) programs: per (b, g, block, n, t) for dB, dC
    bc_rows = ((tl.program_id(0) * n_dblk + tl.program_id(1)) * N + offs_n[:, None]).to(tl.int64) * L
    carry = tl.zeros((BLOCK_D, N_PAD), dtype=tl.float32)
    prod = tl.full((BLOCK_D, N_PAD), 1.0, tl.float32)
    if not LOCAL:
        if HAS_GLAST:
            carry = tl.load(glast_p + dn_rows, mask=mask_dn, other=0.0).to(tl.float32)
        for i in range(0, n_chunks - 1 - k):
            r = _chunk_rows(n_chunks - 1 - i, G, dim, N, dn_rows)
            carry = tl.load(gcar_p + r, mask=mask_dn, other=0.0) + tl.load(prod_p + r, mask=mask_dn, other=0.0) * carry
    gA = tl.zeros((BLOCK_D, N_PAD), dtype=tl.float32)  # noqa: N806
    gD, gbias = tl.zeros((BLOCK_D,), dtype=tl.float32), tl.zeros((BLOCK_D,), dtype=tl.float32)  # noqa: N806
    idx = tl.arange(0, BL)
    hi = tl.minimum(k * chunk + chunk, n_blocks)
    for i in range(0, hi - k * chunk):
        c = hi - 1 - i
        t0 = c * BL
        t = t0 + idx
        end = tl.minimum(t0 + BL, L)
        mask_t = t < L
        ok = mask_d[:, None] & mask_t[None, :]
        pre, dt = _load_dt(delta_p, bias, rows, t, ok, HAS_BIAS, SOFTPLUS)
        uu = tl.load(u_p + rows[:, None] + t[None, :], mask=ok, other=0.0).to(tl.float32)
        Bt = _load_bc(B_p, Bbase, sBn, sBl, offs_n, t, mask_n, mask_t)  # noqa: N806
        Ct = _load_bc(C_p, Cbase, sCn, sCl, offs_n, t, mask_n, mask_t)  # noqa: N806
        a = tl.where(mask_t[None, None, :], tl.exp(dt[:, None, :] * A[:, :, None]), 1.0)
        du = dt * uu
        x = du[:, None, :] * Bt[None, :, :]
        # h_{t-1}: the scan over the inputs one step back, from the block's checkpoint
        h0 = tl.load(states_p + dn_rows * n_blocks + c, mask=mask_dn, other=0.0)
        hprev = _states_before(delta_p, u_p, B_p, bias, rows, A, Bbase, sBn, sBl, offs_n, mask_d, mask_n,
                               t, t0, L, h0, HAS_BIAS, SOFTPLUS)
        h = a * hprev + x
        gy = _gate_backward(gout_p, z_p, gz_p, rows, t, ok, h, Ct, uu, Dv, HAS_Z, HAS_D, LOCAL)
        gh = _state_grads(delta_p, C_p, gout_p, bias, rows, A, Cbase, sCn, sCl, offs_n, mask_d, mask_n,
                          gy, t0, end, L, carry, HAS_Z, HAS_BIAS, SOFTPLUS, BL)
        carry = tl.sum(tl.where((idx == 0)[None, None, :], a * gh, 0.0), 2)
        if LOCAL:
            prod = prod * tl.reduce(a, 2, _mul)
        else:
            mask_nt = mask_n[:, None] & mask_t[None, :]
            tl.store(gC_p + bc_rows + t[None, :], tl.sum(gy[:, None, :] * h, 0), mask=mask_nt)
            tl.store(gB_p + bc_rows + t[None, :], tl.sum(gh * du[:, None, :], 0), mask=mask_nt)
            gdu = tl.sum(gh * Bt[None, :, :], 1)
            s = gh * a * hprev  # dL/d(delta_t A)
            gA += tl.sum(s * dt[:, None, :], 2)
            gdt = gdu * uu + tl.sum(s * A[:, :, None], 1)
            gu = gdu * dt
            if HAS_D:
                gu = gu + gy * Dv[:, None]
                gD += tl.sum(gy * uu, 1)
            if SOFTPLUS:
                gdt = gdt * tl.sigmoid(pre)
            gbias += tl.sum(gdt, 1)
            tl.store(gu_p + rows[:, None] + t[None, :], gu, mask=ok)
            tl.store(gdelta_p + rows[:, None] + t[None, :], gdt, mask=ok)
    r = _chunk_rows(k, G, dim, N, dn_rows)
    if LOCAL:
        tl.store(gcar_p + r, carry, mask=mask_dn)
        tl.store(prod_p + r, prod, mask=mask_dn)
    else:  # per (chunk, batch row): torch sums them
        tl.store(gA_p + r, gA, mask=mask_dn)
        rd = ((k * (tl.num_programs(0) // G) + b).to(tl.int64) * dim + ch)
        tl.store(gD_p + rd, gD, mask=mask_d)
        tl.store(gbias_p + rd, gbias, mask=mask_d)


def _loop_bound(x) -> int:
    data = getattr(getattr(x, "handle", None), "data", None)
    return int(np.asarray(data).reshape(-1)[0]) if data is not None else int(getattr(x, "value", x))


def _interpreted_range(*bounds):
    """``range`` for the interpreted kernels: Triton 3.6's interpreter hands scalars over as
    1-element arrays, whose ``int()`` numpy >= 2.3 refuses (3.8 squeezes them itself)."""
    return range(*(_loop_bound(x) for x in bounds))


@functools.cache
def jitted(interpret: bool) -> dict:
    """The module's namespace with every kernel and helper jitted, once per value of
    TRITON_INTERPRET (triton.jit reads the flag itself).

    The helpers are jitted first and the kernels see them through their own globals, so one
    module serves both the compiler and the interpreter.
    """
    scope = dict(globals())
    if interpret:
        scope["range"] = _interpreted_range

    def jit(f):
        copy = types.FunctionType(f.__code__, scope, f.__name__)
        copy.__annotations__ = dict(f.__annotations__)
        return triton.jit(copy)

    for f in (_combine, _mul, _softplus, _load_dt, _load_bc, _rows, _bc_base, _chunk_rows, _program, _params,
              _states_before, _state_grads, _gate_backward, _fwd, _bwd):
        scope[f.__name__] = jit(f)
    return scope


def kernels(interpret: bool) -> tuple:
    """(forward, backward) kernels for this value of TRITON_INTERPRET."""
    scope = jitted(bool(interpret))
    return scope["_fwd"], scope["_bwd"]


def interpreter_ready() -> bool:
    """Whether CPU tensors can run the kernels: TRITON_INTERPRET=1 was set before triton was
    imported (Triton's own builtins, such as ``tl.zeros``, are jitted at its import)."""
    return bool(triton.knobs.runtime.interpret) and not isinstance(tl.zeros, triton.runtime.jit.JITFunction)


def _sm_count(device: torch.device) -> int:
    """Multiprocessors of the card; 0 off CUDA (the interpreter): 16-channel programs, no chunks."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def _launch(kernel, launches) -> None:
    for grid, args, kw in launches:
        kernel[grid](*args, **kw)


class TritonScan(torch.autograd.Function):
    """ChunkedScan's signature and semantics in two Triton kernels; fp32 inputs only (the
    dispatch wrapper upcasts). Saves its inputs and the (B, D, N, L / BLOCK_L) checkpoints.

    ``on_failure(exc)``, set by the dispatcher, decides what a backward kernel that fails to
    compile or launch does: True runs the torch parallel backward instead, False re-raises.
    (Forward failures the dispatcher catches itself.)
    """

    on_failure = staticmethod(lambda exc: False)

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):  # noqa: N803
        u, delta, A = u.contiguous(), delta.contiguous(), A.contiguous()
        D, z, delta_bias = (None if t is None else t.contiguous() for t in (D, z, delta_bias))
        out, last, states, launches = forward_launches(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                       _sm_count(u.device))
        _launch(kernels(triton.knobs.runtime.interpret)[0], launches)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.delta_softplus = bool(delta_softplus)
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout, glast):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        gout = torch.zeros_like(u) if gout is None else gout.contiguous()
        glast = None if glast is None else glast.contiguous()
        try:
            launches, finish = backward_launches(u, delta, A, B, C, D, z, delta_bias, states, ctx.delta_softplus,
                                                 gout, glast, _sm_count(u.device))
            _launch(kernels(triton.knobs.runtime.interpret)[1], launches)
            return finish()
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any compile or launch error; on_failure decides
            if not TritonScan.on_failure(exc):
                raise
            return parallel_backward(ctx.saved_tensors, ctx.delta_softplus, ctx.needs_input_grad, gout, glast)
