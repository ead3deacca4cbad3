"""Loading YAML so that every mapping, key, list item and scalar remembers where it was written.

The loader returns plain `dict`/`list` subclasses (`LocDict`, `LocList`) that carry `Loc`s
beside the data, so Pydantic validates them as ordinary containers while errors found later
(validation, shapes, backends) can still point at a `file:line:col`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import SpecError


@dataclass(frozen=True)
class Loc:
    """A 1-based position in a source file."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


# The text of every file the loader has read, so error messages can quote the offending line.
_SOURCES: dict[str, str] = {}


def register_source(file: str, text: str) -> None:
    """Make `text` quotable in error messages under the name `file` (e.g. a --set argument)."""
    _SOURCES[file] = text


def source_line(loc: Loc) -> str | None:
    text = _SOURCES.get(loc.file)
    if text is None:
        return None
    lines = text.splitlines()
    return lines[loc.line - 1] if 0 < loc.line <= len(lines) else None


class LocDict(dict):
    """A mapping with the position of itself, of each key and of each value."""

    loc: Loc
    key_locs: dict
    value_locs: dict


class LocList(list):
    """A sequence with the position of itself and of each item."""

    loc: Loc
    item_locs: list


class _Loader(yaml.SafeLoader):
    """SafeLoader (a spec is data, never code) with YAML 1.2 floats: `3e-4` is a number."""


_FLOAT_1_2 = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "-+0123456789.":
    _Loader.yaml_implicit_resolvers[_first] = [
        (tag, rx) for tag, rx in _Loader.yaml_implicit_resolvers.get(_first, []) if tag != "tag:yaml.org,2002:float"
    ]
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789."))


def _loc(node: yaml.Node, file: str) -> Loc:
    # A quoted scalar's position is that of its first character, so that a column inside
    # an expression string (`"${4 * d}"`) maps onto the line.
    quoted = isinstance(node, yaml.ScalarNode) and node.style in ("'", '"')
    return Loc(file, node.start_mark.line + 1, node.start_mark.column + 1 + quoted)


def _convert(node: yaml.Node, loader: _Loader, file: str):
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # apply `<<: *anchor` merge keys
        out = LocDict()
        out.loc, out.key_locs, out.value_locs = _loc(node, file), {}, {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) or key is None:
                raise SpecError("mapping keys must be plain scalars", _loc(key_node, file))
            if key in out:
                raise SpecError(
                    f"duplicate key '{key}'",
                    _loc(key_node, file),
                    hint=f"'{key}' is already set at line {out.key_locs[key].line}; YAML would silently keep only one",
                )
            out[key] = _convert(value_node, loader, file)
            out.key_locs[key] = _loc(key_node, file)
            out.value_locs[key] = _loc(value_node, file)
        return out
    if isinstance(node, yaml.SequenceNode):
        out = LocList()
        out.loc, out.item_locs = _loc(node, file), []
        for item in node.value:
            out.append(_convert(item, loader, file))
            out.item_locs.append(_loc(item, file))
        return out
    return loader.construct_object(node, deep=True)


def load_yaml_text(text: str, file: str):
    """Parse YAML text into LocDict/LocList/scalars; syntax errors become SpecErrors."""
    _SOURCES[file] = text
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise SpecError("the file is empty", Loc(file, 1, 1), hint="a spec starts with `lbdlc: 1`")
        return _convert(root, loader, file)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        loc = Loc(file, mark.line + 1, mark.column + 1) if mark else Loc(file, 1, 1)
        problem = exc.problem or exc.context or "invalid YAML"
        raise SpecError(f"YAML syntax error: {problem}", loc, hint=_yaml_hint(problem)) from None
    except yaml.YAMLError as exc:  # e.g. an unknown tag such as !!python/object
        raise SpecError(f"YAML error: {exc}", Loc(file, 1, 1)) from None
    finally:
        loader.dispose()


def _yaml_hint(problem: str) -> str | None:
    if "mapping values are not allowed" in problem:
        return "a value that contains ': ' must be quoted, or the indentation is off"
    if "found character '\\t'" in problem:
        return "YAML indentation uses spaces, not tabs"
    if "could not find expected ':'" in problem:
        return "each entry of a mapping needs `key: value`"
    return None


def load_yaml_file(path: str | Path):
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"no such file: {path}", None) from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path} is not UTF-8 text ({exc.reason})", None) from None
    return load_yaml_text(text, str(path))


def _walk(data, path: tuple):
    """Follow `path` into loaded data: (node, its loc, whether the whole path was found).

    Components that are not keys of the current mapping but name its `op` (the tag Pydantic
    inserts for a discriminated union) are skipped. When the path leaves the data early (a
    missing key), the deepest node reached and its loc are returned with complete=False.
    """
    node, loc = data, getattr(data, "loc", None)
    for part in path:
        if isinstance(node, LocDict) and part in node:
            node, loc = node[part], node.value_locs[part]
        elif isinstance(node, LocList) and isinstance(part, int) and 0 <= part < len(node):
            node, loc = node[part], node.item_locs[part]
        elif isinstance(node, LocDict) and node.get("op") == part:
            continue
        else:
            return node, loc, False
    return node, loc, True


def loc_of(data, path: tuple) -> Loc | None:
    """The position of the value at `path`, or of the deepest container on the way to it."""
    return _walk(data, path)[1]


def key_loc(data, path: tuple) -> Loc | None:
    """The position of the last key of `path` (for errors about the key itself)."""
    parent, _, complete = _walk(data, path[:-1])
    if complete and isinstance(parent, LocDict) and path[-1] in parent:
        return parent.key_locs[path[-1]]
    return None


def node_at(data, path: tuple):
    node, _, complete = _walk(data, path)
    return node if complete else None
