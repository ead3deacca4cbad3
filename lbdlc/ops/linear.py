"""Fully connected layers."""
from __future__ import annotations

import math

from pydantic import PositiveInt

from ..ir import Init, ParamDef, TensorType, numel
from . import Op, OpAttrs, ShapeError, register
from .rules import check_declared


def uniform_fan_in(fan_in: int) -> Init:
    """PyTorch's default for Linear/Conv weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return Init("uniform", (("bound", 1.0 / math.sqrt(fan_in)),))


@register
class Linear(Op):
    """y = x W^T + b over the last dimension; leading dimensions are batch dimensions."""

    name = "linear"

    class Attrs(OpAttrs):
        out_features: PositiveInt
        in_features: PositiveInt | None = None  # inferred from the input when left out
        bias: bool = True

    def resolve(self, a, ins):
        x = ins[0]
        if x.rank < 1:
            raise ShapeError(f"linear expects at least one dimension, got {x}")
        n = check_declared(a.in_features, x, -1, "in_features")
        return a.model_copy(update={"in_features": n})

    def infer(self, a, ins):
        x = ins[0]
        return [TensorType(x.shape[:-1] + (a.out_features,), x.dtype)]

    def params(self, a, ins):
        init = uniform_fan_in(a.in_features)
        p = {"weight": ParamDef((a.out_features, a.in_features), init)}
        if a.bias:
            p["bias"] = ParamDef((a.out_features,), init)
        return p

    def flops(self, a, ins, outs):
        n = numel(outs[0].shape)
        return n * (2 * a.in_features + (1 if a.bias else 0))
