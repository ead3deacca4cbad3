"""The op registry: what each op means, independent of any backend.

An op declares its attributes (a frozen Pydantic model, which is also what the spec
language accepts for a layer of that op), how many inputs it takes, its shape/dtype rule,
its parameters with their initializers, and its cost. Backends own their own emitter
tables (`op name -> emitter`); a test fails when an op lacks an emitter anywhere.

Cost convention: FLOPs count a multiply-add as 2; elementwise ops count their
per-element work (`Op.flops_per_element`). Totals are for the whole tensor and become
"per sample" when reports set every symbolic dimension to 1.
"""
from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from ..ir import Dim, ParamDef, TensorType, numel


class OpAttrs(BaseModel):
    """Attributes of one op; unknown keys are errors (nothing is silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ShapeError(Exception):
    """An op's inputs do not fit it. `field` names the attribute the user should look at."""

    def __init__(self, message: str, field: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message, self.field, self.hint = message, field, hint


class Op:
    name: ClassVar[str]
    Attrs: ClassVar[type[OpAttrs]] = OpAttrs
    # Number of inputs: exact int, or (min, max) with max None for "any number".
    arity: ClassVar[int | tuple[int, int | None]] = 1
    # What its inputs hold: "float" tensors (most ops) or "int" ids (embedding lookups).
    input_kind: ClassVar[str] = "float"
    flops_per_element: ClassVar[int] = 0

    @property
    def summary(self) -> str:
        return (self.__doc__ or "").strip().splitlines()[0]

    def resolve(self, attrs: OpAttrs, ins: list[TensorType]) -> OpAttrs:
        """Fill attributes that follow from the inputs (e.g. `in_features`) and check declared ones."""
        return attrs

    def infer(self, attrs: OpAttrs, ins: list[TensorType]) -> list[TensorType]:
        return [ins[0]]

    def params(self, attrs: OpAttrs, ins: list[TensorType]) -> dict[str, ParamDef]:
        return {}

    def flops(self, attrs: OpAttrs, ins: list[TensorType], outs: list[TensorType]) -> Dim:
        return self.flops_per_element * numel(outs[0].shape)


REGISTRY: dict[str, Op] = {}


def register(cls: type[Op]) -> type[Op]:
    if cls.name in REGISTRY:
        raise ValueError(f"op '{cls.name}' is registered twice")
    REGISTRY[cls.name] = cls()
    return cls


def get(name: str) -> Op:
    return REGISTRY[name]


# The built-in op families register themselves on import.
from . import attention, conv, elementwise, graph, latent, linear, norm, recurrent, sequence, shape, spatial, tensor  # noqa: E402,F401
from . import multimodal, vision  # noqa: E402,F401
from . import fused  # noqa: E402,F401  (the fusion passes' ops: fused_linear, fused_conv2d, scaled_dot_product_attention)
from . import quant  # noqa: E402,F401  (the quantize pass's op: linear_q)
from . import lora  # noqa: E402,F401  (the lora pass's op: lora_linear)
