"""How the torch scan runs on a small CPU: reused buffers, time-major copies, a fast softplus
and a pool of single-threaded workers over batch slices.

Nothing here knows about the selective scan itself; ``chunked`` uses it.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import torch

# Worker threads, one per batch slice (see run_parts). Each holds the GIL for a few us per op,
# so past a handful they would queue on it; 4 is an estimate (only 2 cores measured).
_MAX_WORKERS = 4


class Scratch:
    """Named buffers reused from block to block: a fresh MiB-sized CPU tensor page-faults as it
    is first written, which measured slower than the arithmetic done in it."""

    def __init__(self, like: torch.Tensor):
        self.like, self.bufs = like, {}

    def __call__(self, name: str, *shape: int) -> torch.Tensor:
        numel, buf = math.prod(shape), self.bufs.get(name)
        if buf is None or buf.numel() < numel:
            buf = self.bufs[name] = self.like.new_empty(numel)
        return buf[:numel].view(shape)


def load(ws: Scratch, name: str, x: torch.Tensor, s0: int, s1: int) -> torch.Tensor:
    """Steps s0..s1-1 of a (..., L) tensor copied time-first into a (T2, ...) buffer.

    Two copies on purpose: a one-step transposing copy walks the source with a stride of L and
    takes a TLB miss per element; copying whole rows first, then transposing them as one 2-D
    matrix (which torch does cache-blocked), is several times faster.
    """
    lead, k = x.shape[:-1], s1 - s0
    rows = ws("rows", *lead, k).copy_(x[..., s0:s1]).view(-1, k)
    return ws(name, k, rows.shape[0]).copy_(rows.t()).view(k, *lead)


def store(ws: Scratch, dst: torch.Tensor, s0: int, s1: int, val: torch.Tensor) -> None:
    """Write a time-first block into steps s0..s1-1 of a (..., L) tensor (the reverse of load)."""
    lead, k = dst.shape[:-1], s1 - s0
    rows = ws("rows", math.prod(lead), k).copy_(val.reshape(k, -1).t())
    dst[..., s0:s1].copy_(rows.view(*lead, k))


def softplus(ws: Scratch, x: torch.Tensor) -> torch.Tensor:
    """F.softplus to 2 ulp, 3x faster: torch's CPU log1p is scalar code.

    relu(x) + log1p(e) with e = exp(-|x|), and log1p(e) = log(u) - ((u - 1) - e) / u for
    u = 1 + e, which corrects the rounding of u and stays right when u rounds to 1. Above
    F.softplus' threshold of 20 the log1p term is below fp32 resolution.
    """
    e = torch.abs(x, out=ws("sp_e", *x.shape)).neg_().exp_()
    u = torch.add(e, 1, out=ws("sp_u", *x.shape))
    c = torch.sub(u, 1, out=ws("sp_c", *x.shape)).sub_(e).div_(u)
    return u.log_().sub_(c).add_(torch.clamp(x, min=0, out=e))


@functools.cache
def worker_pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """Threads whose ops run single-threaded (OpenMP's thread count is per calling thread).

    Keyed by pid: a forked child (a DataLoader worker) inherits this cache but not the threads.
    """
    threads, barrier = torch.get_num_threads(), threading.Barrier(workers)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="cmdb-scan")

    def init() -> None:
        torch.set_num_threads(1)
        barrier.wait()  # holds each task in its own thread, so that every worker runs one

    for f in [pool.submit(init) for _ in range(workers)]:
        f.result()
    torch.set_num_threads(threads)  # set_num_threads(1) also changed the default for new threads
    return pool


def run_parts(u: torch.Tensor, fn) -> list:
    """``[fn(batch_slice), ...]`` over disjoint batch slices, one per intra-op thread on CPU.

    Why not torch's own threading: the scan issues a few ops per time step and each is an
    OpenMP fork/join; when another process holds a core (a shared CI box, a dataloader) every
    join waits for a time slice: 1 s of work took 10 to 60 s here. Python threads running
    single-threaded ops (torch releases the GIL inside ops) never wait on each other. A batch
    of one runs in the calling thread, with torch's threading.
    """
    b, kind = u.shape[0], u.device.type
    workers = min(b, torch.get_num_threads(), _MAX_WORKERS) if kind == "cpu" else 1
    inference = torch.is_inference_mode_enabled()

    def run(sl: slice):  # grad, inference and autocast modes are thread-local: set them all
        amp = torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else nullcontext()
        with torch.inference_mode(inference), torch.no_grad(), amp:
            return fn(sl)

    if workers < 2:
        return [run(slice(None))]
    bounds = [b * i // workers for i in range(workers + 1)]
    pool = worker_pool(workers, os.getpid())
    futures = [pool.submit(run, slice(lo, hi)) for lo, hi in zip(bounds, bounds[1:])]
    return [f.result() for f in futures]
