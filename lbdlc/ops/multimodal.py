"""Ops of the book's multimodal and generative models: CLIP's joint embedding (QuickGELU,
L2 normalisation, a learned temperature, the features at each text's EOS token) and the
diffusion denoiser's sinusoidal timestep embedding.

- `quick_gelu`: x·sigmoid(1.702·x), the activation of OpenAI's CLIP towers.
- `l2_normalize`: x / max(‖x‖₂, eps) along one dim (F.normalize).
- `learned_scale`: x times one learned number; with `log: true` the parameter holds the
  logarithm of the scale (CLIP's `logit_scale`, initialised to ln(1/0.07)).
- `argmax`: index of the largest entry along a dim (int64), e.g. the EOS token, which has
  the largest id in CLIP's vocabulary.
- `select_at`: x[b, index[b]] for every sample b: per-sample positions from an int input.
- `timestep_embedding`: sin/cos features of a timestep tensor [*] -> [*, embedding_dim]
  (DDPM; diffusers' get_timestep_embedding; Whisper's positional table is the same formula).
"""
from __future__ import annotations

import math

import numpy as np
from pydantic import Field, PositiveFloat, PositiveInt

from ..ir import Init, ParamDef, TensorType, dim_eq, numel
from . import Op, OpAttrs, ShapeError, register
from .rules import FLOAT_DTYPES, INT_DTYPES, axis, check_input_kind


@register
class QuickGelu(Op):
    """x·sigmoid(1.702·x), the GELU approximation of OpenAI's CLIP."""

    name = "quick_gelu"
    flops_per_element = 6


@register
class L2Normalize(Op):
    """x / max(‖x‖₂, eps) along one dimension (F.normalize with p=2), e.g. CLIP's unit-length embeddings."""

    name = "l2_normalize"
    flops_per_element = 3  # square, sum, divide

    class Attrs(OpAttrs):
        dim: int = -1
        eps: PositiveFloat = 1e-12

    def infer(self, a, ins):
        axis(a.dim, ins[0].rank)
        return [ins[0]]


def scale_parameter(a) -> float:
    """The initial value of learned_scale's parameter: the scale, or its logarithm with `log`."""
    return math.log(a.scale) if a.log else a.scale


@register
class LearnedScale(Op):
    """x · s with one learned scalar s; with `log: true` the parameter is ln(s), s = exp(weight) (CLIP's temperature).

    `scale` is the initial scale s (CLIP: 1/0.07, so the parameter starts at ln(1/0.07)).
    """

    name = "learned_scale"
    flops_per_element = 1

    class Attrs(OpAttrs):
        scale: float = 1.0  # the initial scale (not its logarithm)
        log: bool = False  # store ln(scale): the scale stays positive while training

    def resolve(self, a, ins):
        if a.log and a.scale <= 0:
            raise ShapeError(f"scale={a.scale} has no logarithm; with `log: true` the initial scale must be positive",
                             field="scale", hint="e.g. `scale: ${1 / 0.07}` for CLIP's temperature")
        return a

    def params(self, a, ins):
        return {"weight": ParamDef((), Init("constant", (("value", scale_parameter(a)),)))}


@register
class Argmax(Op):
    """Index (int64) of the largest entry along one dimension, the first one on ties (torch.argmax)."""

    name = "argmax"
    input_kind = "any"

    class Attrs(OpAttrs):
        dim: int = -1
        keepdim: bool = False

    def infer(self, a, ins):
        x = ins[0]
        if x.dtype not in FLOAT_DTYPES + INT_DTYPES:
            raise ShapeError(f"argmax takes numbers, got {x} {x.dtype}")
        d = axis(a.dim, x.rank)
        shape = x.shape[:d] + ((1,) if a.keepdim else ()) + x.shape[d + 1 :]
        return [TensorType(shape, "int64")]

    def flops(self, a, ins, outs):
        return numel(ins[0].shape)  # one comparison per element


@register
class SelectAt(Op):
    """Per sample b, take position index[b] of dim 1 and drop that dim: x[arange(batch), index] (CLIP's EOS token).

    Inputs: x [batch, seq, *] and integer positions [batch], each in [0, seq).
    """

    name = "select_at"
    arity = 2
    input_kind = "any"

    def infer(self, a, ins):
        x, index = ins
        check_input_kind(self.name, "float", x)
        if index.dtype not in INT_DTYPES:
            raise ShapeError(f"select_at reads positions from an integer input [batch], got {index} {index.dtype}",
                             hint="the inputs are `in: [x, positions]`; positions come from an int64 input or `op: argmax`")
        if x.rank < 2:
            raise ShapeError(f"select_at picks positions along dim 1 of a rank-2 or higher tensor, got {x}")
        if index.rank != 1 or not dim_eq(index.shape[0], x.shape[0]):
            raise ShapeError(f"select_at needs one position per sample: positions {index} must be [{x.shape[0]}] for x {x}",
                             hint="the inputs are `in: [x, positions]`")
        return [TensorType(x.shape[:1] + x.shape[2:], x.dtype)]

    def flops(self, a, ins, outs):
        return 0  # a gather


def timestep_frequencies(half: int, max_period: float, shift: float) -> np.ndarray:
    """exp(-ln(max_period) · i / (half - shift)) for i < half, computed in float64 and rounded
    once to float32, the way every backend (and the generated module) holds them."""
    i = np.arange(half, dtype=np.float64)
    return np.exp(-math.log(max_period) * i / (half - shift)).astype(np.float32)


@register
class TimestepEmbedding(Op):
    """Sinusoidal features of timesteps [*] -> [*, embedding_dim]: [sin(t·f), cos(t·f)] with f_i = max_period^(-i/(half - shift)).

    DDPM's and diffusers' get_timestep_embedding (flip_sin_to_cos, downscale_freq_shift,
    max_period); int timesteps are converted to float32 first.
    """

    name = "timestep_embedding"
    input_kind = "any"
    flops_per_element = 2  # t·f and a sine or cosine per output element

    class Attrs(OpAttrs):
        embedding_dim: PositiveInt
        max_period: PositiveFloat = 10000.0
        flip_sin_to_cos: bool = False  # [cos, sin] instead of [sin, cos]
        downscale_freq_shift: float = Field(1.0, ge=0.0)  # 1: DDPM (half - 1 in the exponent); 0: guided diffusion

    def resolve(self, a, ins):
        t = ins[0]
        if t.dtype not in FLOAT_DTYPES + INT_DTYPES:
            raise ShapeError(f"timestep_embedding takes float or int timesteps, got {t} {t.dtype}")
        if t.rank < 1:
            raise ShapeError(f"timestep_embedding expects timesteps [batch], got a scalar {t}")
        if a.embedding_dim % 2:
            raise ShapeError(f"embedding_dim={a.embedding_dim} is odd; it holds a sine and a cosine per frequency",
                             field="embedding_dim", hint=f"use {a.embedding_dim + 1} or {a.embedding_dim - 1}")
        if a.embedding_dim // 2 - a.downscale_freq_shift <= 0:
            raise ShapeError(
                f"embedding_dim={a.embedding_dim} gives {a.embedding_dim // 2} frequencies, too few for "
                f"downscale_freq_shift={a.downscale_freq_shift} (the exponent divides by half - shift)",
                field="embedding_dim", hint="use a larger embedding_dim, or downscale_freq_shift: 0")
        return a

    def infer(self, a, ins):
        return [TensorType(ins[0].shape + (a.embedding_dim,), "float32")]
