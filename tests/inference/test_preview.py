"""Previews and the palette lookup: colours, legend, downsampling, nothing half-written."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cmdbnet.inference.preview import save_preview, to_rgb8
from cmdbnet.palette import colorize, palette_lut

PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def test_palette_lut_colours_classes_and_blacks_out_the_rest():
    lut = palette_lut(PALETTE, 255, alpha=True)
    assert lut.shape == (256, 4) and lut.dtype == np.uint8
    assert [tuple(lut[i]) for i in range(3)] == [(255, 0, 0, 255), (0, 255, 0, 255), (0, 0, 255, 255)]
    assert not lut[3:].any()  # past the palette and the ignore index: black, transparent
    idx = np.array([[0, 1], [2, 255]], np.uint8)
    assert colorize(idx, PALETTE).tolist() == [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [0, 0, 0]]]


def test_to_rgb8_stretches_non_8bit_and_repeats_a_single_band():
    img = np.linspace(0, 4000, 3 * 10 * 10, dtype=np.float32).reshape(3, 10, 10).astype(np.uint16)
    out = to_rgb8(img)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    grey = to_rgb8(np.full((1, 4, 4), 7, np.uint8))
    assert grey.shape == (4, 4, 3) and (grey == 7).all()


def test_save_preview_panels_side_by_side_with_legend(tmp_path):
    pred = np.zeros((40, 60), np.uint8)
    pred[:, 30:] = 1
    truth = np.full((40, 60), 2, np.uint8)
    image = np.zeros((3, 40, 60), np.uint8)
    path = save_preview(tmp_path / "p.png", image, pred, ["a", "b", "c"], PALETTE, truth=truth)
    assert path.exists() and not list(tmp_path.glob(".p.png.*"))  # written atomically
    arr = np.asarray(Image.open(path).convert("RGB"))
    pad, title = 8, 18
    assert arr.shape[1] == 3 * (60 + pad) + pad  # image | prediction | ground truth
    pred_panel = arr[title:title + 40, 2 * pad + 60:2 * pad + 120]
    assert (pred_panel[:, :30] == (255, 0, 0)).all() and (pred_panel[:, 30:] == (0, 255, 0)).all()
    truth_panel = arr[title:title + 40, 3 * pad + 120:3 * pad + 180]
    assert (truth_panel == (0, 0, 255)).all()


def test_large_rasters_are_downsampled_to_max_side(tmp_path):
    pred = np.zeros((300, 900), np.uint8)
    path = save_preview(tmp_path / "big.png", np.zeros((3, 300, 900), np.uint8), pred, ["a"], PALETTE[:1],
                        max_side=90)
    width = Image.open(path).width
    assert width == 2 * (90 + 8) + 8
