"""Sequence plumbing for Transformers over images and text: swapping dims, picking one
position ([CLS]), and prepending a learned [CLS] token."""
from __future__ import annotations

from pydantic import Field

from ..ir import Init, ParamDef, TensorType, as_dim
from . import Op, OpAttrs, ShapeError, register
from .rules import axis, expect_rank


@register
class Transpose(Op):
    """Swap two dimensions (x.transpose(a, b)), e.g. [batch, D, patches] -> [batch, patches, D]."""

    name = "transpose"

    class Attrs(OpAttrs):
        dims: list[int] = Field(min_length=2, max_length=2)

    def infer(self, a, ins):
        x = ins[0]
        i, j = (axis(d, x.rank, "dims") for d in a.dims)
        shape = list(x.shape)
        shape[i], shape[j] = shape[j], shape[i]
        return [TensorType(tuple(shape), x.dtype)]


def permutation(a, rank: int) -> list[int]:
    """The full permutation a transpose applies."""
    i, j = (d % rank for d in a.dims)
    perm = list(range(rank))
    perm[i], perm[j] = perm[j], perm[i]
    return perm


@register
class Select(Op):
    """Take one position along a dimension and drop that dimension (x[:, 0] for the [CLS] token)."""

    name = "select"

    class Attrs(OpAttrs):
        dim: int
        index: int = Field(ge=0)

    def infer(self, a, ins):
        x = ins[0]
        d = axis(a.dim, x.rank)
        size = x.shape[d]
        if isinstance(size, int) and a.index >= size:
            raise ShapeError(f"index {a.index} is out of range for dim {a.dim} of {x} (size {size})", field="index")
        return [TensorType(x.shape[:d] + x.shape[d + 1 :], x.dtype)]


@register
class ClsToken(Op):
    """Prepend a learned token to a sequence: [batch, seq, D] -> [batch, seq + 1, D] (ViT's class token, zero-initialised)."""

    name = "cls_token"

    def infer(self, a, ins):
        x = ins[0]
        expect_rank(x, (3,), "cls_token")
        return [TensorType((x.shape[0], as_dim(x.shape[1] + 1), x.shape[2]), x.dtype)]

    def params(self, a, ins):
        d = ins[0].shape[2]
        if not isinstance(d, int):
            raise ShapeError(f"the token width follows the last dim of {ins[0]}, which must be a fixed size")
        return {"token": ParamDef((1, 1, d), Init("zeros"))}

    def flops(self, a, ins, outs):
        return 0
