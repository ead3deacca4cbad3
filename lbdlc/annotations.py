"""Walking Pydantic annotations: which model a Pydantic error path (`loc`) points into.

Used to list the keys allowed where an unknown key was written (did-you-mean), both for
layers (unions tagged by `op`) and for the `train:` section (unions tagged by `kind`).
"""
from __future__ import annotations

import types
import typing
from typing import Annotated, Callable, Union

from pydantic import BaseModel


def strip(t):
    """The annotation without `Annotated[...]` and without `None` in an optional union."""
    while typing.get_origin(t) is Annotated:
        t = typing.get_args(t)[0]
    args = typing.get_args(t)
    if typing.get_origin(t) in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return strip(rest[0]) if len(rest) == 1 else Union[tuple(rest)]
    return t


def literal_tag(model, field: str) -> str | None:
    """The value of a model's Literal discriminator field (`op`, `kind`), if it has one."""
    model = strip(model)
    if isinstance(model, type) and issubclass(model, BaseModel) and field in model.model_fields:
        return typing.get_args(model.model_fields[field].annotation)[0]
    return None


def model_at(annotation, path: tuple, union_member: Callable[[tuple, str], object]):
    """The model (or union) reached by following `path` through fields, list items, dict
    values and union members (`union_member(members, part)` picks one, or None)."""
    t = annotation
    for part in path:
        t = strip(t)
        if isinstance(t, type) and issubclass(t, BaseModel):
            field = next((f for n, f in t.model_fields.items() if part in (n, f.alias)), None)
            if field is None:
                return None
            t = field.annotation
            continue
        origin, args = typing.get_origin(t), typing.get_args(t)
        if origin is list:
            t = args[0]
        elif origin is dict:
            t = args[1]
        elif origin in (Union, types.UnionType):
            t = union_member(args, part)
            if t is None:
                return None
        else:
            return None
    return strip(t)
