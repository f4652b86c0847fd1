"""Albumentations 2 pipelines for training and evaluation crops.

Images come in as (H, W, C) arrays on their raw pixel scale (0..255 for uint8) and leave
normalised with ``mean``/``std`` given on that same scale (settings ``data.mean``,
``data.std``); masks are (H, W) class indices, and pixels padded into a mask get the ignore
index 255, so padding never counts as a class.

Reproducibility: every pipeline is an ``A.Compose`` with a ``seed``. ``PreparedDataset``
re-seeds its transform in each data-loader worker from ``torch.initial_seed()`` (which
torch derives from the loader's generator and the worker id), so a run seeded with
``torch.manual_seed`` gets the same augmentations, and no two workers repeat each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np

IGNORE_FILL = 255


class BandJitter(A.ImageOnlyTransform):
    """Brightness, contrast and per-band gain jitter for any band count and dtype.

    Why not ``A.ColorJitter``: it accepts only 1- or 3-band images and clips float images
    to 0..1, which breaks 4-band RGBIR and uint16 crops on their raw scale.
    """

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, gain: float = 0.05, p: float = 0.8):
        super().__init__(p=p)
        self.brightness, self.contrast, self.gain = brightness, contrast, gain

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        bands = data["image"].shape[-1] if data["image"].ndim == 3 else 1
        rng = self.random_generator
        return {"scale": float(rng.uniform(1 - self.brightness, 1 + self.brightness)),
                "contrast": float(rng.uniform(1 - self.contrast, 1 + self.contrast)),
                "gains": rng.uniform(1 - self.gain, 1 + self.gain, bands).astype(np.float32)}

    def apply(self, img: np.ndarray, scale: float = 1.0, contrast: float = 1.0, gains=None, **_: Any) -> np.ndarray:
        x = img.astype(np.float32)
        mean = x.mean(axis=(0, 1), keepdims=True)
        x = ((x - mean) * contrast + mean) * scale
        if gains is not None:
            x *= gains.reshape((1,) * (x.ndim - 1) + (-1,)) if x.ndim == 3 else gains[0]
        if np.issubdtype(img.dtype, np.integer):
            info = np.iinfo(img.dtype)
            return np.clip(np.rint(x), info.min, info.max).astype(img.dtype)
        return x.astype(img.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness", "contrast", "gain")


def _normalize(mean: Sequence[float], std: Sequence[float]) -> A.Normalize:
    return A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=1.0)


def train_transform(crop: int, strength: float, mean: Sequence[float], std: Sequence[float],
                    seed: int | None = None) -> A.Compose:
    """Training pipeline; ``strength`` 0 = no randomness at all, 1 = default, up to 2 = stronger.

    Flips and rotate-90 (each p = 0.5 when strength > 0), a random rescale by
    [1 - 0.25 s, 1 + 0.5 s] then a random ``crop`` (padded with mask 255 when small),
    brightness/contrast/gain jitter of 0.2 s, 0.2 s, 0.05 s.
    """
    if not 0 <= strength <= 2:
        raise ValueError(f"augmentation strength must be in [0, 2], got {strength}")
    pad = A.PadIfNeeded(crop, crop, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_FILL)
    if strength == 0:
        steps = [pad, A.CenterCrop(crop, crop), _normalize(mean, std)]
    else:
        low, high = max(-0.25 * strength, -0.75), 0.5 * strength
        steps = [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.RandomScale(scale_limit=(low, high), interpolation=cv2.INTER_LINEAR,
                          mask_interpolation=cv2.INTER_NEAREST, p=min(0.5 * strength, 1.0)),
            pad,
            A.RandomCrop(crop, crop),
            BandJitter(0.2 * strength, 0.2 * strength, 0.05 * strength, p=min(0.8, 0.5 * strength + 0.3)),
            _normalize(mean, std),
        ]
    return A.Compose(steps, mask_interpolation=cv2.INTER_NEAREST, seed=seed)


def eval_transform(mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    """Evaluation pipeline: normalisation only (crops keep their size)."""
    return A.Compose([_normalize(mean, std)], seed=0)
