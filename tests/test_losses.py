"""Loss values, ignore handling, boundary targets, resolution, gradients and autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cmdbnet.losses import CMDBLoss, SegLoss, boundary_loss, boundary_targets, dice_loss


def _labels(b=2, h=16, w=16, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, k, (b, h // 4, w // 4), generator=g)
    return lab.repeat_interleave(4, 1).repeat_interleave(4, 2)


def test_perfect_logits_give_near_zero_loss():
    lab = _labels()
    logits = F.one_hot(lab, 4).permute(0, 3, 1, 2).float() * 30.0
    assert F.cross_entropy(logits, lab).item() < 1e-6
    assert SegLoss(4)(logits, lab).item() < 1e-4
    out = CMDBLoss(4)({"seg": logits, "aux": logits, "boundary": None}, lab)
    assert out["total"].item() < 1e-4


def test_dice_hand_value():
    # 2 classes, uniform probabilities 0.5, 8 pixels of each class (N = 16), smooth 1:
    # per class inter = 4, denom = 8 + 8 = 16 -> dice = 9/17, loss = 8/17.
    lab = torch.zeros(1, 4, 4, dtype=torch.long)
    lab[..., 2:] = 1
    assert dice_loss(torch.zeros(1, 2, 4, 4), lab).item() == pytest.approx(8 / 17)
    # only classes present in the labels are averaged: class 1 absent -> class 0 alone,
    # inter = 0.5 * 16 = 8, denom = 8 + 16 = 24 -> dice = 17/25, loss = 8/25
    lab0 = torch.zeros(1, 4, 4, dtype=torch.long)
    assert dice_loss(torch.zeros(1, 2, 4, 4), lab0).item() == pytest.approx(8 / 25)


def test_ignored_pixels_do_not_affect_loss():
    lab = _labels()
    lab[:, 3:7, 2:12] = 255
    g = torch.Generator().manual_seed(1)
    seg = torch.randn(2, 4, 16, 16, generator=g)
    bnd = torch.randn(2, 1, 16, 16, generator=g)
    seg2, bnd2 = seg.clone(), bnd.clone()
    ign = (lab == 255).unsqueeze(1)
    seg2.masked_fill_(ign.expand_as(seg2), 50.0)
    bnd2.masked_fill_(ign, -50.0)
    loss = CMDBLoss(4)
    a = loss({"seg": seg, "boundary": bnd}, lab)
    b = loss({"seg": seg2, "boundary": bnd2}, lab)
    for key in ("total", "main", "boundary"):
        assert a[key].item() == pytest.approx(b[key].item(), rel=1e-6), key
    assert a["boundary"].item() > 0
    # reference: CE over valid pixels only equals PyTorch's ignore_index CE
    ce = F.cross_entropy(seg, lab, ignore_index=255)
    assert SegLoss(4, dice_weight=0.0)(seg, lab).item() == pytest.approx(ce.item())


def test_all_ignored_is_zero_not_nan():
    lab = torch.full((1, 8, 8), 255, dtype=torch.long)
    seg = torch.randn(1, 3, 8, 8, requires_grad=True)
    out = CMDBLoss(3)({"seg": seg, "aux": [seg], "boundary": torch.randn(1, 1, 8, 8)}, lab)
    assert all(v.item() == 0.0 for v in out.values())
    out["total"].backward()
    assert torch.isfinite(seg.grad).all()


def test_boundary_targets_half_plane_band():
    lab = torch.zeros(2, 10, 16, dtype=torch.long)
    lab[..., 8:] = 3
    for width in (1, 2, 3):
        t = boundary_targets(lab, width)
        assert t.shape == (2, 1, 10, 16) and t.dtype == torch.float32
        expected = torch.zeros(16)
        expected[8 - width : 8 + width] = 1  # width px on each side of the edge
        assert torch.equal(t[:, 0], expected.expand(2, 10, 16))
    # an ignore band between the classes (eroded labels) still yields the edge
    lab[..., 7:9] = 255
    t = boundary_targets(lab, 3)[0, 0, 0]
    assert t.nonzero().flatten().tolist() == [6, 7, 8, 9]  # windows that see both 0 and 3
    # ignored pixels inside one class never create an edge
    one = torch.ones(1, 12, 12, dtype=torch.long)
    one[0, 4:8, 4:8] = 255
    assert boundary_targets(one, 2).sum() == 0


def test_boundary_loss_pos_weight_rule():
    target = torch.zeros(1, 1, 10, 10)
    target[..., 4:6] = 1  # 20 positives, 80 negatives -> ratio 4
    valid = torch.ones_like(target, dtype=torch.bool)
    logits = torch.randn(1, 1, 10, 10, generator=torch.Generator().manual_seed(0))
    auto = boundary_loss(logits, target, valid)
    assert auto.item() == pytest.approx(boundary_loss(logits, target, valid, pos_weight=4.0).item())
    sparse = torch.zeros_like(target)
    sparse[0, 0, 0, 0] = 1  # ratio 99 -> capped at 10
    assert boundary_loss(logits, sparse, valid).item() == pytest.approx(
        boundary_loss(logits, sparse, valid, pos_weight=10.0).item()
    )


def test_aux_lower_resolution_and_lists():
    lab = _labels()
    g = torch.Generator().manual_seed(2)
    seg = torch.randn(2, 4, 16, 16, generator=g)
    aux_lo = torch.randn(2, 4, 8, 8, generator=g)
    aux_lo2 = torch.randn(2, 4, 4, 4, generator=g)
    loss = CMDBLoss(4, aux_weight=0.4, boundary_weight=0.3)
    single = loss({"seg": seg, "aux": aux_lo}, lab)
    up = F.interpolate(aux_lo, size=(16, 16), mode="bilinear", align_corners=False)
    assert single["aux"].item() == pytest.approx(SegLoss(4)(up, lab).item())
    both = loss({"seg": seg, "aux": [aux_lo, aux_lo2]}, lab)
    mean_aux = (SegLoss(4)(aux_lo, lab) + SegLoss(4)(aux_lo2, lab)) / 2
    assert both["aux"].item() == pytest.approx(mean_aux.item())
    assert both["total"].item() == pytest.approx((both["main"] + 0.4 * both["aux"]).item())
    assert both["boundary"].item() == 0.0
    assert set(loss(seg, lab)) == {"total", "main", "aux", "boundary"}  # bare tensor = seg


def test_gradients_flow_to_every_head():
    lab = _labels()
    seg = torch.randn(2, 4, 16, 16, requires_grad=True)
    aux = torch.randn(2, 4, 8, 8, requires_grad=True)
    bnd = torch.randn(2, 1, 16, 16, requires_grad=True)
    out = CMDBLoss(4, class_weights=[1.0, 2.0, 1.0, 0.5])({"seg": seg, "aux": aux, "boundary": bnd}, lab)
    out["total"].backward()
    for t in (seg, aux, bnd):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_autocast_bf16_cpu():
    lab = _labels()
    conv = torch.nn.Conv2d(3, 5, 1)
    x = torch.randn(2, 3, 16, 16)
    loss = CMDBLoss(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        assert y.dtype == torch.bfloat16
        out = loss({"seg": y[:, :4], "aux": y[:, :4, ::2, ::2], "boundary": y[:, 4:]}, lab)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    ref = loss({"seg": y[:, :4].float(), "aux": y[:, :4, ::2, ::2].float(), "boundary": y[:, 4:].float()}, lab)
    assert out["total"].item() == pytest.approx(ref["total"].item(), rel=1e-5)
    out["total"].backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


def test_class_weights_validated():
    with pytest.raises(ValueError):
        SegLoss(4, class_weights=[1.0, 2.0])


# The formulas before the losses stopped syncing with the host (``.any()``, boolean indexing,
# ``n_valid == 0``): the device-side forms must give the same numbers.
def _old_dice(logits, labels, ignore_index=255, smooth=1.0):
    k = logits.shape[1]
    valid = labels != ignore_index
    if not valid.any():
        return logits.sum() * 0.0
    probs = logits.float().softmax(1) * valid.unsqueeze(1)
    onehot = F.one_hot(torch.where(valid, labels, 0), k).permute(0, 3, 1, 2).float() * valid.unsqueeze(1)
    inter = (probs * onehot).sum((0, 2, 3))
    dice = (2 * inter + smooth) / (probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + smooth)
    return (1.0 - dice)[onehot.sum((0, 2, 3)) > 0].mean()


def _old_boundary(logits, target, valid, pos_weight=None, max_pos_weight=10.0, smooth=1.0):
    vf = valid.float()
    n_valid = vf.sum()
    if n_valid == 0:
        return logits.sum() * 0.0
    pos = (target * vf).sum()
    pw = ((n_valid - pos) / pos.clamp_min(1.0)).clamp(1.0, max_pos_weight) if pos_weight is None \
        else torch.tensor(float(pos_weight))
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none", pos_weight=pw) * vf).sum() / n_valid
    prob, t = torch.sigmoid(logits) * vf, target * vf
    return bce + 1.0 - (2 * (prob * t).sum() + smooth) / (prob.sum() + t.sum() + smooth)


def _old_seg(x, labels, weights=None, ignore_index=255):
    if not (labels != ignore_index).any():
        return x.sum() * 0.0
    return F.cross_entropy(x, labels, weight=weights, ignore_index=ignore_index) + _old_dice(x, labels)


@pytest.mark.parametrize("case", ["some_ignored", "class_absent", "all_ignored", "class_weights", "pos_weight"])
def test_device_side_losses_equal_the_old_formulas(case):
    labels = _labels(k=5, seed=3)
    labels[0, :4] = 255
    if case == "class_absent":
        labels[labels == 2] = 1
    if case == "all_ignored":
        labels[:] = 255
    weights = torch.tensor([0.5, 1.0, 2.0, 1.0, 0.3]) if case == "class_weights" else None
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 16, 16, generator=gen, requires_grad=True)
    b = torch.randn(2, 1, 16, 16, generator=gen, requires_grad=True)
    target = boundary_targets(labels, 1)
    valid = (labels != 255).unsqueeze(1)
    pw = 3.0 if case == "pos_weight" else None
    new = [SegLoss(5, 255, 1.0, weights)(x, labels), boundary_loss(b, target, valid, pw)]
    old = [_old_seg(x, labels, weights), _old_boundary(b, target, valid, pw)]
    # CE's weighted mean and Dice's mean over present classes add in another order: 1 ulp apart
    exact = case not in ("class_weights", "class_absent")
    for n, o in zip(new, old):
        gn, go = torch.autograd.grad(n, (x, b), allow_unused=True), torch.autograd.grad(o, (x, b), allow_unused=True)
        torch.testing.assert_close(n, o, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-7)
        for a, c in zip(gn, go):
            if a is not None or c is not None:
                torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-9)
