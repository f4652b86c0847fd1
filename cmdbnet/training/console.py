"""The live training display: one progress bar with losses, lr, images/s, memory and ETA.

Kept apart from the loop so the loop stays readable and tests can switch it off.
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.progress import Progress

from cmdbnet.models.scan import resolve_backend
from cmdbnet.progress import progress_bar


def scan_note(device: torch.device) -> str:
    """The start-of-run line naming the selective scan this run's tensors get (``cmdb doctor`` says why)."""
    return f"selective scan on {device.type}: {resolve_backend(device)}"


class TrainUI:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.progress: Progress | None = None
        self.task = None

    def start(self, total: int, done: int, description: str) -> None:
        if not self.enabled:
            return
        self.console.print(f"[bold]train[/]: {description}")
        self.progress = progress_bar(
            "ep {task.fields[epoch]}", "loss {task.fields[loss]} ({task.fields[main]}/{task.fields[aux]}/"
            "{task.fields[bnd]} main/aux/bnd) lr {task.fields[lr]} {task.fields[ips]} img/s {task.fields[mem]}",
            bar_width=16, console=self.console)
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=done, epoch=1, loss="-", main="-",
                                           aux="-", bnd="-", lr="-", ips="-", mem="")

    def step(self, epoch: int, step: int, total: int, losses: dict[str, float], lr: float, ips: float,
             mem: dict[str, float]) -> None:
        if self.progress is None:
            return
        mem_text = " ".join(f"{v / 1024:.1f}G {k.split('_')[0]}" for k, v in mem.items()
                            if k in ("rss_mib", "cuda_allocated_mib"))
        self.progress.update(self.task, completed=step, epoch=epoch, loss=f"{losses.get('total', 0):.3f}",
                             main=f"{losses.get('main', 0):.3f}", aux=f"{losses.get('aux', 0):.3f}",
                             bnd=f"{losses.get('boundary', 0):.3f}", lr=f"{lr:.2e}", ips=f"{ips:.1f}",
                             mem=mem_text)

    def log(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(message)
        elif self.enabled:
            self.console.print(message)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
