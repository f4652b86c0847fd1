"""The CNN branch: a torchvision ResNet cut into four stages at 1/4, 1/8, 1/16 and 1/32.

Why torchvision and its own key names: users already hold ``resnet34-*.pth`` files (from the
torch hub cache, a colleague, an air-gapped mirror), and the peers' most common complaint is
pretrained weights that silently failed to load. Keeping torchvision's module names lets such a
file load strictly, and every way of getting weights either loads all of them or says why not.
Missing weights are fetched into torchvision's cache (``cmdbnet.weights``) with a timeout of a
few seconds: a training job on a cluster node without internet fails (``required``) or warns
(``auto``) at once instead of hanging on a socket. ``off`` never looks.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import torch
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint

from cmdbnet import weights as imagenet
from cmdbnet.errors import CmdbError
from cmdbnet.serialization import safe_torch_load

__all__ = ["ResNetEncoder", "hub_weights_file", "load_backbone_state"]

_OUT_CHANNELS = {"resnet18": [64, 128, 256, 512], "resnet34": [64, 128, 256, 512],
                 "resnet50": [256, 512, 1024, 2048]}


def hub_weights_file(name: str) -> Path:
    """Where torchvision would cache the ImageNet weights of ``name`` (it may not exist)."""
    return imagenet.cached_file(name)


def imagenet_state(name: str, pretrained: str, weights: str | Path | None,
                   random_warning) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The torchvision ImageNet state dict of ``name`` the settings ask for, and where it came from.

    ``weights``: a local file (always used); else ``pretrained`` off -> (None, "random"); auto ->
    the cached file, fetched once if missing, else the warning ``random_warning(why, advice)``;
    required -> the file or an error. One rule for our CNN branch and the baselines' encoders.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        return _read_state_dict(path), str(path)
    if pretrained == "off":
        return None, "random"
    cached, why = hub_weights_file(name), ""
    if not cached.is_file():
        try:
            imagenet.fetch(name, timeout=imagenet.AUTO_TIMEOUT_S)
        except CmdbError as exc:
            why = f" ({exc})"
    if cached.is_file():
        return _read_state_dict(cached), str(cached)
    advice = (f"download {imagenet.weights_url(name)} into {cached.parent}/ (cmdb weights fetch {name}, then copy "
              f"the file) or set model.backbone_weights to a local {name} state dict")
    if pretrained == "required":
        raise CmdbError(f"ImageNet weights for {name} are not cached ({cached} missing) and could not "
                        f"be downloaded{why}; model.pretrained=required: {advice}")
    warnings.warn(random_warning(why, advice), UserWarning, stacklevel=4)
    return None, "random"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CmdbError(f"backbone weights not found: {path}")
    data = safe_torch_load(path, "state dict")
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CmdbError(f"{path}: expected a state dict of tensors (torchvision ResNet keys)")
    return {k.removeprefix("module."): v for k, v in data.items()}


def _adapt_stem(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB stem weights for ``in_channels`` bands, as timm and torchgeo adapt them.

    The RGB filters are kept for the first three bands, every further band starts from the
    mean of the RGB filters (one band: that mean alone), and all are scaled by 3 / in_channels,
    so a grey image excites the stem exactly as before and the pretrained statistics of
    every later layer still hold.
    """
    if weight.shape[1] == in_channels:
        return weight
    rgb = weight[:, :3]
    mean = rgb.mean(1, keepdim=True)
    kept = rgb if in_channels > 3 else rgb[:, :0]
    extra = mean.expand(-1, in_channels - kept.shape[1], -1, -1)
    return torch.cat([kept, extra], 1) * (3 / in_channels)


def load_backbone_state(encoder: ResNetEncoder, state: dict[str, torch.Tensor], source: str) -> None:
    """Load torchvision ResNet weights strictly (the classifier ``fc.*`` is dropped)."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if "conv1.weight" in state:
        state["conv1.weight"] = _adapt_stem(state["conv1.weight"], encoder.conv1.in_channels)
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        example = (missing or unexpected or wrong)[0]
        raise CmdbError(f"{source}: does not fit a {encoder.name} ({len(missing)} missing, {len(unexpected)} "
                        f"unexpected, {len(wrong)} wrong-shape keys, e.g. {example!r}); "
                        f"is it a torchvision {encoder.name} state dict?")
    encoder.load_state_dict(state, strict=True)


class ResNetEncoder(nn.Module):
    """ResNet18/34/50 returning four feature maps.

    forward: (B, in_channels, H, W) -> [(B, C1, H/4, W/4), (B, C2, H/8, W/8), (B, C3, H/16, W/16),
    (B, C4, H/32, W/32)] with ``out_channels = [C1..C4]``. H and W must be divisible by 32 for the
    maps to line up with the Mamba branch; the network pads to that.
    """

    def __init__(self, name: Literal["resnet18", "resnet34", "resnet50"] = "resnet34", in_channels: int = 3,
                 pretrained: Literal["auto", "required", "off"] = "auto", weights: str | Path | None = None):
        super().__init__()
        if name not in _OUT_CHANNELS:
            raise CmdbError(f"unknown backbone {name!r}; use one of {', '.join(_OUT_CHANNELS)}")
        self.name = name
        self.out_channels = list(_OUT_CHANNELS[name])
        net = getattr(torchvision.models, name)(weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        # torchvision's own attribute names, so its state dicts load without renaming.
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.checkpointing = False  # set by the network: recompute each stage in backward
        self.weights_source = self._init_weights(pretrained, weights)

    def _init_weights(self, pretrained: str, weights: str | Path | None) -> str:
        """Load weights as the settings ask; return where they came from ("random" if nowhere)."""
        state, source = imagenet_state(self.name, pretrained, weights, lambda why, advice: (
            f"ImageNet weights for {self.name} not cached and not downloaded{why}; the CNN branch starts from "
            f"random init (expect lower accuracy): {advice}, or set model.pretrained=off to silence this"))
        if state is not None:
            load_backbone_state(self, state, source)
        return source

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in (self._stem, self.layer2, self.layer3, self.layer4):
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
            feats.append(x)
        return feats
