"""Fused ops: what the fusion passes (passes/fusion.py) make of a chain of ops, also writable in a spec.

`fused_linear` and `fused_conv2d` are a linear layer or a 2-D convolution whose bias, an
optional residual (a second input added to the result) and an activation are applied in the
same kernel: act(x Wᵀ + b + residual). Their parameters are those of `linear` / `conv2d`
(`weight`, `bias`), so a fused layer keeps the parameter names of the layer it came from.
`scaled_dot_product_attention` is softmax(q kᵀ · scale) v over the last two dimensions,
without projections (those belong to the `attention` op).
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, PositiveFloat

from ..ir import Node, TensorType, dim_eq, numel
from . import Op, OpAttrs, ShapeError, get, register
from .conv import Conv2d
from .linear import Linear

Activation = Literal["none", "relu", "relu6", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh"]

# activation -> (the op that computes it alone, its attributes)
ACTIVATION_OPS: dict[str, tuple[str, dict]] = {
    "relu": ("relu", {}),
    "relu6": ("relu6", {}),
    "leaky_relu": ("leaky_relu", {}),  # negative_slope from the fused op
    "gelu": ("gelu", {"approximate": "none"}),
    "gelu_tanh": ("gelu", {"approximate": "tanh"}),
    "silu": ("silu", {}),
    "sigmoid": ("sigmoid", {}),
    "tanh": ("tanh", {}),
}


def activation_of(node: Node) -> str | None:
    """The `activation` value that stands for an activation node (None if it is not one)."""
    if node.op == "gelu":
        return "gelu_tanh" if node.attrs.approximate == "tanh" else "gelu"
    if node.op in ACTIVATION_OPS:
        return node.op
    return None


def activation_node(node: Node, value=None) -> Node | None:
    """The fused op's activation as a stand-alone node reading `value` (default: the node's
    output), so that backends emit it with the emitter of that op; None for "none"."""
    a = node.attrs
    if a.activation == "none":
        return None
    op, attrs = ACTIVATION_OPS[a.activation]
    if op == "leaky_relu":
        attrs = {"negative_slope": a.negative_slope}
    v = value if value is not None else node.outputs[0]
    return Node(op, node.name, [v], list(node.outputs), get(op).Attrs(**attrs), origin=node.origin)


def _check_residual(name: str, out: TensorType, ins: list[TensorType]) -> None:
    if len(ins) < 2:
        return
    r = ins[1]
    if r.rank != out.rank or not all(dim_eq(a, b) for a, b in zip(r.shape, out.shape)):
        raise ShapeError(f"{name}'s residual input {r} must have the shape of its output {out}", field="in")
    if r.dtype != out.dtype:
        raise ShapeError(f"{name}'s residual input is {r.dtype}, its output {out.dtype}", field="in")


class _Fused:
    """Shared by fused_linear and fused_conv2d: the residual check and the epilogue's cost."""

    arity = (1, 2)  # x, and optionally a residual added before the activation

    def infer(self, a, ins):
        out = super().infer(a, ins[:1])
        _check_residual(self.name, out[0], ins)
        return out

    def flops(self, a, ins, outs):
        core = super().flops(a, ins[:1], outs)
        n = numel(outs[0].shape)
        act = get(ACTIVATION_OPS[a.activation][0]).flops_per_element if a.activation != "none" else 0
        return core + n * (act + (1 if len(ins) > 1 else 0))


@register
class FusedLinear(_Fused, Linear):
    """act(x Wᵀ + b + residual): a linear layer with its activation (and an optional residual input) in one kernel."""

    name = "fused_linear"

    class Attrs(Linear.Attrs):
        activation: Activation = "none"
        negative_slope: float = 0.01  # for activation: leaky_relu


@register
class FusedConv2d(_Fused, Conv2d):
    """act(conv2d(x) + b + residual): a 2-D convolution with its activation (and an optional residual input) in one kernel."""

    name = "fused_conv2d"

    class Attrs(Conv2d.Attrs):
        activation: Activation = "none"
        negative_slope: float = 0.01  # for activation: leaky_relu


@register
class ScaledDotProductAttention(Op):
    """softmax(q kᵀ · scale (+ causal mask)) v over the last two dims; q [..., Lq, E], k [..., Lk, E], v [..., Lk, Ev].

    `scale` defaults to 1/sqrt(E). With `causal`, query i attends to keys j <= i (top-left
    aligned). Leading (batch, head) dimensions must be equal; there are no projections.
    """

    name = "scaled_dot_product_attention"
    arity = 3

    class Attrs(OpAttrs):
        scale: PositiveFloat | None = None  # default 1/sqrt(E), E the last dim of q
        causal: bool = False
        dropout: float = Field(0.0, ge=0.0, lt=1.0)  # on the weights, in training; identity at inference

    def infer(self, a, ins):
        q, k, v = ins
        if q.rank < 2 or k.rank != q.rank or v.rank != q.rank:
            raise ShapeError(f"scaled_dot_product_attention needs q, k, v of one rank (2 or more), got {q}, {k}, {v}")
        if not all(dim_eq(x, y) for t in (k, v) for x, y in zip(q.shape[:-2], t.shape[:-2])):
            raise ShapeError(f"q {q}, k {k} and v {v} must have the same leading dims")
        if not dim_eq(q.shape[-1], k.shape[-1]):
            raise ShapeError(f"q {q} and k {k} must have the same last dim")
        if not dim_eq(k.shape[-2], v.shape[-2]):
            raise ShapeError(f"k {k} and v {v} must have the same number of positions (dim -2)")
        return [TensorType(q.shape[:-1] + (v.shape[-1],), q.dtype)]

    def flops(self, a, ins, outs):
        q, k, v = ins
        pairs = numel(q.shape[:-1]) * k.shape[-2]
        return 2 * pairs * q.shape[-1] + 2 * pairs * v.shape[-1] + 6 * pairs


def default_scale(node: Node) -> float:
    a = node.attrs
    return a.scale if a.scale is not None else 1.0 / math.sqrt(node.inputs[0].type.shape[-1])
