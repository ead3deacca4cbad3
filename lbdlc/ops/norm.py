"""Normalisation layers."""
from __future__ import annotations

from pydantic import Field, PositiveFloat, PositiveInt

from ..ir import Init, ParamDef
from . import Op, OpAttrs, register
from .rules import check_declared, expect_rank

ONES, ZEROS = Init("ones"), Init("zeros")


@register
class BatchNorm(Op):
    """Per-channel normalisation over the batch (and spatial dims) with running statistics; an affine map at inference.

    Input [N, C], [N, C, L] (BatchNorm1d) or [N, C, H, W] (BatchNorm2d). Running mean/var and
    the batch counter are buffers, not parameters.
    """

    name = "batch_norm"
    flops_per_element = 2  # inference: one scale and one shift per element

    class Attrs(OpAttrs):
        num_features: PositiveInt | None = None  # inferred from dim 1 when left out
        eps: PositiveFloat = 1e-5
        momentum: float = Field(0.1, ge=0.0, le=1.0)

    def resolve(self, a, ins):
        x = ins[0]
        expect_rank(x, (2, 3, 4), "batch_norm")
        c = check_declared(a.num_features, x, 1, "num_features")
        return a.model_copy(update={"num_features": c})

    def params(self, a, ins):
        c = (a.num_features,)
        return {
            "weight": ParamDef(c, ONES),
            "bias": ParamDef(c, ZEROS),
            "running_mean": ParamDef(c, ZEROS, buffer=True),
            "running_var": ParamDef(c, ONES, buffer=True),
            "num_batches_tracked": ParamDef((), ZEROS, dtype="int64", buffer=True, training_only=True),
        }


@register
class LayerNorm(Op):
    """Per-sample normalisation over the last dimension with learned scale and shift; the same in training and inference."""

    name = "layer_norm"
    flops_per_element = 5

    class Attrs(OpAttrs):
        normalized_shape: PositiveInt | None = None  # the last dim, inferred when left out
        eps: PositiveFloat = 1e-5
        elementwise_affine: bool = True
        bias: bool = True

    def resolve(self, a, ins):
        n = check_declared(a.normalized_shape, ins[0], -1, "normalized_shape")
        return a.model_copy(update={"normalized_shape": n})

    def params(self, a, ins):
        if not a.elementwise_affine:
            return {}
        p = {"weight": ParamDef((a.normalized_shape,), ONES)}
        if a.bias:
            p["bias"] = ParamDef((a.normalized_shape,), ZEROS)
        return p
