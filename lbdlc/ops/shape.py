"""Ops that only move data: flatten, reshape, concatenation."""
from __future__ import annotations

import sympy
from pydantic import Field

from ..ir import Dim, TensorType, as_dim, dim_eq, numel, symbol
from . import Op, OpAttrs, ShapeError, register
from .rules import axis


@register
class Flatten(Op):
    """Merge dimensions start_dim..end_dim into one (torch.flatten); by default all but the batch dimension."""

    name = "flatten"

    class Attrs(OpAttrs):
        start_dim: int = 1
        end_dim: int = -1

    def infer(self, a, ins):
        x = ins[0]
        s, e = axis(a.start_dim, x.rank, "start_dim"), axis(a.end_dim, x.rank, "end_dim")
        if s > e:
            raise ShapeError(f"start_dim ({a.start_dim}) comes after end_dim ({a.end_dim})", field="start_dim")
        return [TensorType(x.shape[:s] + (numel(x.shape[s : e + 1]),) + x.shape[e + 1 :], x.dtype)]


@register
class Reshape(Op):
    """View the data with another shape; entries are sizes, symbol names (`batch`), or one -1 to infer."""

    name = "reshape"

    class Attrs(OpAttrs):
        shape: list[int | str] = Field(min_length=1)

    def infer(self, a, ins):
        x = ins[0]
        known: list[Dim | None] = []
        for d in a.shape:
            if isinstance(d, str):
                if not d.isidentifier():
                    raise ShapeError(f"'{d}' is not a dimension name", field="shape")
                known.append(as_dim(symbol(d)))
            elif d == -1:
                known.append(None)
            elif d > 0:
                known.append(d)
            else:
                raise ShapeError(f"{d} is not a valid size (use positive sizes, names, or one -1)", field="shape")
        if known.count(None) > 1:
            raise ShapeError("only one dimension can be -1", field="shape")
        total = numel(x.shape)
        given = numel([d for d in known if d is not None])
        if None in known:
            rest = as_dim(sympy.sympify(total) / given)
            if sympy.denom(rest) != 1:
                raise ShapeError(f"cannot reshape {x} ({total} elements) to {a.shape}", field="shape")
            known[known.index(None)] = rest
        elif not dim_eq(total, given):
            raise ShapeError(f"cannot reshape {x} ({total} elements) to {a.shape} ({given} elements)", field="shape")
        return [TensorType(tuple(known), x.dtype)]


@register
class Concat(Op):
    """Join tensors along one dimension (dim 1, channels, by default); other dimensions must agree."""

    name = "concat"
    arity = (2, None)

    class Attrs(OpAttrs):
        dim: int = 1

    def infer(self, a, ins):
        rank = ins[0].rank
        if any(t.rank != rank for t in ins):
            raise ShapeError("concat needs inputs of one rank, got " + ", ".join(str(t) for t in ins))
        d = axis(a.dim, rank)
        for i in range(rank):
            if i != d and not all(dim_eq(t.shape[i], ins[0].shape[i]) for t in ins):
                raise ShapeError(
                    f"concat along dim {a.dim} needs equal sizes in dim {i}, got " + ", ".join(str(t) for t in ins),
                    field="dim",
                )
        total = as_dim(sum((t.shape[d] for t in ins), 0))
        return [TensorType(ins[0].shape[:d] + (total,) + ins[0].shape[d + 1 :], ins[0].dtype)]


@register
class Mean(Op):
    """Average over some dimensions (`dims`), keeping them as size 1 with `keepdim`."""

    name = "mean"

    class Attrs(OpAttrs):
        dims: list[int] = Field(min_length=1)
        keepdim: bool = False

    def infer(self, a, ins):
        x = ins[0]
        dims = sorted({axis(d, x.rank, "dims") for d in a.dims})
        if len(dims) != len(a.dims):
            raise ShapeError(f"dims {a.dims} name a dimension twice", field="dims")
        shape = [1 if i in dims else d for i, d in enumerate(x.shape)] if a.keepdim else [d for i, d in enumerate(x.shape) if i not in dims]
        return [TensorType(tuple(shape), x.dtype)]

    def flops(self, a, ins, outs):
        return numel(ins[0].shape)


@register
class Matmul(Op):
    """Matrix product of two tensors, torch.matmul style: [..., n, k] @ [..., k, m], batch dims broadcast."""

    name = "matmul"
    arity = 2

    class Attrs(OpAttrs):
        transpose_b: bool = False  # x @ y.transpose(-2, -1): y is [..., m, k] (attention scores q @ k^T)

    def infer(self, a, ins):
        x, y = ins
        if x.rank < 2 or y.rank < 2:
            raise ShapeError(f"matmul needs two tensors of rank 2 or more, got {x} and {y}")
        k, m = (y.shape[-1], y.shape[-2]) if a.transpose_b else (y.shape[-2], y.shape[-1])
        if not dim_eq(x.shape[-1], k):
            t = " transposed (transpose_b)" if a.transpose_b else ""
            raise ShapeError(f"matmul needs the inner sizes to agree: {x} @ {y}{t} ({x.shape[-1]} vs {k})")
        from .rules import broadcast

        batch = broadcast([x.shape[:-2], y.shape[:-2]]) if x.rank > 2 or y.rank > 2 else ()
        return [TensorType(tuple(batch) + (x.shape[-2], m), x.dtype)]

    def flops(self, a, ins, outs):
        return 2 * numel(outs[0].shape) * ins[0].shape[-1]
