"""The selective scan's sequential reference and test inputs, shared by every scan backend's tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cmdbnet.models import scan


def reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """mamba_ssm's selective_scan_ref, in fp64: autograd through a Python loop over L."""
    dtype_in = u.dtype
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].double()
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, l = u.shape
    B, C = (_per_channel(t, b, d, l) for t in (B, C))
    x = u.new_zeros((b, d, A.shape[1]))
    ys = []
    for i in range(l):
        x = torch.exp(delta[:, :, i, None] * A) * x + delta[:, :, i, None] * B[..., i] * u[:, :, i, None]
        ys.append((x * C[..., i]).sum(-1))
    out = torch.stack(ys, dim=2)
    if D is not None:
        out = out + u * D.double()[:, None]
    if z is not None:
        out = out * F.silu(z.double())
    out = out.to(dtype_in)
    return (out, x) if return_last_state else out


def _per_channel(t, b, d, l):  # noqa: E741
    """B or C as (b, d, n, l): groups repeated, (b, n, l) shared, time-invariant (d, n) held over L."""
    if t.dim() == 2:
        return t[None, :, :, None].expand(b, d, -1, l)
    return t.repeat_interleave(d // t.shape[1], 1) if t.dim() == 4 else t[:, None].expand(b, d, -1, -1)


def make_inputs(b, d, l, n, form, *, D=False, z=False, bias=False, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, positive=False):
        t = scale * torch.randn(*shape, generator=g)
        return (t.abs() if positive else t).to(dtype).requires_grad_()

    bc_shape = {"3d": (b, n, l), "g1": (b, 1, n, l), "g2": (b, 2, n, l), "dn": (d, n)}[form]
    kw = {
        "u": r(b, d, l),
        "delta": r(b, d, l, scale=0.5, positive=True),  # a negative delta makes the scan grow
        "A": (-torch.rand(d, n, generator=g) * 2 - 0.1).to(dtype).requires_grad_(),
        "B": r(*bc_shape),
        "C": r(*bc_shape),
    }
    if D:
        kw["D"] = r(d)
    if z:
        kw["z"] = r(b, d, l)
    if bias:
        kw["delta_bias"] = r(d, scale=0.2, positive=True)
    with torch.no_grad():
        kw["delta"][0, 0, 0] = 25.0  # beyond softplus' threshold of 20, where it turns linear
    return kw


def rel_err(ours, ref):
    diff = (ours.double() - ref.double()).norm().item()
    scale = ref.double().norm().item()
    return diff / scale if scale > 0 else diff


def check_against_reference(kw, softplus, mode, seed, tol=1e-5):
    """Output, last state and the gradient of every input within ``tol`` of the fp64 reference."""
    inputs = list(kw.values())
    opts = {"delta_softplus": softplus, "return_last_state": mode != "out"}
    ours, ref = scan.selective_scan(**kw, **opts), reference_scan(**kw, **opts)
    ours, ref = (ours, ref) if mode != "out" else ((ours,), (ref,))
    g = torch.Generator().manual_seed(100 + seed)
    weights = [torch.randn(o.shape, generator=g) for o in ours]
    if mode == "last":
        weights[0] = torch.zeros_like(weights[0])  # the gradient reaches the inputs only via last_state
    for o, r in zip(ours, ref):
        assert o.shape == r.shape and rel_err(o, r) <= tol
    g_ours = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ours, weights)), inputs)
    g_ref = torch.autograd.grad(sum((r * w.double()).sum() for r, w in zip(ref, weights)), inputs)
    for name, a, r in zip(kw, g_ours, g_ref):
        assert a.dtype == kw[name].dtype and a.shape == kw[name].shape, name
        assert rel_err(a, r) <= tol, name


class BrokenKernel:
    """A kernel that fails to launch, as an old card or a driver without the needed PTX makes it."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("PTX .version 8.7 does not support .target sm_50")
        return launch


BROKEN_KERNEL = BrokenKernel()


def check_half_precision(dtype) -> None:
    """fp16/bf16 inputs: out in their dtype and close to the fp32 reference, last state fp32,
    every gradient finite and in its input's dtype (the active backend computes in fp32)."""
    kw = make_inputs(2, 4, 33, 4, "g2", D=True, z=True, bias=True, dtype=dtype)
    ref = reference_scan(**{k: v.detach().float() for k, v in kw.items()}, delta_softplus=True)
    out, last = scan.selective_scan(**kw, delta_softplus=True, return_last_state=True)
    assert out.dtype == dtype and last.dtype == torch.float32
    assert rel_err(out, ref) <= (2e-3 if dtype == torch.float16 else 1e-2)
    grads = torch.autograd.grad(out.float().sum(), list(kw.values()))
    assert all(gr.dtype == dtype and torch.isfinite(gr).all() for gr in grads)
