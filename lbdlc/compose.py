"""Composition of spec files before anything else: `extends:` and `--set` overrides.

`extends: base.yaml` deep-merges the file over its base (paths are relative to the file).
Mappings merge key by key; a list is replaced wholesale, except that a mapping written over
a list of named items merges into those items by `name` (the documented merge key):

    extends: gpt2.yaml
    layers: {head: {out_features: 1000}}      # changes one layer of the inherited list

`--set PATH=VALUE` overrides one value: PATH walks mappings by key and lists by index or
item name (`layers.fc1.out_features=30`); a path may start with a variable name (`d_model`
for `vars.d_model`) or a top-level layer name (`fc1.out_features`). The
value is YAML (`3e-4`, `true`, `[1, 2]`). An override of a key that does not exist is an
error with did-you-mean, unless the key is a valid, unwritten attribute of that layer.
"""
from __future__ import annotations

from pathlib import Path

from .errors import Note, SpecError, did_you_mean
from .source import Loc, LocDict, LocList, load_yaml_file, load_yaml_text, register_source


def load_composed(path: str | Path, overrides: list[str] = ()) -> LocDict:
    raw = _with_extends(Path(path), [])
    for k, text in enumerate(overrides, start=1):
        apply_override(raw, text, f"--set#{k}" if len(overrides) > 1 else "--set")
    return raw


def _with_extends(path: Path, chain: list[tuple[Path, Loc | None]]) -> LocDict:
    raw = load_yaml_file(path)
    if not isinstance(raw, LocDict):
        raise SpecError("a spec is a mapping of keys (lbdlc, inputs, layers, ...)", getattr(raw, "loc", Loc(str(path), 1, 1)))
    if "extends" not in raw:
        return raw
    target, where = raw["extends"], raw.value_locs["extends"]
    if not isinstance(target, str):
        raise SpecError("`extends` names a spec file", where, hint="e.g. `extends: gpt2.yaml`")
    base_path = (path.parent / target).resolve()
    seen = [p for p, _ in chain] + [path.resolve()]
    if base_path in seen:
        loop = " -> ".join(p.name for p in seen[seen.index(base_path):]) + f" -> {base_path.name}"
        raise SpecError(
            f"the `extends` chain loops: {loop}",
            where,
            notes=[Note("extended from here", loc) for _, loc in chain if loc],
            hint="a spec cannot extend itself, directly or through others",
        )
    if not base_path.exists():
        raise SpecError(f"no such spec to extend: {target}", where, hint=f"looked for {base_path}")
    base = _with_extends(base_path, chain + [(path.resolve(), where)])
    _drop(raw, "extends")
    return merge(base, raw)


def _drop(d: LocDict, key) -> None:
    del d[key]
    d.key_locs.pop(key, None)
    d.value_locs.pop(key, None)


def _new_dict(loc: Loc) -> LocDict:
    out = LocDict()
    out.loc, out.key_locs, out.value_locs = loc, {}, {}
    return out


def merge(base, over):
    """`over` merged onto `base`; positions follow whichever file a value came from."""
    if isinstance(base, LocDict) and isinstance(over, LocDict):
        out = _new_dict(over.loc)
        for k in base:
            out[k], out.key_locs[k], out.value_locs[k] = base[k], base.key_locs[k], base.value_locs[k]
        for k in over:
            out[k] = merge(base[k], over[k]) if k in base else over[k]
            out.key_locs[k], out.value_locs[k] = over.key_locs[k], over.value_locs[k]
        return out
    if isinstance(base, LocList) and isinstance(over, LocDict):
        return _merge_by_name(base, over)
    return over


def _merge_by_name(base: LocList, over: LocDict) -> LocList:
    out = LocList(base)
    out.loc, out.item_locs = base.loc, list(base.item_locs)
    names = [item.get("name") if isinstance(item, dict) else None for item in base]
    for key in over:
        if key not in names:
            raise SpecError(
                f"no item named '{key}' in the inherited list",
                over.key_locs[key],
                hint=did_you_mean(key, [n for n in names if n]) or "a mapping over a list merges into the items with these names",
            )
        i = names.index(key)
        out[i] = merge(base[i], over[key])
    return out


def apply_override(raw: LocDict, text: str, file: str) -> None:
    path, sep, value_text = text.partition("=")
    try:
        value = _shift(load_yaml_text(value_text, file), len(path) + 1) if value_text.strip() else None
    except SpecError as exc:
        if exc.loc and exc.loc.line == 1:
            exc.loc = _moved(exc.loc, len(path) + 1)
        raise
    finally:
        register_source(file, text)
    if not sep or not path:
        raise SpecError(f"an override is KEY=VALUE, got '{text}'", Loc(file, 1, 1), hint="e.g. --set d_model=1024")
    segments = path.split(".")
    columns = [1 + sum(len(s) + 1 for s in segments[:k]) for k in range(len(segments))]
    if segments[0] not in raw:  # shorthands: a variable name, or a top-level layer name
        if isinstance(raw.get("vars"), LocDict) and segments[0] in raw["vars"]:
            segments, columns = ["vars"] + segments, [columns[0]] + columns
        elif isinstance(raw.get("layers"), LocList) and segments[0] in [l.get("name") for l in raw["layers"] if isinstance(l, dict)]:
            segments, columns = ["layers"] + segments, [columns[0]] + columns
    from .spec import source_keys

    if segments[0] not in raw and segments[0] not in source_keys():
        shorthands = list(raw) + list(raw.get("vars") or []) + [l.get("name") for l in raw.get("layers") or [] if isinstance(l, dict) and l.get("name")]
        raise SpecError(f"no key, variable or layer '{segments[0]}' to override", Loc(file, 1, 1),
                        hint=did_you_mean(segments[0], shorthands) or ("keys: " + ", ".join(map(str, raw))))
    node = raw
    for seg, col in zip(segments[:-1], columns[:-1]):
        node = _child(node, seg, Loc(file, 1, col))
    last, col = segments[-1], columns[-1]
    key_loc, value_loc = Loc(file, 1, col), Loc(file, 1, len(path) + 2)
    if isinstance(node, LocList):
        i = _index(node, last, key_loc)
        node[i], node.item_locs[i] = value, value_loc
        return
    if not isinstance(node, LocDict):
        raise SpecError(f"'{'.'.join(segments[:-1])}' holds a value, not a mapping", key_loc)
    if last not in node:
        allowed = _allowed_unwritten(node, raw)
        if last not in allowed:
            raise SpecError(
                f"no key '{last}' to override",
                key_loc,
                hint=did_you_mean(last, list(node) + allowed) or ("keys here: " + ", ".join(map(str, node))),
            )
    node[last] = value
    node.key_locs[last], node.value_locs[last] = key_loc, value_loc


def _child(node, seg: str, loc: Loc):
    if isinstance(node, LocDict):
        if seg in node:
            return node[seg]
        raise SpecError(f"no key '{seg}' to override", loc, hint=did_you_mean(seg, node) or ("keys here: " + ", ".join(map(str, node))))
    if isinstance(node, LocList):
        return node[_index(node, seg, loc)]
    raise SpecError(f"cannot go into '{seg}': the value there is not a mapping or list", loc)


def _index(node: LocList, seg: str, loc: Loc) -> int:
    if seg.isdigit():
        if int(seg) < len(node):
            return int(seg)
        raise SpecError(f"index {seg} is past the end of a list of {len(node)}", loc)
    names = [item.get("name") if isinstance(item, dict) else None for item in node]
    if seg in names:
        return names.index(seg)
    raise SpecError(f"no item named '{seg}' here", loc, hint=did_you_mean(seg, [n for n in names if n]))


def _allowed_unwritten(node: LocDict, raw: LocDict) -> list[str]:
    """Keys that may be set although the spec does not write them: a layer's attributes."""
    from . import ops
    from .spec import layer_model

    op = node.get("op")
    if isinstance(op, str) and op in ops.REGISTRY:
        return [f.alias or n for n, f in layer_model(op).model_fields.items()]
    blocks = raw.get("blocks")
    if isinstance(op, str) and isinstance(blocks, dict) and isinstance(blocks.get(op), dict):
        params = blocks[op].get("params") or {}
        return list(params) + ["name", "in", "repeat"]
    from .training.schema import allowed_unwritten

    if allowed_unwritten(node, raw):  # a mapping inside `train:`: its options
        return allowed_unwritten(node, raw)
    if node is raw:
        from .spec import source_keys

        return source_keys()
    return []


def _shift(value, columns: int):
    """Positions parsed from the text after `KEY=` moved to where that text sits in `KEY=VALUE`."""
    if isinstance(value, LocDict):
        value.loc = _moved(value.loc, columns)
        value.key_locs = {k: _moved(v, columns) for k, v in value.key_locs.items()}
        value.value_locs = {k: _moved(v, columns) for k, v in value.value_locs.items()}
        for v in value.values():
            _shift(v, columns)
    elif isinstance(value, LocList):
        value.loc = _moved(value.loc, columns)
        value.item_locs = [_moved(v, columns) for v in value.item_locs]
        for v in value:
            _shift(v, columns)
    return value


def _moved(loc: Loc, columns: int) -> Loc:
    return Loc(loc.file, loc.line, loc.col + columns) if loc.line == 1 else loc
