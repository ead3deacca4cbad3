"""Weight-only block-quantized layers (BOOK.md §4), created by the `quantize` pass."""
from __future__ import annotations

from typing import Literal

from pydantic import PositiveInt

from ..ir import Init, ParamDef, TensorType, numel
from . import Op, OpAttrs, ShapeError, register
from .linear import uniform_fan_in
from .rules import check_declared

BLOCK = 32
# Per format: bytes of codes per block and the zero point z in x̄ = d·(q − z) + m.
CODE_BYTES = {"q8_0": 32, "q4_0": 16, "q4_1": 16}
ZERO_POINT = {"q8_0": 128, "q4_0": 8, "q4_1": 0}


def block_buffers(rows: int, row_length: int, fmt: str) -> dict[str, ParamDef]:
    """The buffers of a block-quantized matrix (linear_q's weight, embedding_q's table): codes
    [rows, blocks, code bytes], fp16 scales [rows, blocks] and, for q4_1, fp16 minimums."""
    nb, zero = row_length // BLOCK, Init("zeros")
    p = {
        "qweight": ParamDef((rows, nb, CODE_BYTES[fmt]), zero, dtype="uint8", buffer=True),
        "scale": ParamDef((rows, nb), Init("constant", (("value", 1.0 / 64),)), dtype="float16", buffer=True),
    }
    if fmt == "q4_1":
        p["min"] = ParamDef((rows, nb), zero, dtype="float16", buffer=True)
    return p


@register
class LinearQ(Op):
    """y = x W̄^T + b with W̄ dequantized from blocks of 32 weights along each row:
    W̄ = d·(q − z) + m (Q8_0: uint8 q = code + 128, z = 128; Q4_0: z = 8; Q4_1: z = 0 and a
    minimum m per block). 4-bit codes are packed two per byte, weight 2k in the low nibble
    and 2k + 1 in the high one (ONNX Runtime MatMulNBits' order); d and m are fp16."""

    name = "linear_q"

    class Attrs(OpAttrs):
        out_features: PositiveInt
        in_features: PositiveInt | None = None
        bias: bool = True
        format: Literal["q8_0", "q4_0", "q4_1"] = "q4_1"

    def resolve(self, a, ins):
        x = ins[0]
        if x.rank < 1:
            raise ShapeError(f"linear_q expects at least one dimension, got {x}")
        if x.dtype != "float32":
            raise ShapeError(f"linear_q takes float32 inputs, got {x.dtype}")
        n = check_declared(a.in_features, x, -1, "in_features")
        if n % BLOCK:
            raise ShapeError(f"linear_q needs in_features divisible by the block size {BLOCK}, got {n}",
                             field="in_features")
        return a.model_copy(update={"in_features": n})

    def infer(self, a, ins):
        return [TensorType(ins[0].shape[:-1] + (a.out_features,), ins[0].dtype)]

    def params(self, a, ins):
        p = block_buffers(a.out_features, a.in_features, a.format)
        if a.bias:
            p["bias"] = ParamDef((a.out_features,), uniform_fan_in(a.in_features))
        return p

    def flops(self, a, ins, outs):
        return numel(outs[0].shape) * (2 * a.in_features + (1 if a.bias else 0))


@register
class EmbeddingQ(Op):
    """Token lookup in a block-quantized table (blocks of 32 along each row, the layout of
    linear_q): the rows of the ids are gathered from the packed codes, scales and minimums,
    then dequantized, W̄ = d·(q − z) + m. The quantize pass makes it from `embedding`; a linear
    layer tied to the table (GPT-2's lm_head) becomes a linear_q reading the same buffers."""

    name = "embedding_q"
    input_kind = "int"

    class Attrs(OpAttrs):
        num_embeddings: PositiveInt
        embedding_dim: PositiveInt
        format: Literal["q8_0", "q4_0", "q4_1"] = "q4_1"

    def resolve(self, a, ins):
        if a.embedding_dim % BLOCK:
            raise ShapeError(f"embedding_q needs embedding_dim divisible by the block size {BLOCK}, got {a.embedding_dim}",
                             field="embedding_dim")
        return a

    def infer(self, a, ins):
        return [TensorType(ins[0].shape + (a.embedding_dim,), "float32")]

    def params(self, a, ins):
        return block_buffers(a.num_embeddings, a.embedding_dim, a.format)

    def flops(self, a, ins, outs):
        return numel(outs[0].shape) * 2  # dequantize the gathered rows: a multiply and an add per value
