"""Tensor plumbing: reordering all dimensions (permute) and slicing a range along one dimension.

Related ops live with their families: transpose/select/cls_token in sequence.py, mean and
matmul in shape.py, silu/softplus/log_softmax/mul in elementwise.py.
"""
from __future__ import annotations

from pydantic import Field

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
