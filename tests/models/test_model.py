"""The network: shapes, variants, training steps, checkpointing, autocast, backbone weights."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision

from cmdbnet.errors import CmdbError, ConfigError
from cmdbnet.models import CMDBNet, build_model, fusion, vss
from cmdbnet.models.cnn import hub_weights_file
from cmdbnet.models.scan import native
from cmdbnet.models.vss import SS2D, DropPath, _cross_merge, _cross_scan
from cmdbnet.settings import ModelSettings, load_settings
from memory_recipes import TINY_MODEL

VARIANTS = ["full", "cnn_only", "mamba_only", "no_fusion", "no_boundary"]


def small(**kw) -> ModelSettings:
    """A few-hundred-thousand-parameter network: every part present, tests in seconds."""
    base = dict(backbone="resnet18", pretrained="off", mamba_dims=[16, 32, 64, 128], mamba_depths=[1, 1, 1, 1],
                fusion_channels=32, num_classes=3)
    return ModelSettings(**{**base, **kw})


def build(settings: ModelSettings, seed: int = 0) -> CMDBNet:
    torch.manual_seed(seed)
    return build_model(settings)


def _loss(out: dict, labels: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(out["seg"], labels)
    for aux in out["aux"]:
        loss = loss + 0.4 * F.cross_entropy(F.interpolate(aux, size=labels.shape[-2:], mode="bilinear"), labels)
    if out["boundary"] is not None:
        loss = loss + 0.3 * F.binary_cross_entropy_with_logits(out["boundary"], torch.zeros_like(out["boundary"]))
    return loss


# ------------------------------------------------------------------------------------------ shapes

@pytest.fixture(scope="module")
def default_net() -> CMDBNet:
    return build(ModelSettings(pretrained="off"))


@pytest.mark.parametrize("crop", [192, 256])
def test_default_network_shapes(default_net, crop):
    net = default_net.train()
    out = net(torch.randn(1, 3, crop, crop))
    assert out["seg"].shape == (1, 6, crop, crop)
    assert out["boundary"].shape == (1, 1, crop, crop)
    assert [a.shape for a in out["aux"]] == [(1, 6, crop // 16, crop // 16)] * 2  # CNN and Mamba stage 3
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, crop, crop))
    assert out["aux"] == [] and out["seg"].shape == (1, 6, crop, crop)


def test_small_network_at_512():
    net = build(small()).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 512, 512))
    assert out["seg"].shape == (1, 3, 512, 512) and out["boundary"].shape == (1, 1, 512, 512)


@pytest.mark.parametrize("hw", [(160, 224), (100, 130), (33, 47)])
def test_any_input_size_is_padded_and_cropped_back(hw):
    h, w = hw
    net = build(small()).train()
    out = net(torch.randn(2, 3, h, w))
    assert out["seg"].shape == (2, 3, h, w)
    assert out["boundary"].shape == (2, 1, h, w)
    assert [a.shape for a in out["aux"]] == [(2, 3, math.ceil(h / 16), math.ceil(w / 16))] * 2


def test_padding_does_not_leak_into_the_crop():
    """A 96x96 input and the same input padded by us give the same logits: the crop is exact."""
    net = build(small()).eval()
    x = torch.randn(1, 3, 80, 80)
    padded = F.pad(x, (0, 16, 0, 16), mode="reflect")
    with torch.no_grad():
        a, b = net(x)["seg"], net(padded)["seg"][..., :80, :80]
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------ variants

@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_one_step(variant):
    net = build(small(variant=variant)).train()
    present = {n: getattr(net, n) is not None for n in ("cnn", "mamba", "fusion", "boundary", "heads")}
    assert present == {"cnn": variant != "mamba_only", "mamba": variant != "cnn_only", "fusion": True,
                       "boundary": variant == "full", "heads": True}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    out = net(x)
    assert (out["boundary"] is None) == (variant != "full")
    assert len(out["aux"]) == (2 if variant in ("full", "no_fusion", "no_boundary") else 1)
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    loss = _loss(out, y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    no_grad = [k for k, p in net.named_parameters() if p.grad is None]
    assert no_grad == []  # every part of the variant is on the loss's path
    changed = sum(not torch.equal(before[k], p) for k, p in net.named_parameters())
    assert changed == len(before)


def test_channels_last_inference_on_cpu_is_as_exact_as_nchw(monkeypatch):
    import copy

    from cmdbnet.models import net as net_module

    model = build(small()).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ours = model(x)
        wide = copy.deepcopy(model).double()(x.double())  # the fp64 truth, NCHW
        monkeypatch.setattr(net_module, "_cpu_layout", lambda t: t)
        plain = model(x)  # the forward as it was, NCHW
    assert not ours["seg"].is_contiguous() and plain["seg"].is_contiguous()  # the layout did change
    for key in ("seg", "boundary"):
        err = [((o[key].double() - wide[key]).norm() / wide[key].norm()).item() for o in (ours, plain)]
        assert torch.allclose(ours[key], plain[key], rtol=1e-4, atol=1e-5), key
        assert err[0] <= 2 * err[1] + 1e-7, key
    monkeypatch.undo()
    model.train()
    assert model(x)["seg"].is_contiguous()  # training keeps NCHW (see _cpu_layout)


def test_drop_path_drops_whole_samples_and_rescales_the_rest():
    dp = DropPath(0.5).train()
    torch.manual_seed(0)
    x = torch.randn(64, 4, 4, 8)
    state = torch.get_rng_state()
    y = dp(x)
    kept, dropped = (y != 0).flatten(1).all(1), (y == 0).flatten(1).all(1)
    assert (kept | dropped).all() and kept.any() and dropped.any()
    assert torch.allclose(y[kept], 2 * x[kept])
    residual = torch.randn_like(x)
    torch.set_rng_state(state)
    torch.testing.assert_close(dp.add(residual, x), residual + y)  # the fused residual form, same draws
    assert dp.eval()(x) is x
    assert torch.equal(dp.add(residual, x), residual + x)


def test_variants_differ_in_the_fusion_module():
    kinds = {v: type(build(small(variant=v)).fusion).__name__ for v in VARIANTS}
    assert kinds == {"full": "GatedFusion", "no_boundary": "GatedFusion", "no_fusion": "ConcatFusion",
                     "cnn_only": "SingleBranchNeck", "mamba_only": "SingleBranchNeck"}


# ------------------------------------------------------------------------------ checkpointing, amp

def test_checkpointing_gives_the_same_loss_and_gradients():
    plain, ckpt = build(small(drop_path=0.2)), build(small(drop_path=0.2, checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    calls = {"n": 0}
    # A pre-hook: recomputation stops early once backward has what it needs, so the stage's
    # forward hook may never fire the second time.
    ckpt.mamba.stages[1].register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    results = []
    for net in (plain, ckpt):
        net.train()
        torch.manual_seed(7)  # same dropout / drop-path draws
        loss = _loss(net(x), y)
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in net.named_parameters()}))
    assert calls["n"] == 2  # the stage ran again in backward: checkpointing is on
    torch.testing.assert_close(results[0][0], results[1][0])
    for k, g in results[0][1].items():
        torch.testing.assert_close(g, results[1][1][k], rtol=1e-4, atol=1e-5, msg=k)


def test_checkpointing_is_off_in_eval_and_for_no_grad():
    net = build(small(checkpointing=True)).eval()
    calls = {"n": 0}
    net.cnn.layer2.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    net(torch.randn(1, 3, 64, 64))["seg"].sum().backward()
    assert calls["n"] == 1


def test_autocast_bf16_on_cpu_trains():
    net = build(small()).train()
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
        loss = _loss(out, y)
    assert out["seg"].dtype == torch.bfloat16
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


# ------------------------------------------------------------------------------------------- SS2D

def test_cross_scan_orders_and_merge_inverts_them():
    x = torch.arange(6.0).view(1, 1, 2, 3)
    xs = _cross_scan(x)
    assert xs[0, :, 0].tolist() == [[0, 1, 2, 3, 4, 5], [0, 3, 1, 4, 2, 5], [5, 4, 3, 2, 1, 0], [5, 2, 4, 1, 3, 0]]
    torch.testing.assert_close(_cross_merge(xs, 2, 3), 4 * x.flatten(2))


def test_ss2d_mamba_init():
    op = SS2D(32, d_state=4, expand=1.0)
    dt = F.softplus(op.dt_projs_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert torch.equal(-torch.exp(op.A_logs[0]), -torch.arange(1.0, 5.0))
    assert torch.equal(op.Ds, torch.ones(4 * 32))
    assert op.dt_rank == 2  # ceil(32 / 16)


def test_ss2d_sees_the_whole_image():
    """Four directions: the output at one corner depends on the opposite corner."""
    torch.manual_seed(0)
    op = SS2D(8, d_state=2).double()
    x = torch.randn(1, 6, 6, 8, dtype=torch.float64, requires_grad=True)
    op(x)[0, 0, 0].sum().backward()
    assert x.grad[0, 5, 5].abs().sum() > 0
    x.grad = None
    op(x)[0, 5, 5].sum().backward()
    assert x.grad[0, 0, 0].abs().sum() > 0


def test_ss2d_v0_gate_variant_runs():
    out = SS2D(16, d_state=16, expand=2.0, gate=True)(torch.randn(2, 4, 4, 16))
    assert out.shape == (2, 4, 4, 16)


def test_bad_mamba_dims_are_a_config_error():
    with pytest.raises(ConfigError, match="mamba_dims"):
        load_settings(overrides={"model": {"mamba_dims": [16, 32, 64, 7]}})


# ------------------------------------------------------------------------------- backbone weights

def _filled_resnet18_state() -> dict[str, torch.Tensor]:
    net = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for i, p in enumerate(net.parameters()):
            p.fill_(0.001 * (i + 1))
    return net.state_dict()  # includes fc.*, which the loader drops


def test_backbone_weights_from_a_file(tmp_path):
    state = _filled_resnet18_state()
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    net = build(small(backbone_weights=path))
    assert net.cnn.weights_source == str(path)
    for key, value in net.cnn.state_dict().items():
        torch.testing.assert_close(value, state[key], msg=key)


def test_backbone_weights_file_that_does_not_fit(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(CmdbError, match=r"does not fit a resnet18 \(0 missing, \d+ unexpected"):
        build(small(backbone_weights=path))
    with pytest.raises(CmdbError, match="not found"):
        build(small(backbone_weights=tmp_path / "nope.pth"))


def test_backbone_weights_adapt_to_four_bands(tmp_path):
    state = _filled_resnet18_state()
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    net = build(small(backbone_weights=path, in_channels=4))
    w = net.cnn.conv1.weight
    assert w.shape[1] == 4
    torch.testing.assert_close(w[:, 3], state["conv1.weight"].mean(1) * 0.75)  # extra band: mean of RGB, x 3/4
    torch.testing.assert_close(w[:, :3], state["conv1.weight"] * 0.75)


def test_backbone_weights_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = hub_weights_file("resnet18")
    assert cached == tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    state = _filled_resnet18_state()
    torch.save(state, cached)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not cached" warning
        net = build(small(pretrained="auto"))
    torch.testing.assert_close(net.cnn.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_missing_pretrained_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("CMDB_WEIGHTS_URL", "http://127.0.0.1:9/models/")  # nothing listens: offline
    with pytest.raises(CmdbError, match="resnet18-f37072fd.pth.*model.backbone_weights"):
        build(small(pretrained="required"))
    with pytest.warns(UserWarning, match="random init.*resnet18-f37072fd.pth"):
        net = build(small(pretrained="auto"))
    assert net.cnn.weights_source == "random"


def test_hand_written_cpu_paths_step_aside_under_torch_compile(monkeypatch):
    """``cmdb predict --compile``: dynamo cannot trace the C scan layouts or the exact 2x
    upsampling's strided writes, so while compiling the network must take the plain torch ops
    (a real compile of the tiny network takes minutes on a small CPU cold; run by hand)."""
    torch.manual_seed(0)
    net = build_model(load_settings(None, {"model": TINY_MODEL}).model).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        eager = net(x)["seg"]

        def refuse(*args, **kwargs):
            raise AssertionError("a hand-written CPU path ran while compiling")

        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        for owner, name in ((fusion._Up2x, "apply"), (native.PlaneScan, "apply"),
                            (torch, "bmm"), (torch, "baddbmm")):
            monkeypatch.setattr(owner, name, refuse)
        plain = net(x.contiguous())["seg"]  # NCHW input too, where the fast paths would apply
    assert vss._plane_scan(x) is False
    assert (plain - eager).abs().max() <= 1e-5 * eager.abs().max()
