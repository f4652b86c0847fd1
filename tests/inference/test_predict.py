"""``cmdb predict`` and the sliding-window engine, on real GeoTIFF/PNG files and a real small CMDBNet.

The network is built once per session (random weights, eval mode) and saved as a real
checkpoint; every test reads and writes real rasters with rasterio.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_origin
from typer.testing import CliRunner

from cmdbnet.checkpoint import save_checkpoint
from cmdbnet.cli import app
from cmdbnet.data.registry import ISPRS_CLASSES, ISPRS_PALETTE
from cmdbnet.inference import compiled
from cmdbnet.inference.files import load_predictor_model, predict
from cmdbnet.inference.window import StripPredictor, axis_grid, forward_tta, predict_array
from cmdbnet.settings import IMAGENET_MEAN, IMAGENET_STD, ModelSettings, PredictSettings, Settings

CRS = "EPSG:32633"
TRANSFORM = from_origin(368000.0, 5808000.0, 0.05, 0.05)
SMALL_NET = dict(backbone="resnet18", mamba_depths=[1, 1, 1, 1], mamba_dims=[16, 32, 64, 128],
                 fusion_channels=32, pretrained="off", drop_path=0.0)


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(3, H, W) uint8 aerial-like texture: smooth fields, bright 'roofs', noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((3, h, w), np.float32)
    for c in range(3):
        for _ in range(3):
            fy, fx, ph = rng.uniform(0.002, 0.02, 2).tolist() + [rng.uniform(0, 6.3)]
            img[c] += 40 * np.sin(fy * yy + fx * xx + ph)
    for _ in range(max(1, h * w // 20000)):
        y, x = rng.integers(0, h), rng.integers(0, w)
        img[:, y:y + rng.integers(10, 60), x:x + rng.integers(10, 60)] += rng.uniform(-120, 120, (3, 1, 1))
    img += 110 + rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_tif(path: Path, img: np.ndarray, **extra) -> Path:
    prof = dict(driver="GTiff", width=img.shape[2], height=img.shape[1], count=img.shape[0],
                dtype=img.dtype.name, crs=CRS, transform=TRANSFORM, tiled=True, blockxsize=256, blockysize=256)
    prof.update(extra)
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(img)
    return path


def dataset_block() -> dict:
    return {"name": "potsdam", "classes": list(ISPRS_CLASSES), "palette": [list(p) for p in ISPRS_PALETTE],
            "ignore_index": 255, "bands": "rgb", "band_count": 3, "dtype": "uint8",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    from cmdbnet.models import build_model

    torch.manual_seed(0)
    settings = Settings(model=ModelSettings(**SMALL_NET))
    net = build_model(settings.model)
    # Random weights predict one class everywhere; batch-norm statistics measured on scenes
    # (as training would leave them) make the prediction follow the image, so that the
    # tiled-vs-whole agreement below compares real class maps.
    for mod in net.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None
    crops = torch.from_numpy(np.stack([scene(128, 128, seed=10 + i) for i in range(4)])).float()
    crops = (crops - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        net.train()(crops)
    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    save_checkpoint(path, {"model": net.state_dict(), "settings": settings.model_dump(mode="json"),
                           "dataset": dataset_block()})
    return path


@pytest.fixture(scope="session")
def big_run(ckpt, tmp_path_factory):
    """One 1024 x 1024 georeferenced GeoTIFF predicted with every product (the costly run)."""
    d = tmp_path_factory.mktemp("big")
    src = write_tif(d / "tile.tif", scene(1024, 1024))
    s = PredictSettings(tile=256, overlap=0.25, batch=6, format="both", probs=True, boundary=True, device="cpu")
    summary = predict([src], d / "out", ckpt, s, progress=False)
    return src, d / "out", summary[0]


def run_cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------ window / blend maths
class _Pointwise(torch.nn.Module):
    """A 1x1-conv network: any correct tiling + blending must reproduce its output exactly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.seg, self.bnd = torch.nn.Conv2d(3, 5, 1), torch.nn.Conv2d(3, 1, 1)

    def forward(self, x):
        return {"seg": 3 * self.seg(x), "boundary": self.bnd(x), "aux": []}


def test_blending_is_exact_for_a_pointwise_network():
    net, img = _Pointwise().eval(), scene(150, 230, seed=3)
    x = (torch.from_numpy(img).float() - 100) / 50
    ref = net(x[None])["seg"].softmax(1)[0].detach().numpy()
    for tile, overlap, tta in ((64, 0.25, "none"), (96, 0.5, "flip"), (64, 0.0, "d4"), (None, 0.25, "none")):
        probs = predict_array(net, img, [100] * 3, [50] * 3, tile=tile, overlap=overlap, tta=tta, output="probs")
        assert probs.shape == (5, 150, 230)
        assert np.abs(probs - ref).max() < 1e-5, (tile, overlap, tta)
    index = predict_array(net, img, [100] * 3, [50] * 3, tile=64, overlap=0.25)
    assert index.dtype == np.uint8 and (index == ref.argmax(0)).mean() > 0.9999


def test_grid_covers_with_margin_and_no_spare_window():
    for size in (1, 7, 32, 100, 1024, 6000):
        for tile, overlap in ((32, 0.25), (256, 0.25), (512, 0.0), (64, 0.75)):
            g = axis_grid(size, tile, overlap)
            margin = round(tile * overlap) // 2 if size > tile else 0  # one window when it fits
            assert g.start <= -margin and g.start + g.span >= size + margin
            assert g.count == 1 or size > tile
            if g.count > 1:  # dropping the last window would leave pixels uncovered
                assert g.start + (g.count - 2) * g.stride + tile < size + margin
    assert axis_grid(6000, 512, 0.25).count == 16


def test_checkpoint_probe_and_tta_shapes(ckpt):
    model, _, meta, has_boundary = load_predictor_model(ckpt, torch.device("cpu"))
    assert has_boundary and len(meta.classes) == 6
    x = torch.randn(2, 3, 32, 32)
    p, b = forward_tta(model, x, "none")
    p8, b8 = forward_tta(model, x, "flip")  # d4 exactness: test_blending_is_exact...
    assert p.shape == p8.shape == (2, 6, 32, 32) and b8.shape == (2, 1, 32, 32)
    assert torch.allclose(p8.sum(1), torch.ones(2, 32, 32), atol=1e-4)
    assert 0 <= float(b8.min()) and float(b8.max()) <= 1


def test_prediction_runs_in_inference_mode_and_its_outputs_blend_outside_it():
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.is_inference_mode_enabled())
            return {"seg": x[:, :2] * 2.0, "boundary": x[:, :1]}

    p, b = forward_tta(Spy(), torch.randn(1, 3, 32, 32), "flip")
    assert seen == [True] * 3 and p.shape == (1, 2, 32, 32) and b.shape == (1, 1, 32, 32)
    acc = torch.zeros(2, 32, 32)
    acc.addcmul_(p[0], torch.ones(32, 32))  # what StripPredictor does with them, outside the mode
    assert torch.allclose(acc.sum(0), torch.ones(32, 32), atol=1e-5)


def test_memory_is_bounded_by_the_strip_not_the_raster():
    """The accumulator is (K, tile, padded width) for a raster 8x taller than wide."""
    net = _Pointwise().eval()
    sp = StripPredictor(net, [100] * 3, [50] * 3, tile=64, overlap=0.25, batch=4)
    rows_seen = []
    img = scene(1024, 96, seed=5)

    def read(rows, cols):
        return img[:, rows[:, None], cols[None, :]]

    sp.run(read, 1024, 96, lambda s: rows_seen.append((s.row0, s.index.shape[0])))
    gx = axis_grid(96, 64, 0.25)
    assert sp.strip_shape == (5, 64, gx.span)
    assert sum(h for _, h in rows_seen) == 1024 and rows_seen[0][0] == 0
    assert max(h for _, h in rows_seen) <= 64  # no strip taller than a window


# ------------------------------------------------------------------ the 1024 x 1024 raster run
class _LocalCNN(torch.nn.Module):
    """Three 3x3 convolutions (receptive field 7 px, inside the blend margin), random weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU())
        self.seg, self.bnd = torch.nn.Conv2d(16, 6, 3, padding=1), torch.nn.Conv2d(16, 1, 1)

    def forward(self, x):
        h = self.body(x)
        return {"seg": self.seg(h), "boundary": self.bnd(h), "aux": []}


def _seam_distance(size: int, tile: int, overlap: float) -> np.ndarray:
    """(size, size) distance in pixels to the nearest window edge inside the image."""
    g = axis_grid(size, tile, overlap)
    edges = [e for o in g.origins() for e in (o, o + tile) if 0 < e < size]
    d = np.min(np.abs(np.arange(size)[:, None] - np.asarray(edges)[None, :]), axis=1)
    return np.minimum(d[:, None], d[None, :])


def test_tiled_agrees_with_whole_forward_when_context_fits_the_margin():
    """1024 x 1024, tile 256, overlap 0.25: blended windows reproduce the whole-image forward."""
    net, img = _LocalCNN().eval(), scene(1024, 1024)
    x = (torch.from_numpy(img).float() - 110) / 50
    with torch.no_grad():
        whole = net(x[None])["seg"][0].argmax(0).numpy()
    tiled = predict_array(net, img, [110] * 3, [50] * 3, tile=256, overlap=0.25, batch=6)
    assert (np.bincount(whole.ravel(), minlength=6) / whole.size > 0.05).sum() >= 2  # not one class
    assert (tiled == whole).mean() >= 0.995


def test_real_network_tiles_blend_without_seams(ckpt, big_run):
    """The real CMDBNet (1024 x 1024, tile 256, overlap 0.25) against one whole-image forward.

    Its pyramid pooling and Mamba scans see the whole input, so with untrained weights (tiny
    class margins) tiles and the whole image disagree on many pixels, everywhere alike. What
    blending must guarantee is that window edges add nothing: disagreement near them is no
    higher than far from them (without overlap it is about twice as high).
    """
    src, _, summary = big_run
    model, _, meta, _ = load_predictor_model(ckpt, torch.device("cpu"))
    with rasterio.open(src) as ds:
        img = torch.from_numpy(ds.read()).float()
    x = (img - torch.tensor(meta.mean).view(3, 1, 1)) / torch.tensor(meta.std).view(3, 1, 1)
    with torch.no_grad():
        whole = model(x[None])["seg"].argmax(1)[0].numpy()
    with rasterio.open(summary["outputs"]["mask"]) as ds:
        tiled = ds.read(1)
    assert (np.bincount(whole.ravel(), minlength=6) / whole.size > 0.05).sum() >= 2
    differ = tiled != whole
    near = _seam_distance(1024, 256, 0.25) < 8
    print(f"tiled vs whole agreement {1 - differ.mean():.4f}; disagreement near window edges "
          f"{differ[near].mean():.4f}, elsewhere {differ[~near].mean():.4f}")
    assert differ[near].mean() <= 1.15 * differ[~near].mean() + 0.01
    # memory: the summary's accumulator is one strip of tile rows, not the raster
    gx = axis_grid(1024, 256, 0.25)
    assert summary["strip_shape"] == [6, 256, gx.span]
    assert summary["windows"] == 36 and summary["nodata_pixels"] == 0


def test_outputs_keep_georeferencing_palette_and_metadata(big_run):
    src, out, summary = big_run
    assert sorted(os.listdir(out)) == ["mosaic.qml", "mosaic.vrt", "predict_summary.json", "tile_boundary.tif",
                                       "tile_color.tif", "tile_mask.qml", "tile_mask.tif", "tile_probs.tif"]
    with rasterio.open(src) as s, rasterio.open(out / "tile_mask.tif") as m:
        assert (m.crs, m.transform, m.width, m.height) == (s.crs, s.transform, s.width, s.height)
        assert m.dtypes[0] == "uint8" and m.nodata == 255 and m.block_shapes[0] == (256, 256)
        assert m.compression.name.lower() == "deflate"
        assert m.colorinterp[0] == rasterio.enums.ColorInterp.palette
        cmap = m.colormap(1)
        assert [cmap[i][:3] for i in range(6)] == [tuple(p) for p in ISPRS_PALETTE]
        assert json.loads(m.tags()["classes"]) == list(ISPRS_CLASSES)
        mask = m.read(1)
    with rasterio.open(out / "tile_color.tif") as c:
        rgba = c.read()
        assert c.count == 4 and c.crs == m.crs
    assert (rgba[:3] == np.asarray(ISPRS_PALETTE, np.uint8)[mask].transpose(2, 0, 1)).all()
    with rasterio.open(out / "tile_probs.tif") as p:
        assert p.descriptions == ISPRS_CLASSES and p.count == 6
        probs = p.read()
    assert np.abs(probs.sum(0) - 1).max() < 5e-3  # float16 storage
    assert (probs.argmax(0) == mask).mean() > 0.999
    with rasterio.open(out / "tile_boundary.tif") as b:
        assert b.dtypes[0] == "uint8" and b.transform == m.transform


# ------------------------------------------------------------------ other inputs
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # the test's own reads
def test_png_input_without_georeferencing(ckpt, tmp_path):
    img = scene(200, 300, seed=2)
    png = tmp_path / "scene.png"
    with rasterio.open(png, "w", driver="PNG", width=300, height=200, count=3, dtype="uint8") as d:
        d.write(img)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotGeoreferencedWarning)
        res = run_cli("predict", png, "-o", tmp_path / "mask.tif", "-k", ckpt, "--tile", 128,
                      "--format", "both", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.qml", "mask.tif", "mask_color.tif", "scene.png"]
    with rasterio.open(tmp_path / "mask.tif") as m:
        assert (m.width, m.height, m.crs) == (300, 200, None)
        assert m.transform.is_identity
        expected = predict_array(load_predictor_model(ckpt, torch.device("cpu"))[0], img, IMAGENET_MEAN,
                                 IMAGENET_STD, tile=128, overlap=0.25)
        assert (m.read(1) == expected).all()  # raster and in-memory paths share the engine


def test_nodata_value_and_alpha_band_stay_nodata(ckpt, tmp_path):
    img = scene(160, 200, seed=4)
    img[:, :40, :70] = 0
    write_tif(tmp_path / "nd.tif", img, nodata=0)
    alpha = np.full((1, 160, 200), 255, np.uint8)
    alpha[0, 100:, 150:] = 0
    write_tif(tmp_path / "rgba.tif", np.concatenate([img, alpha]), photometric="RGB", alpha="YES")
    res = run_cli("predict", tmp_path / "nd.tif", tmp_path / "rgba.tif", "-o", tmp_path / "out", "-k", ckpt,
                  "--tile", 64, "--format", "both", "--probs", "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    summaries = json.loads(res.stdout)
    assert [s["nodata_pixels"] for s in summaries] == [40 * 70, 60 * 50]  # rgba.tif: alpha only
    with rasterio.open(tmp_path / "out" / "nd_mask.tif") as m:
        mask = m.read(1)
    assert (mask[:40, :70] == 255).all() and (mask[40:] != 255).all() and (mask[:, 70:] != 255).all()
    with rasterio.open(tmp_path / "out" / "rgba_mask.tif") as m:
        mask = m.read(1)
    assert (mask[100:, 150:] == 255).all() and (mask[:100] != 255).all()
    with rasterio.open(tmp_path / "out" / "nd_color.tif") as c:
        a = c.read(4)
    assert (a[:40, :70] == 0).all() and (a[40:] == 255).all()
    with rasterio.open(tmp_path / "out" / "nd_probs.tif") as p:
        probs = p.read()
    assert np.isnan(probs[:, :40, :70]).all() and not np.isnan(probs[:, 40:]).any()


# ------------------------------------------------------------------ bad input
def _assert_clean_failure(res, needle: str, folder: Path, before: set[str]):
    assert res.exit_code != 0
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cmdb: error:") and needle in err[0], res.stderr
    assert "Traceback" not in res.output
    assert set(os.listdir(folder)) == before, "partial output left behind"


@pytest.fixture()
def small_tif(tmp_path) -> Path:
    return write_tif(tmp_path / "small.tif", scene(96, 96, seed=6))


def test_missing_and_corrupt_checkpoints(small_tif, tmp_path):
    before = set(os.listdir(tmp_path))
    res = run_cli("predict", small_tif, "-o", tmp_path / "o.tif", "-k", tmp_path / "nope.pt")
    _assert_clean_failure(res, "checkpoint not found", tmp_path, before)
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage" * 50)
    before = set(os.listdir(tmp_path))
    res = run_cli("predict", small_tif, "-o", tmp_path / "o.tif", "-k", tmp_path / "bad.pt")
    _assert_clean_failure(res, "bad.pt", tmp_path, before)


def test_unreadable_raster(ckpt, tmp_path):
    (tmp_path / "fake.tif").write_text("this is not a raster")
    before = set(os.listdir(tmp_path))
    res = run_cli("predict", tmp_path / "fake.tif", "-o", tmp_path / "o.tif", "-k", ckpt)
    _assert_clean_failure(res, "cannot read raster", tmp_path, before)


def test_band_count_and_dtype_mismatch(ckpt, tmp_path):
    write_tif(tmp_path / "two.tif", scene(64, 64)[:2])
    write_tif(tmp_path / "u16.tif", scene(64, 64).astype(np.uint16) * 200)
    before = set(os.listdir(tmp_path))
    res = run_cli("predict", tmp_path / "two.tif", "-o", tmp_path / "o.tif", "-k", ckpt)
    _assert_clean_failure(res, "has 2 band(s) but the checkpoint expects 3", tmp_path, before)
    res = run_cli("predict", tmp_path / "u16.tif", "-o", tmp_path / "o.tif", "-k", ckpt)
    _assert_clean_failure(res, "uint16 pixels but the network was trained on uint8", tmp_path, before)


def test_unwritable_output_and_overwriting_input(ckpt, small_tif, tmp_path):
    (tmp_path / "afile").write_text("x")
    before = set(os.listdir(tmp_path))
    res = run_cli("predict", small_tif, "-o", tmp_path / "afile" / "o.tif", "-k", ckpt)
    _assert_clean_failure(res, "is not a folder", tmp_path, before)
    res = run_cli("predict", small_tif, "-o", small_tif, "-k", ckpt)
    _assert_clean_failure(res, "would overwrite input", tmp_path, before)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        res = run_cli("predict", small_tif, "-o", ro / "o.tif", "-k", ckpt)
        _assert_clean_failure(res, "permission denied", ro, set())


def test_failure_mid_raster_leaves_no_partial_output(ckpt, tmp_path):
    """A GeoTIFF whose later tiles are missing fails while streaming; nothing is left behind."""
    src = write_tif(tmp_path / "cut.tif", scene(512, 512, seed=7), compress="deflate")
    data = src.read_bytes()
    src.write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "out"
    res = run_cli("predict", src, "-o", out, "-k", ckpt, "--tile", 128, "--format", "both")
    assert res.exit_code != 0 and "Traceback" not in res.output
    last = res.stderr.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("cmdb: error: cannot read") and "cut.tif" in last, res.stderr
    assert not out.exists()


def test_several_inputs_folder_naming_and_summary(ckpt, tmp_path):
    for name in ("a", "b"):
        write_tif(tmp_path / f"{name}.tif", scene(64, 96, seed=ord(name)))
    res = run_cli("predict", str(tmp_path / "*.tif"), "-o", tmp_path / "masks", "-k", ckpt.parent,
                  "--tile", 64, "--format", "color")
    assert res.exit_code != 0 and "no best.pt or last.pt" in res.stderr  # run folder without best/last
    os.link(ckpt, tmp_path / "best.pt")
    res = run_cli("predict", str(tmp_path / "*.tif"), "-o", tmp_path / "masks", "-k", tmp_path,
                  "--tile", 64, "--format", "color")
    assert res.exit_code == 0, res.output
    assert sorted(os.listdir(tmp_path / "masks")) == ["a_color.tif", "b_color.tif", "mosaic.vrt",
                                                      "predict_summary.json"]
    assert "Mpx/s" in res.stdout and "a_color.tif" in res.stdout
    res = run_cli("predict", tmp_path / "a.tif", tmp_path / "b.tif", "-o", tmp_path / "x.tif", "-k", ckpt)
    assert res.exit_code != 0 and "need an output folder" in res.stderr
    res = run_cli("predict", "--help")
    assert res.exit_code == 0 and "Examples" in res.stdout


class _Asymmetric(torch.nn.Module):
    """Not equivariant to flips or turns: every TTA view sees something different."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.seg = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bnd = torch.nn.Conv2d(3, 1, 3, padding=1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g)

    def forward(self, x):
        ramp = torch.linspace(0, 2, x.shape[-1]).view(1, 1, 1, -1)  # position-dependent, breaks symmetry
        return {"seg": self.seg(x) + ramp, "boundary": self.bnd(x) - ramp}


def _reorder(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return t.flatten(-2)[..., order].view(t.shape)


@pytest.mark.parametrize("mode, views", [
    ("flip", [lambda t: t, lambda t: t.flip(-1), lambda t: t.flip(-2)]),
    ("d4", [lambda t, k=k, f=f: torch.rot90(t.flip(-1) if f else t, k, (-2, -1))
            for k in range(4) for f in (False, True)]),
])
def test_tta_is_the_mean_of_the_views_probabilities(mode, views):
    net, x = _Asymmetric().eval(), torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    want_p, want_b = torch.zeros(2, 4, 12, 12), torch.zeros(2, 1, 12, 12)
    with torch.no_grad():
        for v in views:
            out = net(v(x))
            # undo the view by brute force: find the map that sends v(index grid) back to the grid
            grid = torch.arange(144.0).view(1, 1, 12, 12)
            moved = v(grid).flatten()
            order = torch.argsort(moved)
            want_p += _reorder(out["seg"].softmax(1), order) / len(views)
            want_b += _reorder(out["boundary"].sigmoid(), order) / len(views)
    p, b = forward_tta(net, x, mode)
    assert torch.allclose(p, want_p, atol=1e-6) and torch.allclose(b, want_b, atol=1e-6)
    single, _ = forward_tta(net, x, "none")
    assert not torch.allclose(p, single, atol=1e-3)  # the views really differ for this network


def test_compile_only_where_the_windows_pay_it_back(ckpt, small_tif, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(compiled.torch, "compile", lambda m, **kw: calls.append(kw) or m)  # no real compile
    res = run_cli("predict", small_tif, "-o", tmp_path / "a.tif", "-k", ckpt, "--compile", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)[0]
    assert calls == [] and summary["compile"].startswith("skipped: 1 windows")
    model, _, meta, _ = load_predictor_model(ckpt, torch.device("cpu"))
    sp = StripPredictor(model, meta.mean, meta.std, tile=64, batch=2)
    info = compiled.compile_predictor(sp, windows=9, bands=3, enabled=True, min_windows=9)
    assert calls == [{"dynamic": False}] and info["compile"] == "on" and info["compile_seconds"] >= 0
    assert compiled.compile_predictor(sp, 10**6, 3, enabled=False) == {"compile": "off"}
