"""Which rank predicts what: the shard plan of a ``torchrun ... cmdb predict`` run.

Balanced by pixels, not files: a folder mixing 6000 x 6000 tiles with 500 x 500 crops would
leave ranks idle if split by count. Work units go, largest first, to the rank with the fewest
pixels so far (greedy longest-processing-time), ties to the lowest rank, so every rank
computes the same plan from the same inputs without talking.

The split of one huge raster. A raster holding more than one rank's fair share of the run's
pixels (total / ranks) is cut into ``ceil(pixels / share)`` bands (at most ranks, at most its
number of window rows) of consecutive *window rows* of the sliding-window grid. A band
predicts its window rows plus the earlier window rows whose windows still overlap its first
rows (``window.first_window_row``: 1 extra row at overlap 0.25), and keeps only the rows its
own window rows finish: those are the same numbers, bit for bit, as a one-process run. Each
band is written as a hidden part file (``.<stem>_<product>.band<k>of<n>.part.tif``) beside
the output; when all bands are done one rank copies them, in the strips a one-process run
writes, into the final product and deletes the parts. A killed run loses the parts of a
split raster (the next run deletes them and predicts that raster again): bands are meant
for rasters a few times a rank's share, not for runs that take days.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from cmdbnet.runtime import DistInfo

PREDICT_TIMEOUT = timedelta(days=7)  # ranks wait for the slowest shard at the end, not for gloo's 30 min


@dataclass(frozen=True)
class Unit:
    """A whole file (``parts == 1``) or band ``part`` of ``parts`` of it (window rows ``rows``)."""

    file: int
    part: int
    parts: int
    rows: tuple[int, int] | None
    pixels: int


def split_rows(n_rows: int, parts: int) -> list[tuple[int, int]]:
    """``n_rows`` window rows cut into ``parts`` consecutive, near-equal ranges."""
    edges = [round(k * n_rows / parts) for k in range(parts + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def make_units(pixels: list[int], window_rows: list[int], world: int) -> list[Unit]:
    """Files as units, those above one rank's fair share cut into window-row bands (module doc)."""
    share = sum(pixels) / max(1, world)
    units: list[Unit] = []
    for f, (px, n_rows) in enumerate(zip(pixels, window_rows)):
        parts = 1
        if world > 1 and px > share and n_rows > 1:
            parts = min(world, n_rows, math.ceil(px / share))
        if parts == 1:
            units.append(Unit(f, 0, 1, None, px))
            continue
        for k, (i0, i1) in enumerate(split_rows(n_rows, parts)):
            units.append(Unit(f, k, parts, (i0, i1), round(px * (i1 - i0) / n_rows)))
    return units


def assign(units: list[Unit], world: int) -> list[list[Unit]]:
    """Greedy longest-first assignment to the least-loaded rank; each rank's list in file order."""
    load = [0] * world
    shards: list[list[Unit]] = [[] for _ in range(world)]
    for u in sorted(units, key=lambda u: (-u.pixels, u.file, u.part)):
        r = min(range(world), key=lambda k: (load[k], k))
        shards[r].append(u)
        load[r] += u.pixels
    return [sorted(s, key=lambda u: (u.file, u.part)) for s in shards]


def band_paths(plan: dict[str, Path], part: int, parts: int) -> dict[str, Path]:
    """Hidden part files of band ``part`` beside each final product."""
    return {name: p.parent / f".{p.stem}.band{part}of{parts}.part.tif" for name, p in plan.items()}


def gather(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (just ``[obj]`` when alone)."""
    if not (info.enabled and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def first_error(results: list[Any]) -> str | None:
    """The first error message among ranks' results (``{"error": ...}`` entries), if any."""
    for r in results:
        if isinstance(r, dict) and r.get("error"):
            return str(r["error"])
    return None
