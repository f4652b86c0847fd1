"""Depthwise 3 x 3 convolutions of NCHW CPU maps through the C library (``depthwise.c``).

Why: oneDNN runs a depthwise convolution of a plain NCHW map through reorders to its blocked
layout and back, and on the wide 1/4-scale maps (the FPN's smoothing, the boundary head) that
costs several times the nine multiply-adds per pixel, most of all in backward. The C loops read
each plane in place. Same parameters, same results within fp32 rounding; anywhere else (CUDA, a
channels-last or strided map, fp64, torch.compile, ONNX export, no C compiler) the module's own conv runs.
"""

from __future__ import annotations

import torch
from torch import nn

from cmdbnet.models.exporting import is_exporting
from cmdbnet.models.scan.native import library, pointer, run_units

__all__ = ["Depthwise3x3", "depthwise"]


def depthwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``: through the C library where it applies (see the module docstring)."""
    if _applies(conv, x):
        return Depthwise3x3.apply(x, conv.weight, conv.bias)
    return conv(x)


def _applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    c = conv.in_channels
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == c == conv.out_channels and conv.padding_mode == "zeros"
            and x.dim() == 4 and x.shape[1] == c and x.device.type == "cpu" and x.dtype == torch.float32
            and conv.weight.dtype == torch.float32 and x.is_contiguous() and not torch.compiler.is_compiling()
            and not is_exporting() and library() is not None)


class Depthwise3x3(torch.autograd.Function):
    """(x (B, C, H, W), weight (C, 1, 3, 3), bias (C) or None) -> (B, C, H, W), stride 1, zero padding 1."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        b, c, h, w = x.shape
        weight = weight.contiguous()
        y = torch.empty_like(x)
        run_units(library().cmdb_dw3x3_fwd, b * c, c, h, w, pointer(x), pointer(weight), pointer(bias), pointer(y))
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        b, c, h, w = x.shape
        gy, lib = gy.contiguous(), library()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.empty_like(x)
            run_units(lib.cmdb_dw3x3_bwd_input, b * c, c, h, w, pointer(gy), pointer(weight), pointer(gx))
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            gw, gb = x.new_empty((b, c, 9)), x.new_empty((b, c)) if ctx.has_bias else None
            run_units(lib.cmdb_dw3x3_bwd_weight, b * c, h, w, pointer(x), pointer(gy), pointer(gw), pointer(gb))
            gw = gw.sum(0).view_as(weight)
            gb = None if gb is None else gb.sum(0)
        return gx, gw, gb
