"""Data loaders whose order and augmentation depend only on (seed, epoch, index).

Why: exact resume. The sampler yields ``(epoch, index)`` keys and the dataset reseeds the
augmentation from that key, so a resumed run replays the same crops with the same flips,
whichever worker process serves them and whether or not workers persist across epochs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cmdbnet.data.dataset import PreparedDataset
from cmdbnet.data.transforms import eval_transform, train_transform
from cmdbnet.runtime import DistInfo
from cmdbnet.settings import Settings


def _mix(seed: int, epoch: int, index: int) -> int:
    """A well-spread 32-bit seed from three integers (splitmix-style)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    return (x ^ (x >> 32)) & 0xFFFFFFFF


class SeededView(Dataset):
    """Wraps a prepared split; item keys are ``(epoch, index)`` pairs."""

    def __init__(self, base: PreparedDataset, transform, seed: int) -> None:
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if self.transform is not None and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(_mix(self.seed, epoch, index))
        return self.base[index]


class EpochSampler(DistributedSampler):
    """DistributedSampler that tags indices with the epoch and can skip a resumed prefix."""

    def __init__(self, dataset: Dataset, dist_info: DistInfo, shuffle: bool, seed: int) -> None:
        super().__init__(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                         shuffle=shuffle, seed=seed, drop_last=False)
        self.skip = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i, index in enumerate(super().__iter__()):
            if i >= self.skip:
                yield (self.epoch, index)

    def __len__(self) -> int:
        return max(self.num_samples - self.skip, 0)


def _loader(view: Dataset, sampler, batch: int, settings: Settings, drop_last: bool,
            device: torch.device) -> DataLoader:
    workers = settings.data.workers
    return DataLoader(view, batch_size=batch, sampler=sampler, num_workers=workers,
                      pin_memory=settings.data.pin_memory and device.type == "cuda",
                      persistent_workers=workers > 0, drop_last=drop_last,
                      prefetch_factor=4 if workers > 0 else None,
                      # a private generator: iterating must not consume the global RNG that
                      # drop-path uses, or a resumed run would diverge
                      generator=torch.Generator().manual_seed(settings.train.seed))


def train_loader(settings: Settings, dist_info: DistInfo, device: torch.device) -> DataLoader:
    """Shuffled, augmented training batches; the last short batch is dropped.

    Dropping it keeps every micro-batch the same size, so gradient accumulation weights
    are exact and BatchNorm never sees a batch of one.
    """
    d = settings.data
    tf = train_transform(d.crop, d.augment, d.mean, d.std)
    base = PreparedDataset(d.prepared, "train", transform=tf, seed_workers=False)
    view = SeededView(base, tf, settings.train.seed)
    sampler = EpochSampler(view, dist_info, shuffle=True, seed=settings.train.seed)
    drop_last = len(sampler) >= settings.train.batch
    return _loader(view, sampler, settings.train.batch, settings, drop_last, device)


def eval_loader(settings: Settings, split: str, dist_info: DistInfo, device: torch.device,
                batch: int | None = None) -> DataLoader:
    """Un-augmented batches of a split, sharded across ranks (metrics are reduced later).

    DistributedSampler pads ranks to equal length by repeating crops; the evaluator
    drops those repeats so every crop counts once.
    """
    d = settings.data
    base = PreparedDataset(d.prepared, split, transform=eval_transform(d.mean, d.std))
    view = SeededView(base, None, settings.train.seed)
    sampler = EpochSampler(view, dist_info, shuffle=False, seed=settings.train.seed)
    return _loader(view, sampler, batch or settings.train.batch, settings, False, device)


def batches_per_epoch(loader: DataLoader) -> int:
    n = len(loader.sampler)
    b = loader.batch_size or 1
    return n // b if loader.drop_last else math.ceil(n / b)
