"""Convolutions and pooling over NCHW images."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field, PositiveInt, model_validator

from ..ir import ParamDef, TensorType, numel
from . import Op, OpAttrs, ShapeError, register
from .linear import uniform_fan_in
from .rules import check_declared, expect_rank, pair, window_out

Size2 = PositiveInt | Annotated[list[PositiveInt], Field(min_length=2, max_length=2)]
Pad2 = Annotated[int, Field(ge=0)] | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)]


@register
class Conv2d(Op):
    """2-D convolution: kernel k×l, stride, zero padding, dilation, groups (depthwise when groups = channels)."""

    name = "conv2d"

    class Attrs(OpAttrs):
        out_channels: PositiveInt
        kernel_size: Size2
        stride: Size2 = 1
        padding: Pad2 = 0
        dilation: Size2 = 1
        groups: PositiveInt = 1
        bias: bool = True
        in_channels: PositiveInt | None = None  # inferred from the input when left out

        @model_validator(mode="after")
        def _groups_divide_out(self):
            if self.out_channels % self.groups:
                raise ValueError(f"out_channels ({self.out_channels}) must be divisible by groups ({self.groups})")
            return self

    def resolve(self, a, ins):
        x = ins[0]
        expect_rank(x, (4,), "conv2d")
        c = check_declared(a.in_channels, x, 1, "in_channels")
        if c % a.groups:
            raise ShapeError(f"in_channels ({c}) must be divisible by groups ({a.groups})", field="groups")
        return a.model_copy(update={"in_channels": c})

    def infer(self, a, ins):
        n, _, h, w = ins[0].shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(pair, (a.kernel_size, a.stride, a.padding, a.dilation))
        return [TensorType((n, a.out_channels, window_out(h, kh, sh, ph, dh), window_out(w, kw, sw, pw, dw)), ins[0].dtype)]

    def params(self, a, ins):
        kh, kw = pair(a.kernel_size)
        fan_in = a.in_channels // a.groups * kh * kw
        init = uniform_fan_in(fan_in)
        p = {"weight": ParamDef((a.out_channels, a.in_channels // a.groups, kh, kw), init)}
        if a.bias:
            p["bias"] = ParamDef((a.out_channels,), init)
        return p

    def flops(self, a, ins, outs):
        kh, kw = pair(a.kernel_size)
        macs_per_out = a.in_channels // a.groups * kh * kw
        return numel(outs[0].shape) * (2 * macs_per_out + (1 if a.bias else 0))


class _Pool2d(Op):
    class Attrs(OpAttrs):
        kernel_size: Size2
        stride: Size2 | None = None  # defaults to the kernel size
        padding: Pad2 = 0

    def infer(self, a, ins):
        x = ins[0]
        expect_rank(x, (4,), self.name)
        n, c, h, w = x.shape
        (kh, kw), (ph, pw) = pair(a.kernel_size), pair(a.padding)
        sh, sw = pair(a.stride if a.stride is not None else a.kernel_size)
        if ph > kh // 2 or pw > kw // 2:
            raise ShapeError("padding must be at most half the kernel size", field="padding")
        return [TensorType((n, c, window_out(h, kh, sh, ph), window_out(w, kw, sw, pw)), x.dtype)]

    def flops(self, a, ins, outs):
        kh, kw = pair(a.kernel_size)
        return numel(outs[0].shape) * kh * kw


@register
class MaxPool2d(_Pool2d):
    """2-D max pooling; stride defaults to the kernel size."""

    name = "max_pool2d"


@register
class AvgPool2d(_Pool2d):
    """2-D average pooling; stride defaults to the kernel size; zero padding counts in the average (PyTorch's default)."""

    name = "avg_pool2d"


@register
class GlobalAvgPool2d(Op):
    """Average over H and W, keeping them as 1×1: [N, C, H, W] -> [N, C, 1, 1]."""

    name = "global_avg_pool2d"

    def infer(self, a, ins):
        x = ins[0]
        expect_rank(x, (4,), self.name)
        return [TensorType(x.shape[:2] + (1, 1), x.dtype)]

    def flops(self, a, ins, outs):
        return numel(ins[0].shape)
