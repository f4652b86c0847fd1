"""``cmdb export`` and ``cmdb predict -k model.onnx``: real torch.onnx export, real onnxruntime,
real GeoTIFFs. Two exports carry the file: a small network at tile 64 with a dynamic batch,
and the default network at tile 64 with a fixed batch and the boundary output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from typer.testing import CliRunner

import cmdbnet
from calibrated import save_calibrated_checkpoint  # noqa: E402 - tests/calibrated.py
from cmdbnet.checkpoint import load_model
from cmdbnet.cli import app
from cmdbnet.data.registry import ISPRS_CLASSES, ISPRS_PALETTE
from cmdbnet.data.synthetic import render_scene
from cmdbnet.errors import CmdbError
from cmdbnet.export import onnx as export_onnx
from cmdbnet.inference.files import predict
from cmdbnet.inference.onnx_runner import require
from cmdbnet.models import build_model
from cmdbnet.settings import IMAGENET_MEAN, IMAGENET_STD, ModelSettings, PredictSettings, Settings

SMALL = dict(backbone="resnet18", mamba_depths=[1, 1, 1, 1], mamba_dims=[16, 32, 64, 128], fusion_channels=32,
             pretrained="off", drop_path=0.0)


def _scenes(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([render_scene(ISPRS_CLASSES, size, size, rng)[1][:3] for _ in range(n)])


def _checkpoint(path: Path, **model) -> Path:
    """A network with batch-norm statistics measured on scenes (so its masks follow the image)."""
    return save_calibrated_checkpoint(path, Settings(model=ModelSettings(**model)), _scenes(2, 96, 1))


def cli(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    ckpt = _checkpoint(d / "small.pt", **SMALL)
    res = cli("export", ckpt, "-o", d / "small.onnx", "--tile", 64, "--json")
    assert res.exit_code == 0, res.output
    return ckpt, d / "small.onnx", json.loads(res.stdout)


def test_small_network_exports_equal_to_pytorch(small):
    ckpt, path, summary = small
    c = summary["check"]
    assert c["passed"] and c["max_abs_diff"] <= 1e-4 and c["argmax_agreement"] >= 0.9999 and c["windows"] == 4
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert model.ir_version == 8 and [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert not {n.domain for n in model.graph.node} - {"", "ai.onnx"}  # no custom ops
    # a batch of 3 (the axis is dynamic) of new scenes, PyTorch's ordinary CPU path as reference
    net = load_model(ckpt)[0]
    x = (torch.from_numpy(_scenes(3, 64, 7)).float() - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        ref = net(x)["seg"].softmax(1).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    assert got.shape == (3, 6, 64, 64)
    assert np.abs(got - ref).max() <= 1e-4


def test_metadata_read_the_way_deepness_reads_it(small):
    _, path, _ = small
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    values = {k: json.loads(v) for k, v in meta.items()}  # every value is JSON
    assert str(values["model_type"]).capitalize() == "Segmentor"
    keys = sorted(values["class_names"], key=int)
    assert [int(k) for k in keys] == list(range(6))
    assert [values["class_names"][k] for k in keys] == list(ISPRS_CLASSES)
    assert values["tile_size"] == values["tiles_size"] == 64 == sess.get_inputs()[0].shape[-1]
    assert values["tiles_overlap"] == 25 and values["resolution"] == 5.0
    assert isinstance(sess.get_inputs()[0].shape[0], str)  # dynamic batch
    assert len(sess.get_outputs()) == 1 and sess.get_outputs()[0].shape[1:] == [6, 64, 64]
    mean = np.array([float(v) for v in values["standardization_mean"]], np.float32)
    std = np.array([float(v) for v in values["standardization_std"]], np.float32)
    assert mean.shape == std.shape == (sess.get_inputs()[0].shape[1],)
    ours = values["cmdbnet"]
    assert ours["classes"] == list(ISPRS_CLASSES) and ours["palette"] == [list(p) for p in ISPRS_PALETTE]
    assert ours["mean"] == list(IMAGENET_MEAN) and ours["tile"] == 64 and len(ours["checkpoint_sha256"]) == 64
    assert ours["cmdbnet_version"] == cmdbnet.__version__ and ours["pixel_size_m"] == 0.05
    # Deepness's preprocessing of uint8 tiles (N, H, W, C): /255, standardise, to NCHW
    tiles = _scenes(2, 64, 3).transpose(0, 2, 3, 1)
    x = np.transpose((np.float32(tiles * (1.0 / 255.0)) - mean) / std, (0, 3, 1, 2))
    got = sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]
    ref_in = (tiles.transpose(0, 3, 1, 2).astype(np.float32) - np.array(IMAGENET_MEAN, np.float32)[:, None, None]) \
        / np.array(IMAGENET_STD, np.float32)[:, None, None]
    ref = sess.run(None, {"image": ref_in.astype(np.float32)})[0]
    assert np.abs(got - ref).max() <= 1e-4 and (got.argmax(1) == ref.argmax(1)).mean() >= 0.9999


def test_predict_with_onnx_equals_predict_with_run(small, tmp_path):
    ckpt, path, _ = small
    src = tmp_path / "scene.tif"
    img = _scenes(1, 160, 11)[0][:, :120]
    with rasterio.open(src, "w", driver="GTiff", width=img.shape[2], height=img.shape[1], count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(368000.0, 5808000.0, 0.05, 0.05)) as dst:
        dst.write(img)
    s = PredictSettings(tile=128, overlap=0.25, batch=3, device="cpu")  # the .onnx imposes its tile
    a = predict([src], tmp_path / "torch.tif", ckpt, s.model_copy(update={"tile": 64}), progress=False)[0]
    b = predict([src], tmp_path / "onnx.tif", path, s, progress=False)[0]
    assert b["tile"] == 64 and a["windows"] == b["windows"]
    with rasterio.open(tmp_path / "torch.tif") as ta, rasterio.open(tmp_path / "onnx.tif") as tb:
        ma, mb = ta.read(1), tb.read(1)
        assert tb.crs == ta.crs and tb.transform == ta.transform
        assert tb.colormap(1)[1] == ta.colormap(1)[1]
    assert len(np.unique(ma)) >= 2  # a real class map, not one class everywhere
    assert (ma == mb).mean() >= 0.9999


def test_default_network_fixed_batch_with_boundary(tmp_path):
    ckpt = _checkpoint(tmp_path / "default.pt", pretrained="off")
    s = cmdbnet.export(ckpt, tmp_path / "default.onnx", tile=64, batch=2, boundary=True)
    c = s["check"]
    assert c["passed"] and c["max_abs_diff"] <= 1e-4 and c["boundary_max_abs_diff"] <= 1e-4
    sess = ort.InferenceSession(str(tmp_path / "default.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == [2, 3, 64, 64]
    assert [o.name for o in sess.get_outputs()] == ["probs", "boundary"]
    probs, bnd = sess.run(None, {"image": np.zeros((2, 3, 64, 64), np.float32)})
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and bnd.shape == (2, 1, 64, 64) and 0 <= bnd.min() <= bnd.max() <= 1


def test_failed_check_leaves_no_file(small, tmp_path, monkeypatch):
    """A graph that is not the checkpoint's network (here: another network's graph) is refused."""
    ckpt = _checkpoint(tmp_path / "cnn.pt", **{**SMALL, "variant": "cnn_only"})
    other = onnx.load(str(small[1]))
    monkeypatch.setattr(export_onnx, "_trace", lambda *a, **k: (other, "torchscript"))
    res = cli("export", ckpt, "-o", tmp_path / "m.onnx", "--tile", 64)
    assert res.exit_code == 2
    assert res.stderr.startswith("cmdb: error: ") and "disagrees with PyTorch" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.onnx*")) and not list(tmp_path.glob(".m.onnx*"))


def test_corrupt_and_foreign_onnx_give_one_clear_error(tmp_path):
    src = tmp_path / "in.tif"
    with rasterio.open(src, "w", driver="GTiff", width=40, height=40, count=3, dtype="uint8") as dst:
        dst.write(_scenes(1, 40, 2)[0])
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not a protobuf" * 50)
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(torch.nn.Conv2d(3, 2, 1), (torch.zeros(1, 3, 32, 32),), str(foreign), dynamo=False)
    for path, needle in ((bad, "not a readable ONNX model"), (foreign, "not written by `cmdb export`")):
        res = cli("predict", src, "-o", tmp_path / f"{path.stem}.tif", "-k", path)
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cmdb: error:") and needle in lines[0], res.stderr
        assert not (tmp_path / f"{path.stem}.tif").exists()


def test_missing_extra_names_it():
    with pytest.raises(CmdbError, match=r'pip install "cmdbnet\[export\]"'):
        require("onnxruntime_not_installed_here")


def test_export_mode_takes_plain_ops_only(monkeypatch):
    """Inside ``exporting()`` no C library, hand-written autograd Function or fused matmul runs, the
    scan takes its export form, and the network's output stays PyTorch's."""
    from cmdbnet.models import depthwise, fusion, vss
    from cmdbnet.models.exporting import exporting
    from cmdbnet.models.scan import native, selective_scan
    from cmdbnet.models.scan.parallel import _export_states, export_scan, linear_scan

    torch.manual_seed(0)
    u, dt = torch.randn(2, 8, 100), torch.randn(2, 8, 100)
    A, B, C, D, bias = -torch.rand(8, 3), torch.randn(2, 2, 3, 100), torch.randn(2, 2, 3, 100), torch.randn(8), \
        torch.randn(8)
    ref = selective_scan(u, dt, A, B, C, D, delta_bias=bias, delta_softplus=True)
    assert (export_scan(u, dt, A, B, C, D, bias) - ref).abs().max() <= 1e-5 * ref.abs().max()
    for length in (7, 8, 64, 72, 512, 4096):  # whole, one chunk, chunks, chunks of chunks, an uneven split
        a, x = torch.rand(2, 3, length) * 0.2 + 0.8, torch.randn(2, 3, length)
        want = linear_scan(a.double(), x.double())
        assert (_export_states(a, x) - want).abs().max() <= 1e-5 * want.abs().max(), length
    net = build_model(ModelSettings(**SMALL)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        eager = net(x)["seg"]

        def refuse(*args, **kwargs):
            raise AssertionError("a hand-written CPU path ran in export mode")

        for owner, name in ((fusion._Up2x, "apply"), (native.PlaneScan, "apply"), (native.NativeScan, "apply"),
                            (depthwise.Depthwise3x3, "apply"), (torch, "bmm"), (torch, "baddbmm")):
            monkeypatch.setattr(owner, name, refuse)
        with exporting():
            plain = net(x)["seg"]
            assert vss._plane_scan(x) is False
    assert (plain - eager).abs().max() <= 1e-5 * eager.abs().max()
