"""Activations, softmax, dropout and residual addition: ops that keep (or broadcast) shapes."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..ir import TensorType, numel
from . import Op, OpAttrs, register
from .rules import axis, broadcast


@register
class Relu(Op):
    """max(x, 0)."""

    name = "relu"
    flops_per_element = 1


@register
class Relu6(Op):
    """min(max(x, 0), 6), MobileNet's activation."""

    name = "relu6"
    flops_per_element = 2


@register
class LeakyRelu(Op):
    """x for x > 0, negative_slope·x otherwise (slope 0.01 by default)."""

    name = "leaky_relu"
    flops_per_element = 2

    class Attrs(OpAttrs):
        negative_slope: float = 0.01


@register
class Gelu(Op):
    """x·Φ(x), exact (erf) or with the tanh approximation."""

    name = "gelu"
    flops_per_element = 8

    class Attrs(OpAttrs):
        approximate: Literal["none", "tanh"] = "none"


@register
class Tanh(Op):
    """Hyperbolic tangent."""

    name = "tanh"
    flops_per_element = 4


@register
class Sigmoid(Op):
    """1 / (1 + exp(-x))."""

    name = "sigmoid"
    flops_per_element = 4


@register
class Silu(Op):
    """x·sigmoid(x) (SiLU, "swish")."""

    name = "silu"
    flops_per_element = 5


@register
class Softplus(Op):
    """log(1 + exp(beta·x)) / beta, and x itself where beta·x > threshold (PyTorch's convention)."""

    name = "softplus"
    flops_per_element = 5

    class Attrs(OpAttrs):
        beta: float = Field(1.0, gt=0)
        threshold: float = 20.0


@register
class Softmax(Op):
    """exp(x) / sum(exp(x)) along one dimension (the last by default)."""

    name = "softmax"
    flops_per_element = 5

    class Attrs(OpAttrs):
        dim: int = -1

    def infer(self, a, ins):
        axis(a.dim, ins[0].rank)
        return [ins[0]]


@register
class LogSoftmax(Softmax):
    """log(softmax(x)) along one dimension, computed stably."""

    name = "log_softmax"


@register
class Dropout(Op):
    """Training: zero each element with probability p and scale survivors by 1/(1-p). Inference: identity."""

    name = "dropout"
    flops_per_element = 0

    class Attrs(OpAttrs):
        p: float = Field(0.5, ge=0.0, lt=1.0)


@register
class Add(Op):
    """Elementwise sum of two or more tensors with NumPy broadcasting (residual connections)."""

    name = "add"
    arity = (2, None)

    def infer(self, a, ins):
        return [TensorType(broadcast([t.shape for t in ins]), ins[0].dtype)]

    def flops(self, a, ins, outs):
        return (len(ins) - 1) * numel(outs[0].shape)


@register
class Mul(Add):
    """Elementwise product of two or more tensors with NumPy broadcasting (gates, scaling)."""

    name = "mul"


# Arithmetic primitives: enough to write LayerNorm, GELU and similar formulas out by hand
# (`recognize_norms` at -O2 turns those back into the single ops).


@register
class Sub(Op):
    """a − b, elementwise with NumPy broadcasting."""

    name = "sub"
    arity = 2

    def infer(self, a, ins):
        return [TensorType(broadcast([t.shape for t in ins]), ins[0].dtype)]

    def flops(self, a, ins, outs):
        return numel(outs[0].shape)


@register
class Div(Sub):
    """a / b, elementwise with NumPy broadcasting."""

    name = "div"


@register
class Sqrt(Op):
    """Square root."""

    name = "sqrt"
    flops_per_element = 1


@register
class Rsqrt(Op):
    """1 / √x."""

    name = "rsqrt"
    flops_per_element = 2


@register
class Erf(Op):
    """The error function erf(x) = 2/√π ∫₀ˣ exp(−t²) dt."""

    name = "erf"
    flops_per_element = 8


@register
class Pow(Op):
    """x ** exponent, a constant exponent (x² for a variance, x³ in tanh-GELU)."""

    name = "pow"
    flops_per_element = 2

    class Attrs(OpAttrs):
        exponent: float


@register
class Affine(Op):
    """x · scale + shift with constant scalars: halving, x/√2, 1 + t, adding an epsilon."""

    name = "affine"
    flops_per_element = 2

    class Attrs(OpAttrs):
        scale: float = 1.0
        shift: float = 0.0
