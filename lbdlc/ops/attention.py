"""Transformer ops: token embedding, position encodings (learned and sinusoidal), multi-head attention.

Layout is batch first throughout: [batch, seq, dim]. The sequence length is usually symbolic
(`tokens: {shape: [batch, seq], dtype: int64}`), so nothing here assumes a fixed `seq`.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, PositiveFloat, PositiveInt

from ..ir import Init, ParamDef, TensorType, as_dim, dim_eq, numel
from . import Op, OpAttrs, ShapeError, register
from .linear import uniform_fan_in
from .rules import check_declared, expect_rank

def sinusoidal_table(max_positions: int, dim: int, base: float = 10000.0, layout: str = "interleaved") -> np.ndarray:
    """pe[t, 2i] = sin(t / base^(2i/dim)), pe[t, 2i+1] = cos(t / base^(2i/dim)), as float32.

    layout "sin_cos" (tensor2tensor, Whisper's encoder): pe[t] = [sin(t·f), cos(t·f)] with
    f_i = base^(-i / (dim/2 - 1)), i < dim/2.
    Computed in float64 and rounded once, the way the generated PyTorch module does it, so
    every backend holds the same table.
    """
    t = np.arange(max_positions, dtype=np.float64)[:, None]
    if layout == "sin_cos":
        half = dim // 2
        angle = t * np.exp(-np.log(base) * np.arange(half, dtype=np.float64) / (half - 1))
        return np.concatenate([np.sin(angle), np.cos(angle)], axis=1).astype(np.float32)
    angle = t / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    pe = np.zeros((max_positions, dim), dtype=np.float64)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle[:, : dim // 2])
    return pe.astype(np.float32)


@register
class Embedding(Op):
    """Token lookup table: integer ids [*] -> vectors [*, embedding_dim] (nn.Embedding)."""

    name = "embedding"
    input_kind = "int"

    class Attrs(OpAttrs):
        num_embeddings: PositiveInt  # vocabulary size; ids must lie in [0, num_embeddings)
        embedding_dim: PositiveInt

    def infer(self, a, ins):
        return [TensorType(ins[0].shape + (a.embedding_dim,), "float32")]

    def params(self, a, ins):
        return {"weight": ParamDef((a.num_embeddings, a.embedding_dim), Init("normal", (("std", 1.0),)))}

    def flops(self, a, ins, outs):
        return 0  # a gather: memory traffic, no arithmetic


class _Positions(Op):
    """Shared rule of the position ops: [batch, seq, dim] in, the same shape out, seq <= max_positions."""

    flops_per_element = 1  # one addition per element

    def resolve(self, a, ins):
        x = ins[0]
        expect_rank(x, (3,), self.name)
        dim = check_declared(a.embedding_dim, x, -1, "embedding_dim")
        seq = x.shape[1]
        if isinstance(seq, int) and seq > a.max_positions:
            raise ShapeError(
                f"the input {x} has {seq} positions, more than max_positions={a.max_positions}",
                field="max_positions",
                hint=f"set max_positions to at least {seq}",
            )
        return a.model_copy(update={"embedding_dim": dim})


@register
class PositionEmbedding(_Positions):
    """Learned absolute positions added to [batch, seq, dim]: x + weight[:seq]."""

    name = "position_embedding"

    class Attrs(OpAttrs):
        max_positions: PositiveInt
        embedding_dim: PositiveInt | None = None  # the input's last dim, inferred when left out

    def params(self, a, ins):
        return {"weight": ParamDef((a.max_positions, a.embedding_dim), Init("normal", (("std", 0.02),)))}


@register
class SinusoidalPosition(_Positions):
    """Fixed sine/cosine positions (Vaswani et al.) added to [batch, seq, dim]: x + pe[:seq]; no parameters."""

    name = "sinusoidal_position"

    class Attrs(OpAttrs):
        max_positions: PositiveInt = 4096  # rows of the constant table the artifacts carry
        embedding_dim: PositiveInt | None = None  # the input's last dim, inferred when left out
        base: PositiveFloat = 10000.0
        layout: Literal["interleaved", "sin_cos"] = "interleaved"  # sin_cos: [sin | cos] halves (Whisper)

    def resolve(self, a, ins):
        a = super().resolve(a, ins)
        if a.layout == "sin_cos" and (a.embedding_dim % 2 or a.embedding_dim < 4):
            raise ShapeError(
                f"layout sin_cos needs an even embedding_dim of at least 4 (half sines, half cosines), "
                f"got {a.embedding_dim}",
                field="layout", hint="use layout: interleaved for this width",
            )
        return a


@register
class Attention(Op):
    """Multi-head scaled dot-product attention with q/k/v/out projections; self-attention, or cross-attention on a second input.

    Inputs: the query source [batch, seq, dim] and optionally the key/value source
    [batch, seq_kv, dim]. With `causal`, query position i attends to key positions j <= i
    (top-left aligned, also when seq != seq_kv). `dropout` applies to the attention weights
    in training and is the identity at inference.
    """

    name = "attention"
    arity = (1, 2)

    class Attrs(OpAttrs):
        heads: PositiveInt
        embed_dim: PositiveInt | None = None  # the query's last dim, inferred when left out
        causal: bool = False
        bias: bool = True
        dropout: float = Field(0.0, ge=0.0, lt=1.0)
        key_bias: bool | None = None  # k_proj's bias; follows `bias` when left out (Whisper: false)

    def resolve(self, a, ins):
        q = ins[0]
        expect_rank(q, (3,), "attention")
        dim = check_declared(a.embed_dim, q, -1, "embed_dim")
        if dim % a.heads:
            fits = [h for h in range(1, dim + 1) if dim % h == 0]
            raise ShapeError(
                f"heads={a.heads} does not divide embed_dim {dim}, the last dim of the query {q}",
                field="heads",
                hint="choose heads from " + ", ".join(map(str, fits)),
            )
        if len(ins) == 2:
            kv = ins[1]
            expect_rank(kv, (3,), "attention's key/value input")
            if not dim_eq(kv.shape[-1], dim):
                raise ShapeError(f"the key/value source {kv} must have the query's feature size {dim} in its last dim (query {q})")
            if not dim_eq(kv.shape[0], q.shape[0]):
                raise ShapeError(f"the query {q} and the key/value source {kv} differ in their batch dim")
        return a.model_copy(update={"embed_dim": dim})

    def infer(self, a, ins):
        return [ins[0]]

    def params(self, a, ins):
        init = uniform_fan_in(a.embed_dim)  # nn.Linear's default, as in the generated module
        square = (a.embed_dim, a.embed_dim)
        p = {}
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            p[f"{proj}.weight"] = ParamDef(square, init)
            if (a.key_bias if proj == "k_proj" and a.key_bias is not None else a.bias):
                p[f"{proj}.bias"] = ParamDef((a.embed_dim,), init)
        return p

    def flops(self, a, ins, outs):
        q, kv = ins[0], ins[-1]
        dim, heads = a.embed_dim, a.heads
        per_token = 2 * dim * dim + (dim if a.bias else 0)  # one projection of one token
        rows_q, rows_kv = numel(q.shape[:-1]), numel(kv.shape[:-1])  # batch·seq, batch·seq_kv
        projections = per_token * (2 * rows_q + 2 * rows_kv)  # q and out; k and v
        if a.key_bias is not None and a.key_bias != a.bias:  # k_proj's bias differs from the others'
            projections += (dim if a.key_bias else -dim) * rows_kv
        pairs = rows_q * kv.shape[1]  # batch·seq·seq_kv query-key pairs (causal counted in full)
        scores_and_mix = 2 * 2 * dim * pairs  # QK^T and PV over all heads
        softmax = 6 * heads * pairs  # scale, max, exp, sum, divide
        return as_dim(projections + scores_and_mix + softmax)
