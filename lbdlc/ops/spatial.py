"""Spatial ops beyond conv2d: 1-D convolution and pooling over NCL sequences, transposed
convolutions, upsampling of NCHW images, and group / instance / RMS normalisation.

Every op follows its torch.nn namesake: attribute names, defaults, parameter shapes
(a transposed convolution's weight is [in_channels, out_channels / groups, k...]) and
default initializers.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt

from ..ir import Dim, ParamDef, TensorType, as_dim, numel
from . import Op, OpAttrs, ShapeError, register
from .conv import Pad2, Size2
from .linear import uniform_fan_in
from .norm import ONES, ZEROS
from .rules import check_declared, expect_rank, pair, window_out


def _groups_divide(in_channels: int, out_channels: int, groups: int) -> None:
    if in_channels % groups:
        raise ShapeError(f"in_channels ({in_channels}) must be divisible by groups ({groups})", field="groups")
    if out_channels % groups:
        raise ShapeError(f"out_channels ({out_channels}) must be divisible by groups ({groups})", field="groups")


# -- 1-D convolution and pooling over [N, C, L] --------------------------------------------


@register
class Conv1d(Op):
    """1-D convolution over [N, C, L]: kernel k, stride, zero padding, dilation, groups (nn.Conv1d)."""

    name = "conv1d"

    class Attrs(OpAttrs):
        out_channels: PositiveInt
        kernel_size: PositiveInt
        stride: PositiveInt = 1
        padding: NonNegativeInt = 0
        dilation: PositiveInt = 1
        groups: PositiveInt = 1
        bias: bool = True
        in_channels: PositiveInt | None = None  # inferred from the input when left out

    def resolve(self, a, ins):
        x = ins[0]
        expect_rank(x, (3,), "conv1d")
        c = check_declared(a.in_channels, x, 1, "in_channels")
        _groups_divide(c, a.out_channels, a.groups)
        return a.model_copy(update={"in_channels": c})

    def infer(self, a, ins):
        n, _, length = ins[0].shape
        return [TensorType((n, a.out_channels, window_out(length, a.kernel_size, a.stride, a.padding, a.dilation)), ins[0].dtype)]

    def params(self, a, ins):
        init = uniform_fan_in(a.in_channels // a.groups * a.kernel_size)
        p = {"weight": ParamDef((a.out_channels, a.in_channels // a.groups, a.kernel_size), init)}
        if a.bias:
            p["bias"] = ParamDef((a.out_channels,), init)
        return p

    def flops(self, a, ins, outs):
        macs_per_out = a.in_channels // a.groups * a.kernel_size
        return numel(outs[0].shape) * (2 * macs_per_out + (1 if a.bias else 0))


class _Pool1d(Op):
    class Attrs(OpAttrs):
        kernel_size: PositiveInt
        stride: PositiveInt | None = None  # defaults to the kernel size
        padding: NonNegativeInt = 0

    def infer(self, a, ins):
        x = ins[0]
        expect_rank(x, (3,), self.name)
        n, c, length = x.shape
        if a.padding > a.kernel_size // 2:
            raise ShapeError("padding must be at most half the kernel size", field="padding")
        stride = a.stride if a.stride is not None else a.kernel_size
        return [TensorType((n, c, window_out(length, a.kernel_size, stride, a.padding)), x.dtype)]

    def flops(self, a, ins, outs):
        return numel(outs[0].shape) * a.kernel_size


@register
class MaxPool1d(_Pool1d):
    """1-D max pooling over [N, C, L]; stride defaults to the kernel size."""

    name = "max_pool1d"


@register
class AvgPool1d(_Pool1d):
    """1-D average pooling over [N, C, L]; stride defaults to the kernel size; zero padding counts in the average (PyTorch's default)."""

    name = "avg_pool1d"


# -- transposed convolutions ---------------------------------------------------------------


def transposed_out(size: Dim, kernel: int, stride: int, padding: int, output_padding: int, dilation: int) -> Dim:
    """(L - 1)·s - 2p + d(k - 1) + output_padding + 1, the output length of a transposed convolution."""
    out = as_dim((size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1)
    if isinstance(out, int) and out < 1:
        raise ShapeError(
            f"a transposed convolution (kernel {kernel}, stride {stride}, padding {padding}) "
            f"of an input of size {size} has no output (size {out})",
            field="padding",
        )
    return out


class _ConvTranspose(Op):
    """Shared rule of conv_transpose1d/2d; `spatial` is the number of spatial dims."""

    spatial: int

    def _tuple(self, v) -> tuple[int, ...]:
        return (v,) if self.spatial == 1 else pair(v)

    def resolve(self, a, ins):
        x = ins[0]
        expect_rank(x, (2 + self.spatial,), self.name)
        c = check_declared(a.in_channels, x, 1, "in_channels")
        _groups_divide(c, a.out_channels, a.groups)
        for op_, s, d in zip(self._tuple(a.output_padding), self._tuple(a.stride), self._tuple(a.dilation)):
            if op_ >= max(s, d):
                raise ShapeError(
                    f"output_padding ({op_}) must be smaller than the stride ({s}) or the dilation ({d})",
                    field="output_padding",
                )
        return a.model_copy(update={"in_channels": c})

    def infer(self, a, ins):
        x = ins[0]
        sizes = x.shape[2:]
        out = tuple(
            transposed_out(size, k, s, p, op_, d)
            for size, k, s, p, op_, d in zip(
                sizes, *(self._tuple(v) for v in (a.kernel_size, a.stride, a.padding, a.output_padding, a.dilation))
            )
        )
        return [TensorType((x.shape[0], a.out_channels) + out, x.dtype)]

    def params(self, a, ins):
        kernel = self._tuple(a.kernel_size)
        # nn.ConvTranspose*d: weight [in, out/groups, k...]; its fan-in is computed from dim 1.
        init = uniform_fan_in(a.out_channels // a.groups * math.prod(kernel))
        p = {"weight": ParamDef((a.in_channels, a.out_channels // a.groups) + kernel, init)}
        if a.bias:
            p["bias"] = ParamDef((a.out_channels,), init)
        return p

    def flops(self, a, ins, outs):
        # Every input element meets out/groups · k... weights; the bias adds once per output.
        macs = numel(ins[0].shape) * (a.out_channels // a.groups) * math.prod(self._tuple(a.kernel_size))
        return as_dim(2 * macs + (numel(outs[0].shape) if a.bias else 0))


@register
class ConvTranspose1d(_ConvTranspose):
    """1-D transposed convolution over [N, C, L] (nn.ConvTranspose1d): L_out = (L-1)s - 2p + d(k-1) + output_padding + 1."""

    name = "conv_transpose1d"
    spatial = 1

    class Attrs(OpAttrs):
        out_channels: PositiveInt
        kernel_size: PositiveInt
        stride: PositiveInt = 1
        padding: NonNegativeInt = 0
        output_padding: NonNegativeInt = 0
        dilation: PositiveInt = 1
        groups: PositiveInt = 1
        bias: bool = True
        in_channels: PositiveInt | None = None  # inferred from the input when left out


@register
class ConvTranspose2d(_ConvTranspose):
    """2-D transposed convolution over [N, C, H, W] (nn.ConvTranspose2d): H_out = (H-1)s - 2p + d(k-1) + output_padding + 1."""

    name = "conv_transpose2d"
    spatial = 2

    class Attrs(OpAttrs):
        out_channels: PositiveInt
        kernel_size: Size2
        stride: Size2 = 1
        padding: Pad2 = 0
        output_padding: Pad2 = 0
        dilation: Size2 = 1
        groups: PositiveInt = 1
        bias: bool = True
        in_channels: PositiveInt | None = None  # inferred from the input when left out


# -- upsampling ----------------------------------------------------------------------------


@register
class Upsample(Op):
    """Resize [N, C, H, W] by an integer scale_factor or to a fixed size: nearest or bilinear (F.interpolate).

    Exactly one of `scale_factor` (int, or [h, w]) and `size` ([h, w]). `nearest` is PyTorch's
    'nearest' (source index floor(dst / scale)); `bilinear` uses half-pixel centres, or the
    corner pixels with `align_corners: true`.
    """

    name = "upsample"

    class Attrs(OpAttrs):
        scale_factor: Size2 | None = None
        size: Annotated[list[PositiveInt], Field(min_length=2, max_length=2)] | None = None
        mode: Literal["nearest", "bilinear"] = "nearest"
        align_corners: bool = False  # bilinear only

    def resolve(self, a, ins):
        expect_rank(ins[0], (4,), "upsample")
        if a.scale_factor is not None and a.size is not None:
            raise ShapeError("give either scale_factor or size, not both", field="size", hint="remove one of them")
        if a.scale_factor is None and a.size is None:
            raise ShapeError("upsample needs scale_factor or size", hint="e.g. `scale_factor: 2` or `size: [32, 32]`")
        if a.align_corners and a.mode != "bilinear":
            raise ShapeError("align_corners applies to mode: bilinear only", field="align_corners")
        return a

    def infer(self, a, ins):
        n, c, h, w = ins[0].shape
        if a.size is not None:
            oh, ow = a.size
        else:
            sh, sw = pair(a.scale_factor)
            oh, ow = as_dim(h * sh), as_dim(w * sw)
        return [TensorType((n, c, oh, ow), ins[0].dtype)]

    def flops(self, a, ins, outs):
        # bilinear: 3 lerps (2 mul-adds each) per output element; nearest copies.
        return 6 * numel(outs[0].shape) if a.mode == "bilinear" else 0


# -- normalisation -------------------------------------------------------------------------


@register
class GroupNorm(Op):
    """Normalise [N, C, *] over groups of C / num_groups channels and the spatial dims, then a per-channel affine map (nn.GroupNorm)."""

    name = "group_norm"
    flops_per_element = 5

    class Attrs(OpAttrs):
        num_groups: PositiveInt
        num_channels: PositiveInt | None = None  # dim 1, inferred when left out
        eps: PositiveFloat = 1e-5
        affine: bool = True

    def resolve(self, a, ins):
        x = ins[0]
        expect_rank(x, (3, 4), "group_norm")
        c = check_declared(a.num_channels, x, 1, "num_channels")
        if c % a.num_groups:
            fits = [g for g in range(1, c + 1) if c % g == 0]
            raise ShapeError(
                f"num_groups={a.num_groups} does not divide the {c} channels of {x}",
                field="num_groups",
                hint="choose num_groups from " + ", ".join(map(str, fits)),
            )
        return a.model_copy(update={"num_channels": c})

    def params(self, a, ins):
        if not a.affine:
            return {}
        return {"weight": ParamDef((a.num_channels,), ONES), "bias": ParamDef((a.num_channels,), ZEROS)}


@register
class InstanceNorm(Op):
    """Normalise each channel of each sample over its spatial dims, [N, C, L] or [N, C, H, W]; no running statistics (nn.InstanceNorm1d/2d)."""

    name = "instance_norm"
    flops_per_element = 5

    class Attrs(OpAttrs):
        num_features: PositiveInt | None = None  # dim 1, inferred when left out
        eps: PositiveFloat = 1e-5
        affine: bool = False  # nn.InstanceNorm2d's default

    def resolve(self, a, ins):
        x = ins[0]
        expect_rank(x, (3, 4), "instance_norm")
        c = check_declared(a.num_features, x, 1, "num_features")
        return a.model_copy(update={"num_features": c})

    def params(self, a, ins):
        if not a.affine:
            return {}
        return {"weight": ParamDef((a.num_features,), ONES), "bias": ParamDef((a.num_features,), ZEROS)}


@register
class RMSNorm(Op):
    """x / sqrt(mean(x², last dim) + eps) · weight, over the last dimension (nn.RMSNorm)."""

    name = "rms_norm"
    flops_per_element = 4

    class Attrs(OpAttrs):
        normalized_shape: PositiveInt | None = None  # the last dim, inferred when left out
        eps: PositiveFloat = 1e-6  # explicit in every artifact (nn.RMSNorm's None means finfo.eps)
        elementwise_affine: bool = True

    def resolve(self, a, ins):
        n = check_declared(a.normalized_shape, ins[0], -1, "normalized_shape")
        return a.model_copy(update={"normalized_shape": n})

    def params(self, a, ins):
        return {"weight": ParamDef((a.normalized_shape,), ONES)} if a.elementwise_affine else {}
