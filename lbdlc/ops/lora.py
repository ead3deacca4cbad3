"""Low-rank adapted linear layers (LoRA, Hu et al. 2021), created by the `lora` pass, and their
QLoRA form over a block-quantized base (`lora_linear_q`, the `qlora` pass)."""
from __future__ import annotations

from pydantic import NonNegativeFloat, PositiveInt

from ..ir import Init, ParamDef, numel
from . import ShapeError, register
from .linear import Linear, uniform_fan_in
from .quant import LinearQ  # QLoRA: the frozen base is linear_q's


class _Adapters:
    """What LoRA adds to a linear op (mixed in before it): the adapters A (r×in, Kaiming-uniform
    like PEFT) and B (out×r, zeros), their FLOPs, and the check of their dropout."""

    def resolve(self, a, ins):
        if a.dropout >= 1:
            raise ShapeError(f"{self.name} dropout must be below 1, got {a.dropout}", field="dropout")
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


@register
class LoRALinear(_Adapters, Linear):
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


@register
class LoRALinearQ(_Adapters, LinearQ):
    """QLoRA (Dettmers et al. 2023): y = x W̄^T + b + scale · dropout(x) A^T B^T with W̄ the
    block-quantized, frozen base weight of linear_q (buffers `qweight`, `scale`, `min`; fp32
    `bias`) and full-precision adapters `lora_A.weight` (r×in), `lora_B.weight` (out×r, zeros).
    The `qlora` pass makes it from lora_linear; `lora_merge` gives back a linear_q (adapters
    added to the dequantized weight, requantized) or a linear (kept fp32)."""

    name = "lora_linear_q"

    class Attrs(LinearQ.Attrs):
        r: PositiveInt = 8
        scale: float = 2.0  # the adapters' α/r (the op's `scale` buffer holds the block scales)
        dropout: NonNegativeFloat = 0.0
