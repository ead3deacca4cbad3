"""Low-rank adapted linear layers (LoRA, Hu et al. 2021), created by the `lora` pass."""
from __future__ import annotations

from pydantic import NonNegativeFloat, PositiveInt

from ..ir import Init, ParamDef, TensorType, numel
from . import Op, OpAttrs, ShapeError, register
from .linear import uniform_fan_in
from .rules import check_declared


@register
class LoRALinear(Op):
    """y = x W^T + b + scale · dropout(x) A^T B^T: a frozen linear layer plus a trainable rank-r
    correction, A (r×in, Kaiming-uniform like PEFT) and B (out×r, zeros), so that at step 0 it
    computes exactly the base layer. Parameters are named as PEFT names them: `weight`, `bias`,
    `lora_A.weight`, `lora_B.weight`; scale is α/r (α/√r with rsLoRA)."""

    name = "lora_linear"

    class Attrs(OpAttrs):
        out_features: PositiveInt
        in_features: PositiveInt | None = None
        bias: bool = True
        r: PositiveInt = 8
        scale: float = 2.0
        dropout: NonNegativeFloat = 0.0

    def resolve(self, a, ins):
        x = ins[0]
        if x.rank < 1:
            raise ShapeError(f"lora_linear expects at least one dimension, got {x}")
        if a.dropout >= 1:
            raise ShapeError(f"lora_linear dropout must be below 1, got {a.dropout}", field="dropout")
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
        # kaiming_uniform_(a=√5) on an (r, in) matrix is U(±1/√in): PEFT's init of lora_A
        p["lora_A.weight"] = ParamDef((a.r, a.in_features), uniform_fan_in(a.in_features))
        p["lora_B.weight"] = ParamDef((a.out_features, a.r), Init("zeros"))
        return p

    def flops(self, a, ins, outs):
        rows = numel(ins[0].shape[:-1])
        base = numel(outs[0].shape) * (2 * a.in_features + (1 if a.bias else 0))
        return base + rows * (2 * a.in_features * a.r + 2 * a.r * a.out_features + 2 * a.out_features)
