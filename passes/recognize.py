"""LayerNorm and GELU written out from primitives (mean, sub, pow, sqrt/rsqrt, div, erf,
tanh, affine) recognized as the single ops, which every backend has as one kernel
(nn.LayerNorm / F.gelu, ONNX LayerNormalization / Gelu, Relax's layer_norm / gelu).

LayerNorm, over the last dimension, without a learned scale and shift:

    d = x - mean(x, dims=[-1], keepdim)
    y = d / sqrt(mean(d², dims=[-1], keepdim) + eps)        (d² as pow(d, 2) or d·d;
    y = d · rsqrt(mean(d², ...) + eps)                       the + eps an `affine` shift)

GELU, exact or with the tanh approximation (the constants must be the textbook ones to
within 1e-6, so that the recognized op computes the same numbers):

    x · (0.5 · Φ + 0.5),  0.5x · (Φ + 1),  0.5 · (x · (Φ + 1))
    Φ = erf(x · 1/√2)     or   tanh(√(2/π) · (x + 0.044715 · x³))
"""
from __future__ import annotations

import math

from lbdlc import ops
from lbdlc.ir import Node

from .manager import Pass, register
from .pattern import P, Rewrite, rewrite


def _close(value: float, target: float) -> bool:
    return math.isclose(value, target, rel_tol=1e-6, abs_tol=1e-12)


def _affine(scale: float = 1.0, shift: float = 0.0):
    return lambda n: _close(n.attrs.scale, scale) and _close(n.attrs.shift, shift)


def _last_dim_mean(n: Node) -> bool:
    rank = n.inputs[0].type.rank
    return n.attrs.keepdim and [d % rank for d in n.attrs.dims] == [rank - 1]


def _exponent(e: float):
    return lambda n: n.attrs.exponent == e


# ---- GELU -----------------------------------------------------------------------------

_ERF = P("erf", P("affine", "x", where=_affine(1 / math.sqrt(2))))
_TANH = P("tanh", P("affine", P("add", "x", P("affine", P("pow", "x", where=_exponent(3.0)), where=_affine(0.044715)),
                                commutative=True), where=_affine(math.sqrt(2 / math.pi))))


def _gelu_forms(phi: P, approximate: str) -> list[Rewrite]:
    def build(m) -> list[Node]:
        root = m.root
        attrs = ops.get("gelu").Attrs(approximate=approximate)
        return [Node("gelu", root.name, [m.value("x")], list(root.outputs), attrs, {}, root.origin)]

    note = f"gelu ({'tanh' if approximate == 'tanh' else 'erf'}) written out -> gelu"
    return [
        Rewrite(P("mul", "x", P("affine", phi, where=_affine(0.5, 0.5)), commutative=True), build, note),
        Rewrite(P("mul", P("affine", "x", where=_affine(0.5)), P("affine", phi, where=_affine(1.0, 1.0)), commutative=True), build, note),
        Rewrite(P("affine", P("mul", "x", P("affine", phi, where=_affine(1.0, 1.0)), commutative=True), where=_affine(0.5)), build, note),
    ]


GELU_RULES = _gelu_forms(_ERF, "none") + _gelu_forms(_TANH, "tanh")


# ---- LayerNorm ------------------------------------------------------------------------

_SQUARE = [P("pow", "d", where=_exponent(2.0)), P("mul", "d", "d")]


def _variance(square: P) -> P:
    eps = P("affine", P("mean", square, where=_last_dim_mean), name="eps", where=lambda n: n.attrs.scale == 1.0 and n.attrs.shift > 0)
    return eps


def _layer_norm(m, index_of) -> list[Node] | None:
    """The root normalizes d; d must be x − mean(x) over the last dim, read only by the match."""
    root, d = m.root, m.value("d")
    graph_nodes, readers, outputs = index_of()
    sub = next((n for n in graph_nodes if any(o is d for o in n.outputs)), None)
    if sub is None or sub.op != "sub" or any(o is d for o in outputs):
        return None
    x, mu = sub.inputs
    mean = next((n for n in graph_nodes if any(o is mu for o in n.outputs)), None)
    if mean is None or mean.op != "mean" or mean.inputs[0] is not x or not _last_dim_mean(mean) or any(o is mu for o in outputs):
        return None
    matched = {id(n) for n in m.matched}
    if any(id(r) not in matched for r in readers(d)) or any(r is not sub for r in readers(mu)):
        return None  # d or the mean is used elsewhere too: it must stay
    if sub.outputs[0].type.shape != x.type.shape:
        return None  # x itself broadcast by the subtraction
    dim = x.type.shape[-1]
    if not isinstance(dim, int):
        return None  # layer_norm needs a fixed normalized size
    m.matched[:0] = [mean, sub]  # removed with the match
    attrs = ops.get("layer_norm").Attrs(normalized_shape=dim, eps=m["eps"].attrs.shift, elementwise_affine=False, bias=False)
    return [Node("layer_norm", root.name, [x], list(root.outputs), attrs, {}, root.origin)]


@register
class RecognizeLayerNorm(Pass):
    name = "recognize_layer_norm"
    description = "LayerNorm written out (x − mean, over sqrt(mean of squares + eps)) -> one layer_norm."

    def run(self, graph, ctx):
        def index_of():
            readers: dict[int, list[Node]] = {}
            for n in graph.nodes:
                for v in n.inputs:
                    readers.setdefault(id(v), []).append(n)
            outputs = list(graph.outputs)
            return graph.nodes, (lambda v: readers.get(id(v), [])), outputs

        note = "layer norm written out -> layer_norm"
        rules = []
        for square in _SQUARE:
            rules.append(Rewrite(P("div", "d", P("sqrt", _variance(square))), lambda m: _layer_norm(m, index_of), note))
            rules.append(Rewrite(P("mul", "d", P("rsqrt", _variance(square)), commutative=True), lambda m: _layer_norm(m, index_of), note))
        return rewrite(graph, rules, ctx)
