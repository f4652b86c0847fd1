"""Metric numbers against hand-computed answers; protocol invariants (ignore, accumulation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cmdbnet.metrics import SegmentationMetrics, boundary_band, dilation_pixels

# 3-class 4x4 case. Confusion (rows target, cols pred), counted by hand:
#   t0: preds 0,1,0,0          -> [3, 1, 0]
#   t1: preds 1,1,1,2          -> [0, 3, 1]
#   t2: preds 2,2,0,2,2,2,2,1  -> [1, 1, 6]
TARGET = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]])
PRED = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 2], [2, 2, 0, 2], [2, 2, 2, 1]])
CM = [[3, 1, 0], [0, 3, 1], [1, 1, 6]]
# TP = 3,3,6; FP = 1,2,1; FN = 1,1,2
IOU = [3 / 5, 3 / 6, 6 / 9]
F1 = [6 / 8, 6 / 9, 12 / 15]
PREC = [3 / 4, 3 / 5, 6 / 7]
REC = [3 / 4, 3 / 4, 6 / 8]


def test_hand_computed_confusion_metrics():
    m = SegmentationMetrics(3, class_names=["a", "b", "c"], boundary_dilation=1)
    m.update(PRED[None], TARGET[None])
    r = m.compute()
    assert r["confusion"].tolist() == CM
    for i, name in enumerate("abc"):
        pc = r["per_class"][name]
        assert pc["iou"] == pytest.approx(IOU[i])
        assert pc["f1"] == pytest.approx(F1[i])
        assert pc["precision"] == pytest.approx(PREC[i])
        assert pc["recall"] == pytest.approx(REC[i])
    assert r["OA"] == pytest.approx(12 / 16)
    assert r["mIoU"] == pytest.approx(sum(IOU) / 3)
    assert r["mF1"] == pytest.approx(sum(F1) / 3)


def test_excluded_class_leaves_means_but_not_oa():
    m = SegmentationMetrics(3, exclude=(2,), boundary_dilation=1)
    m.update(PRED[None], TARGET[None])
    r = m.compute()
    assert r["mIoU"] == pytest.approx((IOU[0] + IOU[1]) / 2)
    assert r["mF1"] == pytest.approx((F1[0] + F1[1]) / 2)
    assert r["OA"] == pytest.approx(12 / 16)  # OA still counts all classes
    p = m.protocol()
    assert p["excluded_from_means"] == ["2"] and p["included_in_means"] == ["0", "1"]


def test_absent_class_is_nan_and_skipped():
    m = SegmentationMetrics(4, boundary_dilation=1)
    m.update(PRED[None], TARGET[None])
    r = m.compute()
    assert math.isnan(r["per_class"]["3"]["iou"])
    assert r["mIoU"] == pytest.approx(sum(IOU) / 3)


def test_ignore_index_ignored_in_confusion():
    target = TARGET.clone()
    target[0, 0] = 255  # was a correct class-0 pixel
    target[3, 3] = 255  # was class 2 predicted 1
    m = SegmentationMetrics(3, boundary_dilation=1)
    m.update(PRED[None], target[None])
    assert m.compute()["confusion"].tolist() == [[2, 1, 0], [0, 3, 1], [1, 0, 6]]


def _random_pair(b=3, h=24, w=24, k=4, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    # blocky labels so that classes form regions with contours
    t = torch.randint(0, k, (b, h // 4, w // 4), generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)
    p = t.clone()
    flip = torch.rand(b, h, w, generator=g) < 0.15
    p[flip] = torch.randint(0, k, (int(flip.sum()),), generator=g)
    if ignore:
        t[:, 5:9, 3:15] = 255
        t[:, :, 20] = 255
    return p, t


def _assert_same(r1, r2):
    for key in ("mIoU", "OA", "mF1", "boundary_iou", "boundary_distance"):
        assert r1[key] == pytest.approx(r2[key], nan_ok=True), key
    assert torch.equal(r1["confusion"], r2["confusion"])
    for name in r1["per_class"]:
        for key, v in r1["per_class"][name].items():
            assert v == pytest.approx(r2["per_class"][name][key], nan_ok=True), (name, key)


def test_predictions_at_ignored_pixels_change_nothing():
    p, t = _random_pair()
    p2 = p.clone()
    ign = t == 255
    p2[ign] = (p2[ign] + 1) % 4
    results = []
    for pred in (p, p2):
        m = SegmentationMetrics(4, boundary_dilation=2)
        m.update(pred, t)
        results.append(m.compute())
    _assert_same(*results)
    assert 0 < results[0]["boundary_iou"] < 1


def test_half_planes_band_iou_and_assd():
    # Straight vertical edge at column 8 in the target, at 8 + k in the prediction.
    # Band of width d on each class: IoU of two d-column bands offset by k = (d-k)/(d+k);
    # every contour pixel is exactly k from the other contour (border is not a contour).
    d, k = 3, 2
    t = torch.zeros(1, 12, 16, dtype=torch.long)
    t[..., 8:] = 1
    p = torch.zeros_like(t)
    p[..., 8 + k :] = 1
    m = SegmentationMetrics(2, boundary_dilation=d)
    m.update(p, t)
    r = m.compute()
    for c in "01":
        assert r["per_class"][c]["boundary_iou"] == pytest.approx((d - k) / (d + k))
        assert r["per_class"][c]["boundary_distance"] == pytest.approx(k)
    assert r["boundary_iou"] == pytest.approx((d - k) / (d + k))
    assert r["boundary_distance"] == pytest.approx(k)


def test_squares_offset_by_one_pixel():
    # 8x8 image, 4x4 square at rows/cols 2..5 (target), cols 3..6 (prediction), d = 1.
    # Class 1 bands are the squares' perimeters (12 px each); they share the top and bottom
    # rows at cols 3..5: 6 px -> IoU 6 / 18. Class 0 bands are the rings around the squares
    # (20 px each); they share rows 1 and 6 at cols 2..6: 10 px -> IoU 10 / 30.
    t = torch.zeros(1, 8, 8, dtype=torch.long)
    t[0, 2:6, 2:6] = 1
    p = torch.zeros_like(t)
    p[0, 2:6, 3:7] = 1
    m = SegmentationMetrics(2, boundary_dilation=1)
    m.update(p, t)
    r = m.compute()
    assert r["per_class"]["1"]["boundary_iou"] == pytest.approx(6 / 18)
    assert r["per_class"]["0"]["boundary_iou"] == pytest.approx(10 / 30)
    # ASSD of class 1 by brute force over the two perimeters.
    def perimeter(c0):
        return [(r_, c) for r_ in range(2, 6) for c in range(c0, c0 + 4) if r_ in (2, 5) or c in (c0, c0 + 3)]

    a, b = np.array(perimeter(2), float), np.array(perimeter(3), float)
    dist = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    assd = (dist.min(1).sum() + dist.min(0).sum()) / (len(a) + len(b))
    assert r["per_class"]["1"]["boundary_distance"] == pytest.approx(assd)


def test_identical_masks_are_perfect():
    p, t = _random_pair(ignore=False)
    m = SegmentationMetrics(4)
    m.update(t, t)
    r = m.compute()
    assert r["mIoU"] == 1.0 and r["OA"] == 1.0 and r["mF1"] == 1.0
    assert r["boundary_iou"] == pytest.approx(1.0)
    assert r["boundary_distance"] == pytest.approx(0.0)


def test_accumulation_equals_single_pass():
    p, t = _random_pair(b=4, seed=3)
    one = SegmentationMetrics(4)
    one.update(p, t)
    many = SegmentationMetrics(4)
    for i in range(4):
        many.update(p[i : i + 1], t[i : i + 1])
    for a, b in zip(one.state_tensors(), many.state_tensors()):
        assert torch.allclose(a.double(), b.double())
    _assert_same(one.compute(), many.compute())
    one.reset()
    assert all(int(s.abs().sum()) == 0 for s in one.state_tensors())


def test_border_rule_and_dilation_rule():
    assert dilation_pixels(0.02, 256, 256) == 7  # round(0.02 * 362.04)
    assert dilation_pixels(0.02, 10, 10) == 1
    assert dilation_pixels(3, 256, 256) == 3
    full = torch.ones(1, 1, 10, 12, dtype=torch.bool)
    assert not boundary_band(full, full, 2).any()  # border is not a contour by default
    # boundary-iou-api convention: the border is a contour -> ring of width d
    assert int(boundary_band(full, full, 2, border_is_contour=True).sum()) == 10 * 12 - 6 * 8
    p = SegmentationMetrics(6, exclude=(5,)).protocol()
    assert "ASSD" in p["boundary_distance"] and "0.02" in p["boundary_dilation"]
    assert p["image_border_is_contour"] is False


def test_logits_input_and_bad_values():
    m = SegmentationMetrics(3, boundary_dilation=1)
    logits = torch.nn.functional.one_hot(PRED, 3).permute(2, 0, 1)[None].float()
    m.update(logits, TARGET[None])
    assert m.compute()["confusion"].tolist() == CM
    with pytest.raises(ValueError, match="target values"):
        m.update(PRED[None], torch.full_like(TARGET, 7)[None])
    with pytest.raises(ValueError, match="must both be"):
        m.update(PRED[None], TARGET[None, :2])


def test_all_reduce_noop_and_single_rank_group(tmp_path):
    m = SegmentationMetrics(3, boundary_dilation=1)
    m.update(PRED[None], TARGET[None])
    before = [s.clone() for s in m.state_tensors()]
    m.all_reduce()  # not initialised: no-op
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        m.all_reduce()
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(a, b) for a, b in zip(before, m.state_tensors()))
