"""Latent variables: the VAE's reparameterised sample (Kingma & Welling, 2014).

`reparameterize` takes the encoder's mean and log-variance, [*, latent] each, and returns
z = mu + exp(logvar / 2) · eps with eps ~ N(0, 1) while training, so that gradients flow to
mu and logvar through a sample. Inference artifacts (ONNX, TVM, and the generated module in
eval mode) are deterministic and return the mean, z = mu: the decoder then shows the
reconstruction of the most likely latent, as dropout is the identity at inference.
"""
from __future__ import annotations

from ..ir import TensorType, dim_eq
from . import Op, ShapeError, register


@register
class Reparameterize(Op):
    """VAE sample z = mu + exp(logvar/2)·eps, eps ~ N(0, 1), while training; mu at inference. Inputs [mu, logvar]."""

    name = "reparameterize"
    arity = 2
    flops_per_element = 0  # inference: the identity on mu (training adds exp, two products and a sum)

    def infer(self, a, ins):
        mu, logvar = ins
        if mu.rank != logvar.rank or not all(dim_eq(p, q) for p, q in zip(mu.shape, logvar.shape)):
            raise ShapeError(f"mu {mu} and logvar {logvar} must have the same shape",
                             hint="the inputs are `in: [mu, logvar]`, two heads of the same width")
        return [TensorType(mu.shape, mu.dtype)]
