"""Training losses: CE + Dice for segmentation, deep supervision, boundary supervision.

The design's loss is main + auxiliary (deep supervision) + boundary (weight 0.3 by default,
0.5 when edges are poor). Everything is computed in fp32 with autocast disabled, because
softmax/log-sum-exp and Dice ratios in bf16/fp16 lose too much precision; the network itself
can still run under autocast.

Boundary targets are derived from the labels on the fly (no extra files to prepare): a pixel
is a boundary pixel when the (2*width+1) square around it holds two different non-ignored
labels. This also finds edges in ISPRS *eroded* labels, where classes never touch and are
separated by an ignore band narrower than 2*width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cmdbnet.settings import TrainSettings

__all__ = [
    "CMDBLoss",
    "SegLoss",
    "boundary_loss",
    "boundary_targets",
    "dice_loss",
]


def _fp32(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits as fp32 at label resolution (bilinear, as for lower-resolution aux heads)."""
    x = x.float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x


def dice_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int | None = 255, smooth: float = 1.0
) -> torch.Tensor:
    """Soft multiclass Dice loss of logits (B,K,H,W) against labels (B,H,W); scalar.

    Dice is pooled over the batch per class and averaged over the classes present in the
    batch's labels: averaging over absent classes would push rare classes (LoveDA barren,
    ISPRS car) towards zero probability whenever a batch lacks them.
    """
    k = logits.shape[1]
    valid = torch.ones_like(labels, dtype=torch.bool) if ignore_index is None else labels != ignore_index
    probs = logits.float().softmax(1) * valid.unsqueeze(1)
    # one-hot by comparison: F.one_hot reads the labels' min and max back to the host on CPU
    classes = torch.arange(k, device=labels.device).view(1, k, 1, 1)
    onehot = (labels.unsqueeze(1) == classes).float() * valid.unsqueeze(1)
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = (2 * inter + smooth) / (denom + smooth)
    present = (onehot.sum((0, 2, 3)) > 0).float()  # no pixel valid: no class present, loss 0
    return ((1.0 - dice) * present).sum() / present.sum().clamp_min(1.0)  # mean over present, no host sync


@torch.no_grad()
def boundary_targets(labels: torch.Tensor, width: int = 3, ignore_index: int | None = 255) -> torch.Tensor:
    """Boundary map (B,1,H,W) float in {0,1} from labels (B,H,W).

    A pixel is 1 when its (2*width+1) square window holds two different non-ignored labels,
    i.e. it lies within ``width`` px (chessboard) of a label change: a straight edge gives
    a band 2*width px wide, width on each side. Ignored pixels never create an edge; their
    own value is meaningless and the loss masks them. Max/min pooling keeps it on the GPU.
    """
    if width < 1:
        raise ValueError(f"boundary width must be >= 1, got {width}")
    lab = labels.unsqueeze(1).float()
    if ignore_index is None:
        valid = torch.ones_like(lab, dtype=torch.bool)
    else:
        valid = lab != ignore_index
    big = 1e9  # sentinel above any label; a constant avoids a GPU sync for labels.max()
    k = 2 * width + 1

    def maxpool(x: torch.Tensor) -> torch.Tensor:  # separable square max-pool, "same" size
        x = F.max_pool2d(x, (1, k), stride=1, padding=(0, width))
        return F.max_pool2d(x, (k, 1), stride=1, padding=(width, 0))

    hi = maxpool(torch.where(valid, lab, torch.full_like(lab, -1.0)))
    lo = -maxpool(-torch.where(valid, lab, torch.full_like(lab, big)))
    return ((hi >= 0) & (hi != lo)).float()


def boundary_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    pos_weight: float | None = None,
    max_pos_weight: float = 10.0,
    smooth: float = 1.0,
) -> torch.Tensor:
    """BCE-with-logits + soft Dice of boundary logits (B,1,H,W) vs target (B,1,H,W); scalar.

    Boundary pixels are a small minority, so plain BCE learns "no edge anywhere". With
    ``pos_weight=None`` positives are weighted by the batch's negative/positive ratio
    (HED-style class balance) capped at ``max_pos_weight``, so edge-dense batches are not
    over-weighted; Dice adds a term that is insensitive to the imbalance. ``valid``
    (B,1,H,W) bool masks ignored pixels out of both terms.
    """
    logits = _fp32(logits, tuple(target.shape[-2:]))
    target = target.float()
    vf = valid.float()
    n_valid = vf.sum().clamp_min(1.0)  # every term is 0 without valid pixels; no host sync to test for it
    if pos_weight is None:
        pos = (target * vf).sum()
        neg = n_valid - pos
        pw = (neg / pos.clamp_min(1.0)).clamp(1.0, max_pos_weight)
    else:
        pw = logits.new_full((), float(pos_weight))
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none", pos_weight=pw)
    bce = (bce * vf).sum() / n_valid
    prob = torch.sigmoid(logits) * vf
    t = target * vf
    dice = 1.0 - (2 * (prob * t).sum() + smooth) / (prob.sum() + t.sum() + smooth)
    return bce + dice


class SegLoss(nn.Module):
    """Cross-entropy (optional class weights) + ``dice_weight`` x soft Dice, ignoring ignore_index.

    CE drives per-pixel accuracy; Dice counters class imbalance (cars, clutter) which mIoU
    weighs equally with the large classes.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = 255,
        dice_weight: float = 1.0,
        class_weights: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.dice_weight = dice_weight
        if class_weights is not None:
            w = torch.as_tensor(class_weights, dtype=torch.float32)
            if w.shape != (num_classes,):
                raise ValueError(f"class_weights needs {num_classes} values, got {tuple(w.shape)}")
            self.register_buffer("class_weights", w)
        else:
            self.class_weights = None

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """logits (B,K,h,w), any resolution; labels (B,H,W) long -> scalar fp32."""
        with torch.autocast(device_type=logits.device.type, enabled=False):
            x = _fp32(logits, tuple(labels.shape[-2:]))
            ii = -100 if self.ignore_index is None else self.ignore_index
            w = None if self.class_weights is None else self.class_weights.to(x.device)
            # CE's own mean divides by the summed weight of the valid pixels: NaN over none. The same
            # sum over that weight clamped to a pixel's, without a host sync to test for it.
            valid = labels != ii
            total = valid.sum().float() if w is None else (w[torch.where(valid, labels, 0)] * valid).sum()
            loss = F.cross_entropy(x, labels, weight=w, ignore_index=ii, reduction="sum") / total.clamp_min(1e-12)
            if self.dice_weight:
                loss = loss + self.dice_weight * dice_loss(x, labels, self.ignore_index)
            return loss


class CMDBLoss(nn.Module):
    """Total training loss of the network: main + aux_weight x aux + boundary_weight x boundary.

    Input is the network's output mapping {"seg": (B,K,H,W) logits, "aux": (B,K,h,w) tensor
    or a list of them or None, "boundary": (B,1,H,W) logits or None}; a bare tensor is taken
    as "seg". Returns {"total", "main", "aux", "boundary"}; the components are *unweighted*
    (for logging), "aux" is the mean over aux heads so ``aux_weight`` does not scale with
    their number, and absent terms are zero.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = 255,
        aux_weight: float = 0.4,
        boundary_weight: float = 0.3,
        boundary_width: int = 3,
        dice_weight: float = 1.0,
        class_weights: Sequence[float] | torch.Tensor | None = None,
        boundary_pos_weight: float | None = None,
    ) -> None:
        super().__init__()
        if boundary_width < 1:
            raise ValueError(f"boundary_width must be >= 1, got {boundary_width}")
        self.seg = SegLoss(num_classes, ignore_index, dice_weight, class_weights)
        self.ignore_index = ignore_index
        self.aux_weight = aux_weight
        self.boundary_weight = boundary_weight
        self.boundary_width = boundary_width
        self.boundary_pos_weight = boundary_pos_weight

    @classmethod
    def from_settings(cls, train: TrainSettings, num_classes: int, ignore_index: int | None) -> CMDBLoss:
        """The loss a run's ``train`` settings describe; ``ignore_index`` comes from the dataset."""
        return cls(num_classes, ignore_index, train.aux_weight, train.boundary_weight, train.boundary_width,
                   train.dice_weight, train.class_weights)

    def forward(
        self, outputs: Mapping[str, object] | torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if isinstance(outputs, torch.Tensor):
            outputs = {"seg": outputs}
        seg = outputs["seg"]
        if not isinstance(seg, torch.Tensor):
            raise TypeError("outputs['seg'] must be a (B,K,H,W) tensor")
        labels = labels.to(seg.device).long()
        zero = seg.new_zeros((), dtype=torch.float32)
        main = self.seg(seg, labels)

        aux_out = outputs.get("aux")
        heads = [aux_out] if isinstance(aux_out, torch.Tensor) else list(aux_out or [])
        aux = torch.stack([self.seg(a, labels) for a in heads]).mean() if heads else zero

        bnd_logits = outputs.get("boundary")
        if bnd_logits is not None and self.boundary_weight:
            with torch.autocast(device_type=seg.device.type, enabled=False):
                target = boundary_targets(labels, self.boundary_width, self.ignore_index)
                valid = (
                    torch.ones_like(target, dtype=torch.bool)
                    if self.ignore_index is None
                    else (labels != self.ignore_index).unsqueeze(1)
                )
                bnd = boundary_loss(bnd_logits, target, valid, self.boundary_pos_weight)
        else:
            bnd = zero

        total = main + self.aux_weight * aux + self.boundary_weight * bnd
        return {"total": total, "main": main, "aux": aux, "boundary": bnd}
