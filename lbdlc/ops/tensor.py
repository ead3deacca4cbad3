"""Tensor plumbing: reordering all dimensions (permute), slicing a range along one dimension,
and splitting a tensor into pieces (split, the one op with several outputs).

Related ops live with their families: transpose/select/cls_token in sequence.py, mean and
matmul in shape.py, silu/softplus/log_softmax/mul in elementwise.py.
"""
from __future__ import annotations

import sympy
from pydantic import Field, PositiveInt

from ..ir import Dim, TensorType, as_dim
from . import Op, OpAttrs, ShapeError, register
from .rules import axis


@register
class Permute(Op):
    """Reorder all dimensions (x.permute(*dims)): output dim i is input dim dims[i]."""

    name = "permute"

    class Attrs(OpAttrs):
        dims: list[int] = Field(min_length=1)

    def infer(self, a, ins):
        x = ins[0]
        if len(a.dims) != x.rank:
            raise ShapeError(f"dims {a.dims} has {len(a.dims)} entries, but the input {x} has rank {x.rank}", field="dims")
        perm = [axis(d, x.rank, "dims") for d in a.dims]
        if sorted(perm) != list(range(x.rank)):
            raise ShapeError(
                f"dims {a.dims} is not a permutation of the {x.rank} dimensions of {x}",
                field="dims",
                hint=f"name each of 0..{x.rank - 1} exactly once",
            )
        return [TensorType(tuple(x.shape[p] for p in perm), x.dtype)]


def permute_order(a, rank: int) -> list[int]:
    """A permute layer's dims made non-negative."""
    return [d % rank for d in a.dims]


@register
class Slice(Op):
    """Keep positions start:end:step along one dimension (x[:, start:end:step]); `end` defaults to the end."""

    name = "slice"

    class Attrs(OpAttrs):
        dim: int
        start: int = 0
        end: int | None = None
        step: int = Field(1, ge=1)

    def infer(self, a, ins):
        x = ins[0]
        d = axis(a.dim, x.rank)
        begin, end, size = slice_bounds(a, x.shape[d], x)
        return [TensorType(x.shape[:d] + (size,) + x.shape[d + 1 :], x.dtype)]


def slice_bounds(a, n: Dim, x: TensorType | None = None) -> tuple[Dim, Dim, Dim]:
    """(begin, end, length) of a slice along a dim of size n, with begin and end made
    non-negative (expressions of n when n is symbolic). Out-of-range bounds are errors,
    never silently clamped, so every backend computes the same thing."""
    what = f"dim {a.dim} of {x}" if x is not None else f"a dim of size {n}"
    if isinstance(n, int):
        if not -n <= a.start < n:
            raise ShapeError(f"start={a.start} is out of range for {what} (size {n})", field="start",
                             hint=f"use a start from {-n} to {n - 1}")
        if a.end is not None and not -n <= a.end <= n:
            raise ShapeError(f"end={a.end} is out of range for {what} (size {n})", field="end",
                             hint=f"use an end from {-n} to {n}, or leave it out for the end")
        begin = a.start % n
        end = n if a.end is None else (a.end + n if a.end < 0 else a.end)
        if end <= begin:
            raise ShapeError(f"start={a.start}, end={a.end} select nothing from {what} (size {n})", field="end")
        return begin, end, -(-(end - begin) // a.step)
    # Symbolic size: begin and end become expressions of n; the length must not shrink as n grows.
    if a.start < 0 and (a.end is not None and a.end >= 0):
        raise ShapeError(f"start={a.start} counts from the end of {what}, which is symbolic ({n}), "
                         f"but end={a.end} counts from the start", field="end",
                         hint="use a negative end too, or leave end out")
    begin = as_dim(n + a.start) if a.start < 0 else a.start
    end = n if a.end is None else (as_dim(n + a.end) if a.end < 0 else a.end)
    length = as_dim(end - begin)
    if isinstance(length, int):
        if length <= 0:
            raise ShapeError(f"start={a.start}, end={a.end} select nothing from {what}", field="end")
        return begin, end, -(-length // a.step)
    if a.step != 1:
        raise ShapeError(f"step={a.step} on {what} gives a length that depends on the symbolic size {n}",
                         field="step", hint="use step 1 there, or give start and end from the same side")
    return begin, end, length


@register
class Split(Op):
    """Cut a tensor along one dimension into pieces of the given `sizes` or into `parts` equal
    pieces; one output per piece, read as `<layer>.0`, `<layer>.1`, ... (torch.split)."""

    name = "split"

    class Attrs(OpAttrs):
        dim: int = 1  # like concat: channels by default
        sizes: list[PositiveInt] | None = Field(None, min_length=2)
        parts: int | None = Field(None, ge=2)

    def resolve(self, a, ins):
        if (a.sizes is None) == (a.parts is None):
            raise ShapeError("split needs either `sizes` (a list) or `parts` (a count), not both" if a.sizes else
                             "split needs `sizes` (a list of sizes) or `parts` (a number of equal pieces)",
                             field="sizes" if a.sizes else None, hint="e.g. `sizes: [16, 16]` or `parts: 2`")
        return a

    def infer(self, a, ins):
        x = ins[0]
        d = axis(a.dim, x.rank)
        return [TensorType(x.shape[:d] + (size,) + x.shape[d + 1 :], x.dtype) for size in split_sizes(a, x)]


def split_sizes(a, x: TensorType) -> list[Dim]:
    """The size of each piece of a split layer along its dimension; they add up to its size.
    `parts` may divide a symbolic size (2·batch into two pieces of batch); `sizes` needs a fixed one."""
    d = axis(a.dim, x.rank)
    n = x.shape[d]
    if a.parts is not None:
        piece = as_dim(sympy.expand(sympy.sympify(n) / a.parts))
        if isinstance(n, int):
            divides = n % a.parts == 0
        else:
            symbols = sorted(piece.free_symbols, key=str) if not isinstance(piece, int) else []
            divides = isinstance(piece, int) or (
                piece.is_polynomial(*symbols) and all(c.is_integer for c in sympy.Poly(piece, *symbols).coeffs())
            )
        if not divides:
            raise ShapeError(f"parts={a.parts} does not divide dim {a.dim} of {x} (size {n})", field="parts",
                             hint="split a dimension whose size is a multiple of the parts (e.g. 2*batch into 2)"
                             if not isinstance(n, int) else f"use sizes that add up to {n}, e.g. `sizes: [...]`")
        return [piece] * a.parts
    if not isinstance(n, int):
        raise ShapeError(f"sizes {a.sizes} must add up to dim {a.dim} of {x}, which is symbolic ({n})", field="sizes",
                         hint="use `parts: N` to cut a symbolic dimension into N equal pieces")
    if sum(a.sizes) != n:
        raise ShapeError(f"sizes {a.sizes} add up to {sum(a.sizes)}, but dim {a.dim} of {x} has size {n}", field="sizes",
                         hint=f"make them add up to {n}")
    return list(a.sizes)
