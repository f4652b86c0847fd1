"""The smp baselines: our ImageNet file in their ResNet encoders, loud when it is absent, cmdbnet's output mapping."""

from __future__ import annotations

import pytest
import torch
import torchvision

from cmdbnet.errors import CmdbError
from cmdbnet.models import BaselineNet, build_model
from cmdbnet.settings import ModelSettings

pytest.importorskip("segmentation_models_pytorch")


def test_resnet_encoder_loads_the_same_torchvision_file_as_our_cnn_branch(tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    net = build_model(ModelSettings(arch="deeplabv3plus", backbone="resnet18", backbone_weights=path, in_channels=4))
    assert isinstance(net, BaselineNet) and net.weights_source == str(path)
    enc = net.net.encoder.state_dict()
    assert torch.equal(enc["layer3.1.conv2.weight"], state["layer3.1.conv2.weight"])
    # RGB filters kept, the fourth band from their mean, all rescaled by 3/4, as for the CNN branch
    rgb = state["conv1.weight"][:, :3]
    assert torch.allclose(enc["conv1.weight"][:, :3], rgb * 0.75)
    assert torch.allclose(enc["conv1.weight"][:, 3], rgb.mean(1) * 0.75)
    out = net.train()(torch.randn(2, 4, 70, 90))
    assert out["seg"].shape == (2, 6, 70, 90) and out["aux"] == [] and out["boundary"] is None


def test_absent_weights_are_loud_never_silent(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("CMDB_WEIGHTS_URL", "http://127.0.0.1:9/")  # refused at once: nothing is downloaded
    with pytest.warns(UserWarning, match="BASELINE ENCODER IS RANDOM: ImageNet weights for resnet18"):
        net = build_model(ModelSettings(arch="unet", backbone="resnet18", pretrained="auto"))
    assert net.weights_source == "random"
    with pytest.raises(CmdbError, match="pretrained=required"):
        build_model(ModelSettings(arch="unet", backbone="resnet18", pretrained="required"))
    with pytest.warns(UserWarning, match="SegFormer's mit_b2 encoder starts from random init"):
        build_model(ModelSettings(arch="segformer", pretrained="auto", num_classes=3))
