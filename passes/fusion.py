"""Fusion: a linear layer or convolution with its bias, residual add and activation as one op;
the matmul-softmax-matmul pattern as one attention op; SiLU written out from primitives as
the op itself. Each rule is a pattern and a builder (passes/pattern.py)."""
from __future__ import annotations

from lbdlc import ops
from lbdlc.ir import Node
from lbdlc.ops.fused import ACTIVATION_OPS, activation_of

from .canonicalize import same_type
from .manager import Pass, register
from .pattern import P, Rewrite, fuse, rewrite
from .recognize import GELU_RULES  # GELU written out with erf or tanh

ACTIVATIONS = {op for op, _ in ACTIVATION_OPS.values()}


def _open(n: Node) -> bool:
    """A layer whose epilogue is still free: no activation yet, own parameter names (a tied
    layer is emitted as a functional call in PyTorch and stays as it is)."""
    return getattr(n.attrs, "activation", "none") == "none" and all(
        full == f"{n.name}.{local}" for local, full in n.params.items())


def _with_activation(layer: Node, act: Node, fused_op: str) -> Node:
    extra = {"negative_slope": act.attrs.negative_slope} if act.op == "leaky_relu" else {}
    return fuse(layer, fused_op, act, activation=activation_of(act), **extra)


def _with_residual(m, fused_op: str) -> list[Node] | None:
    layer, add = m["layer"], m.root
    r = m.value("r")
    if len(layer.inputs) != 1 or not (same_type(r, layer.outputs[0]) and same_type(add.outputs[0], layer.outputs[0])):
        return None  # a broadcast add, or a residual already there
    return [fuse(layer, fused_op, add, inputs=[layer.inputs[0], r])]


def _fusion_rules(plain: str, fused_op: str) -> list[Rewrite]:
    layer = dict(any_inputs=True, name="layer", where=_open)
    return [
        Rewrite(P("add", P((plain, fused_op), **layer), "r", commutative=True), lambda m: _with_residual(m, fused_op),
                f"{plain} + residual add fused"),
        Rewrite(P(ACTIVATIONS, P((plain, fused_op), **layer), name="act"),
                lambda m: [_with_activation(m["layer"], m.root, fused_op)], f"{plain} + activation fused"),
    ]


class _Fuse(Pass):
    plain: str
    fused: str

    def run(self, graph, ctx):
        return rewrite(graph, _fusion_rules(self.plain, self.fused), ctx)


@register
class FuseLinearActivation(_Fuse):
    name = "fuse_linear_activation"
    description = "Linear layer + residual add + activation -> one fused_linear (bias, residual and activation in the matmul's epilogue)."
    plain, fused = "linear", "fused_linear"


@register
class FuseConvActivation(_Fuse):
    name = "fuse_conv_activation"
    description = "conv2d + residual add + activation -> one fused_conv2d (bias, residual and activation in the convolution's epilogue)."
    plain, fused = "conv2d", "fused_conv2d"


def _attention(m, dropout: float = 0.0) -> list[Node] | None:
    q, k, v = m.value("q"), m.value("k"), m.value("v")
    attrs = ops.get("scaled_dot_product_attention").Attrs(scale=1.0, dropout=dropout)
    try:
        ops.get("scaled_dot_product_attention").infer(attrs, [q.type, k.type, v.type])
    except ops.ShapeError:
        return None  # broadcast batch dims: stays as written
    mix = m.root
    return [Node("scaled_dot_product_attention", mix.name, [q, k, v], list(mix.outputs), attrs, {}, mix.origin)]


def _last_dim(n: Node) -> bool:
    return n.attrs.dim % n.inputs[0].type.rank == n.inputs[0].type.rank - 1


_SCORES = P("matmul", "q", "k", where=lambda n: n.attrs.transpose_b)
_NOT_T = dict(where=lambda n: not n.attrs.transpose_b)
_ATTENTION = [
    Rewrite(P("matmul", P("softmax", _SCORES, where=_last_dim), "v", **_NOT_T), _attention, "matmul-softmax-matmul fused"),
    Rewrite(P("matmul", P("dropout", P("softmax", _SCORES, where=_last_dim), name="drop"), "v", **_NOT_T),
            lambda m: _attention(m, m["drop"].attrs.p), "matmul-softmax-dropout-matmul fused"),
]


@register
class FuseAttention(Pass):
    name = "fuse_attention"
    description = "softmax(q kᵀ) v written as matmul, softmax, matmul -> one scaled_dot_product_attention (SDPA kernels)."

    def run(self, graph, ctx):
        return rewrite(graph, _ATTENTION, ctx)


def _silu(m) -> list[Node]:
    mul = m.root
    return [Node("silu", mul.name, [m.value("x")], list(mul.outputs), ops.get("silu").Attrs(), {}, mul.origin)]


_RECOGNIZE = [Rewrite(P("mul", "x", P("sigmoid", "x"), commutative=True), _silu, "x·sigmoid(x) -> silu"), *GELU_RULES]


@register
class RecognizeActivations(Pass):
    name = "recognize_activations"
    description = "Activations written out from primitives become the op itself: x·sigmoid(x) -> silu, x·Φ(x) with erf or tanh -> gelu."

    def run(self, graph, ctx):
        return rewrite(graph, _RECOGNIZE, ctx)
