"""The comparison networks (U-Net, DeepLabV3+, SegFormer) from segmentation_models_pytorch.

Why a library and not our own copies: a baseline re-implemented by the authors of the model it
is compared with is the first thing a reviewer doubts. smp is optional (``cmdbnet[baselines]``)
and imported only when a baseline is built.

Initialisation is ours, not smp's: smp is created with ``encoder_weights=None`` (it never
downloads) and the ResNet encoders of U-Net and DeepLabV3+ receive the same torchvision
ImageNet file as the CNN branch of cmdbnet (``cmdbnet.weights``; smp's ResNet encoder keeps
torchvision's key names), under the same ``model.pretrained`` rule: ``auto`` warns loudly when
the file is absent, ``required`` refuses, ``off`` is silent. SegFormer's MiT encoder has no
torchvision weights, so it always starts from random init, and says so.

forward: (B, C, H, W), any H and W -> {"seg": (B, K, H, W) logits, "aux": [], "boundary": None},
the output mapping of :class:`~cmdbnet.models.net.CMDBNet` without the parts a baseline lacks, so
the loss, the trainer, evaluation and prediction treat both alike.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmdbnet.errors import CmdbError
from cmdbnet.models.cnn import _adapt_stem, imagenet_state
from cmdbnet.models.net import STRIDE, _crop, _pad_to

__all__ = ["BaselineNet", "build_baseline", "check_installed", "SEGFORMER_ENCODER", "EXTRA"]

EXTRA = "pip install 'cmdbnet[baselines]' (segmentation-models-pytorch)"
SEGFORMER_ENCODER = "mit_b2"  # ~25 M parameters: the MiT size closest to ResNet34-based networks
_SMP_CLASS = {"unet": "Unet", "deeplabv3plus": "DeepLabV3Plus", "segformer": "Segformer"}


def _smp():
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        raise CmdbError(f"the baselines (unet, deeplabv3plus, segformer) need segmentation_models_pytorch, "
                        f"which is not installed: {EXTRA}") from None
    return smp


def check_installed() -> None:
    """One clear error, before any training starts, when the baselines' library is missing."""
    _smp()


class BaselineNet(nn.Module):
    """An smp network behind cmdbnet's input padding and output mapping."""

    # report name -> submodule, for cmdbnet.profiling.complexity
    complexity_modules = {"encoder": "net.encoder", "decoder": "net.decoder", "heads": "net.segmentation_head"}

    def __init__(self, net: nn.Module, arch: str, weights_source: str):
        super().__init__()
        self.net, self.variant, self.weights_source = net, arch, weights_source

    def set_checkpointing(self, enabled: bool) -> None:
        """smp has no stage checkpointing: the setting has no effect on a baseline."""

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        h, w = x.shape[-2:]
        return {"seg": _crop(self.net(_pad_to(x, STRIDE)), h, w), "aux": [], "boundary": None}


def _imagenet_state(name: str, pretrained: str, weights: Path | None) -> tuple[dict | None, str]:
    """The torchvision state dict the settings ask for, and where it came from (None: random)."""
    return imagenet_state(name, pretrained, weights, lambda why, advice: (
        f"BASELINE ENCODER IS RANDOM: ImageNet weights for {name} not cached and not downloaded{why}; a baseline "
        f"without them scores far below its published figures: {advice}; model.pretrained=off silences this"))


def _load_encoder(encoder: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if "conv1.weight" in state:
        state["conv1.weight"] = _adapt_stem(state["conv1.weight"], encoder.conv1.in_channels)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CmdbError(f"{source}: does not fit the baseline's ResNet encoder "
                        f"({str(exc).strip().splitlines()[0][:160]})") from None


def build_baseline(settings: Any) -> BaselineNet:
    """The baseline ``settings.arch`` (a ``ModelSettings``) names; ResNet encoders get our ImageNet weights."""
    s = settings
    smp = _smp()
    cls = getattr(smp, _SMP_CLASS[s.arch])
    if s.arch == "segformer":
        net = cls(SEGFORMER_ENCODER, encoder_weights=None, in_channels=s.in_channels, classes=s.num_classes)
        if s.pretrained == "required":
            raise CmdbError(f"model.arch=segformer: cmdbnet holds no ImageNet weights for its {SEGFORMER_ENCODER} "
                            "encoder (only torchvision ResNets); use model.pretrained=auto or off")
        if s.pretrained == "auto":
            warnings.warn(f"BASELINE ENCODER IS RANDOM: SegFormer's {SEGFORMER_ENCODER} encoder starts from random "
                          "init: cmdbnet's weights code holds only torchvision ResNets; model.pretrained=off "
                          "silences this", UserWarning, stacklevel=2)
        return BaselineNet(net, s.arch, "random")
    net = cls(s.backbone, encoder_weights=None, in_channels=s.in_channels, classes=s.num_classes)
    state, source = _imagenet_state(s.backbone, s.pretrained, s.backbone_weights)
    if state is not None:
        _load_encoder(net.encoder, state, source)
    return BaselineNet(net, s.arch, source)
