"""TensorBoard logging (rank 0 only): scalars, per-class IoU and validation previews."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmdbnet.palette import palette_lut


def _palette_image(index: torch.Tensor, palette: list[list[int]], ignore_index: int) -> torch.Tensor:
    """(H, W) class indices -> (3, H, W) uint8 colours; ignored pixels black."""
    lut = torch.from_numpy(palette_lut(palette, ignore_index))
    return lut[index.clamp(0, 255).long()].permute(2, 0, 1)


def _denormalise(image: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """(C, H, W) normalised -> (3, H, W) uint8 of the first three bands."""
    m = torch.tensor(mean[:3]).view(-1, 1, 1)
    s = torch.tensor(std[:3]).view(-1, 1, 1)
    rgb = image[:3] * s + m
    return rgb.clamp(0, 255).to(torch.uint8)


def preview_strip(preview: dict[str, torch.Tensor], palette, ignore_index: int, mean, std) -> torch.Tensor:
    """Rows of image | label | prediction | boundary, as one (3, H*, W*) uint8 image."""
    rows = []
    for i in range(preview["image"].shape[0]):
        panels = [_denormalise(preview["image"][i], mean, std),
                  _palette_image(preview["label"][i], palette, ignore_index),
                  _palette_image(preview["pred"][i], palette, ignore_index)]
        if "boundary" in preview:
            b = (preview["boundary"][i, 0] * 255).to(torch.uint8)
            panels.append(b.expand(3, -1, -1))
        rows.append(torch.cat(panels, dim=2))
    return torch.cat(rows, dim=1)


class TBLogger:
    """A SummaryWriter on rank 0 and a no-op elsewhere, so callers need no rank checks."""

    def __init__(self, log_dir: Path | None) -> None:
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is None or (isinstance(v, float) and np.isnan(v)):
                continue
            self.writer.add_scalar(f"{prefix}{k}", float(v), step)

    def validation(self, metrics: dict[str, Any], step: int) -> None:
        self.scalars({k: metrics[k] for k in ("mIoU", "OA", "mF1", "boundary_iou", "boundary_distance")},
                     step, "val/")
        self.scalars({name: v["iou"] for name, v in metrics["per_class"].items()}, step, "val_iou/")

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="CHW")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
