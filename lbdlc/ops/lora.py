"""Low-rank adapted linear layers (LoRA, Hu et al. 2021), created by the `lora` pass."""
from __future__ import annotations

from pydantic import NonNegativeFloat, PositiveInt

from ..ir import Init, ParamDef, numel
from . import ShapeError, register
from .linear import Linear, uniform_fan_in


@register
class LoRALinear(Linear):
    """y = x W^T + b + scale · dropout(x) A^T B^T: a frozen linear layer plus a trainable rank-r
    correction, A (r×in, Kaiming-uniform like PEFT) and B (out×r, zeros), so that at step 0 it
    computes exactly the base layer. Parameters are named as PEFT names them: `weight`, `bias`,
    `lora_A.weight`, `lora_B.weight`; scale is α/r (α/√r with rsLoRA). Shape rule and base
    parameters are linear's."""

    name = "lora_linear"

    class Attrs(Linear.Attrs):
        r: PositiveInt = 8
        scale: float = 2.0
        dropout: NonNegativeFloat = 0.0

    def resolve(self, a, ins):
        if a.dropout >= 1:
            raise ShapeError(f"lora_linear dropout must be below 1, got {a.dropout}", field="dropout")
        return super().resolve(a, ins)

    def params(self, a, ins):
        p = super().params(a, ins)
        # kaiming_uniform_(a=√5) on an (r, in) matrix is U(±1/√in): PEFT's init of lora_A
        p["lora_A.weight"] = ParamDef((a.r, a.in_features), uniform_fan_in(a.in_features))
        p["lora_B.weight"] = ParamDef((a.out_features, a.r), Init("zeros"))
        return p

    def flops(self, a, ins, outs):
        rows = numel(ins[0].shape[:-1])
        return super().flops(a, ins, outs) + rows * (2 * a.in_features * a.r + 2 * a.r * a.out_features + 2 * a.out_features)
