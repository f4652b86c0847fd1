"""The C depthwise 3 x 3 convolution against torch's (in fp64), and where it steps aside."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scan_reference import rel_err
from torch import nn

from cmdbnet.models import depthwise as dw


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 1, 9), (2, 2, 6, 1), (1, 1, 1, 1), (2, 40, 33, 18)])
@pytest.mark.parametrize("bias", [True, False])
def test_output_and_gradients_match_torch_in_fp64(shape, bias):
    c = shape[1]
    torch.manual_seed(0)
    conv = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=bias)
    x, g = torch.randn(shape, requires_grad=True), torch.randn(shape)
    params = [x, *conv.parameters()]
    ref_params = [p.detach().double().requires_grad_() for p in params]
    ref = F.conv2d(ref_params[0], ref_params[1], ref_params[2] if bias else None, padding=1, groups=c)
    ref_grads = torch.autograd.grad(ref, ref_params, g.double())
    assert dw._applies(conv, x)
    out = dw.depthwise(conv, x)
    assert rel_err(out, ref) < 1e-6
    for got, expected in zip(torch.autograd.grad(out, params, g), ref_grads):
        assert rel_err(got, expected) < 1e-6


def test_anything_else_goes_to_the_module():
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    x = torch.randn(1, 4, 8, 8)
    assert dw._applies(conv, x)
    assert not dw._applies(conv, x.contiguous(memory_format=torch.channels_last))
    assert not dw._applies(nn.Conv2d(4, 4, 3, padding=1, groups=4).double(), x.double())
    assert not dw._applies(nn.Conv2d(4, 4, 3, padding=1, groups=2), x)
    assert not dw._applies(nn.Conv2d(4, 4, 3, padding=1, groups=4, stride=2), x)
    assert not dw._applies(nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="reflect"), x)
    strided = torch.randn(1, 4, 8, 16)[..., ::2]
    assert torch.equal(dw.depthwise(conv, strided), conv(strided))
