"""Shape helpers shared by op definitions."""
from __future__ import annotations

import sympy

from ..ir import Dim, TensorType, as_dim, dim_eq
from . import ShapeError


FLOAT_DTYPES = ("float32", "float16", "bfloat16")
INT_DTYPES = ("int64", "int32")


def check_input_kind(op_name: str, kind: str, t: TensorType) -> None:
    if kind == "any":  # the op checks its inputs' dtypes itself (e.g. a float tensor and int positions)
        return
    wanted = FLOAT_DTYPES if kind == "float" else INT_DTYPES
    if t.dtype not in wanted:
        if kind == "float":
            raise ShapeError(f"{op_name} takes floating-point tensors, got {t} {t.dtype}",
                             hint="integer ids become vectors through `op: embedding` first")
        raise ShapeError(f"{op_name} takes integer ids, got {t} {t.dtype}", hint="declare the input with `dtype: int64`")


def pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def expect_rank(t: TensorType, ranks: tuple[int, ...], what: str) -> None:
    if t.rank not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ShapeError(f"{what} expects a rank-{want} input, got {t} (rank {t.rank})")


def axis(dim: int, rank: int, field: str = "dim") -> int:
    """A possibly negative axis, checked against the rank and made non-negative."""
    if not -rank <= dim < rank:
        raise ShapeError(f"{field}={dim} is out of range for a rank-{rank} tensor", field=field)
    return dim % rank


def window_out(size: Dim, kernel: int, stride: int, padding: int, dilation: int = 1) -> Dim:
    """floor((size + 2p - d(k-1) - 1) / s) + 1, the output length of a conv or pooling window."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    if isinstance(span, int):
        out = span // stride + 1
    else:
        out = as_dim(sympy.floor(span / stride) + 1)
    if isinstance(out, int) and out < 1:
        raise ShapeError(
            f"the window (kernel {kernel}, stride {stride}, padding {padding}, dilation {dilation}) "
            f"does not fit an input of size {size}",
            field="kernel_size",
        )
    return out


def check_declared(declared: int | None, x: TensorType, dim: int, field: str) -> int:
    """A size the user may write down (e.g. in_features); it must equal the incoming one."""
    actual = x.shape[dim]
    where = "its last dim" if dim in (-1, x.rank - 1) else f"dim {dim}"
    if not isinstance(actual, int):
        raise ShapeError(f"{field} follows {where} of {x}, which is symbolic ({actual}); it must be a fixed size", field=field)
    if declared is not None and declared != actual:
        raise ShapeError(
            f"{field} is {declared}, but the incoming tensor {x} has {actual} in {where}",
            field=field,
            hint=f"set {field}: {actual}, or leave it out to infer it",
        )
    return actual


def broadcast(shapes: list[tuple[Dim, ...]]) -> tuple[Dim, ...]:
    """NumPy broadcasting of several shapes."""
    rank = max(len(s) for s in shapes)
    out: list[Dim] = []
    for i in range(rank):
        dims = [s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0]
        chosen: Dim = 1
        for d in dims:
            if isinstance(d, int) and d == 1:
                continue
            if isinstance(chosen, int) and chosen == 1:
                chosen = d
            elif not dim_eq(chosen, d):
                raise ShapeError("shapes " + ", ".join("[" + ", ".join(map(str, s)) + "]" for s in shapes) + " do not broadcast")
        out.append(chosen)
    return tuple(out)
