"""`lbdlc diff`: what changed in the model between two specs, not which lines changed.

Both sides are loaded and lowered as a build would (extends, --set, blocks and repeats,
defaults); the comparison is over the resolved specs and the lowered graphs:

- layers are matched by name; a layer whose name is new but whose op and hyper-parameters
  equal those of a vanished one, reading the same inputs (or, failing that, anywhere), is a
  rename, not a removal and an addition. Auto-generated names (`relu_2`, `group_1`) are
  matched by where they sit in the graph first, since inserting a layer renumbers them;
- a matched layer is *changed* when its op, hyper-parameters, inputs or position changed,
  and *affected* when only its shapes, parameters, FLOPs or activation size changed (the
  propagation of a change upstream);
- repeats and block uses (graph scopes) give the structure: stages that gained or lost
  blocks, blocks whose parameters changed;
- every other top-level section of the resolved spec (`train:`, `compile:`, name,
  description, ...) is compared key by key.

Totals (parameters, buffers, FLOPs and activation bytes per sample, every symbolic dimension
taken as 1 as in `lbdlc check`) come with their deltas. Two specs that differ only in
layout, key order or comments resolve to the same model: `same` is true.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import SpecError, SpecErrors
from .source import Loc, source_line

AUTO_NAME = re.compile(r"^(?:.*\.)?(?P<op>[a-z][a-z0-9_]*?)_(?P<k>\d+)$")


# -- one side of the comparison ------------------------------------------------------------
@dataclass
class LayerInfo:
    name: str
    op: str
    index: int  # position in graph order
    attrs: dict  # hyper-parameters as resolved (defaults written out), without name/op/in
    inputs: list[str]  # value names read
    output_shapes: list[str]
    param_shapes: dict[str, list[int]]
    params: int
    flops: int
    activation_bytes: int  # bytes of its outputs per sample
    loc: Loc | None

    @property
    def auto(self) -> bool:
        m = AUTO_NAME.match(self.name)
        return bool(m) and m.group("op") in (self.op, "group")


@dataclass
class Side:
    label: str  # what the user named: a path, `REV:path`, a manifest
    loaded: object
    graph: object
    summary: object
    resolved: dict
    layers: dict[str, LayerInfo]
    relabel: Callable[[str], str] = lambda f: f
    manifest: dict | None = None
    warnings: list[str] = field(default_factory=list)

    def where(self, loc: Loc | None) -> dict | None:
        if loc is None:
            return None
        return {"file": self.relabel(loc.file), "line": loc.line, "text": (source_line(loc) or "").strip()}


def _shape(t) -> str:
    return str(t)


def build_side(spec_path: Path, label: str, overrides: list[str] = (), relabel=lambda f: f) -> Side:
    from .analysis import summarize
    from .driver import DTYPE_BYTES
    from .ir import numel, per_sample
    from .lower import load, lower
    from .resolved import resolved_dict

    loaded = load(spec_path, list(overrides))
    graph = lower(loaded)
    summary = summarize(graph)
    resolved = resolved_dict(loaded)
    by_name = {layer["name"]: layer for layer in resolved["layers"]}
    layers: dict[str, LayerInfo] = {}
    for i, (node, stats) in enumerate(zip(graph.nodes, summary.layers)):
        spec_layer = by_name.get(node.name, {})
        layers[node.name] = LayerInfo(
            name=node.name,
            op=node.op,
            index=i,
            attrs={k: v for k, v in spec_layer.items() if k not in ("name", "op", "in")},
            inputs=[v.name for v in node.inputs],
            output_shapes=[_shape(v.type) for v in node.outputs],
            param_shapes={local: list(graph.params[full].shape) for local, full in node.params.items()},
            params=stats.params,
            flops=stats.flops,
            activation_bytes=sum(per_sample(numel(v.type.shape)) * DTYPE_BYTES.get(v.type.dtype, 4) for v in node.outputs),
            loc=node.origin,
        )
    return Side(label, loaded, graph, summary, resolved, layers, relabel)


# -- matching --------------------------------------------------------------------------------
def _owner(value: str, layers: dict, inputs: set) -> tuple[str, str, str] | None:
    """(kind, name, suffix) of the layer or input that produces a value."""
    if value in layers:
        return ("layer", value, "")
    if value in inputs:
        return ("input", value, "")
    head, _, k = value.rpartition(".")
    if head in layers and k.isdigit():
        return ("layer", head, "." + k)
    return None


def _map_inputs(layer: LayerInfo, src: Side, dst: Side, mapping: dict[str, str]) -> list[str] | None:
    """A layer's inputs renamed into the other side's names; None if one cannot be mapped yet."""
    src_inputs = {v.name for v in src.graph.inputs}
    dst_inputs = {v.name for v in dst.graph.inputs}
    out = []
    for v in layer.inputs:
        owner = _owner(v, src.layers, src_inputs)
        if owner is None:
            return None
        kind, name, suffix = owner
        if kind == "input":
            if name not in dst_inputs:
                return None
            out.append(name)
        else:
            if name not in mapping:
                return None
            out.append(mapping[name] + suffix)
    return out


def _signature(layer: LayerInfo, shapes: bool = True) -> str:
    sig = {"op": layer.op, "attrs": layer.attrs, "params": layer.param_shapes}
    if shapes:
        sig["out"] = layer.output_shapes
    return json.dumps(sig, sort_keys=True, default=str)


def match_layers(old: Side, new: Side) -> dict[str, str]:
    """new name -> old name for every layer that exists on both sides (renames included)."""
    new2old: dict[str, str] = {}
    old2new: dict[str, str] = {}

    def pair(n: str, o: str) -> None:
        new2old[n], old2new[o] = o, n

    # 1. Written names: the same name is the same layer.
    for name, layer in new.layers.items():
        if name in old.layers and not layer.auto:
            pair(name, name)
    # 2. By position in the graph: same op, reading the (matched) same inputs. Generated
    #    names always match this way (an insertion renumbers them); written names only with
    #    equal hyper-parameters (a rename).
    changed = True
    while changed:
        changed = False
        candidates: dict[tuple, list[str]] = {}
        for name, layer in old.layers.items():
            if name in old2new:
                continue
            mapped = _map_inputs(layer, old, new, old2new)
            if mapped is not None:
                candidates.setdefault((layer.op, tuple(mapped)), []).append(name)
        for name, layer in new.layers.items():
            if name in new2old:
                continue
            pool = [o for o in candidates.get((layer.op, tuple(layer.inputs)), []) if o not in old2new]
            if not pool:
                continue
            same_name = [o for o in pool if o == name]
            equal = [o for o in pool if old.layers[o].attrs == layer.attrs]
            both_auto = [o for o in pool if old.layers[o].auto and layer.auto]
            pick = (same_name or equal or both_auto or [None])[0]
            if pick is not None:
                pair(name, pick)
                changed = True
    # 3. Generated names left over: the same name.
    for name, layer in new.layers.items():
        if name not in new2old and name in old.layers and name not in old2new and old.layers[name].op == layer.op:
            pair(name, name)
    # 4. Anywhere: equal op, hyper-parameters, parameter and output shapes (a rename or move).
    pool: dict[str, list[str]] = {}
    for name, layer in old.layers.items():
        if name not in old2new:
            pool.setdefault(_signature(layer), []).append(name)
    for name, layer in new.layers.items():
        if name in new2old:
            continue
        olds = pool.get(_signature(layer))
        if olds:
            pair(name, olds.pop(0))
    return new2old


def _moved(pairs: list[tuple[str, str]], old: Side, new: Side) -> set[str]:
    """New names of matched layers outside the longest run kept in order (those that moved)."""
    seq = sorted(pairs, key=lambda p: new.layers[p[0]].index)
    olds = [old.layers[o].index for _, o in seq]
    # longest increasing subsequence, O(n log n)
    import bisect

    tails, tails_at, prev = [], [], [-1] * len(olds)
    for i, x in enumerate(olds):
        k = bisect.bisect_left(tails, x)
        if k == len(tails):
            tails.append(x)
            tails_at.append(i)
        else:
            tails[k], tails_at[k] = x, i
        prev[i] = tails_at[k - 1] if k else -1
    keep, i = set(), tails_at[-1] if tails_at else -1
    while i >= 0:
        keep.add(i)
        i = prev[i]
    return {seq[i][0] for i in range(len(seq)) if i not in keep}


# -- comparison ------------------------------------------------------------------------------
def _dict_changes(old: dict, new: dict) -> dict:
    out = {}
    for k in list(old) + [k for k in new if k not in old]:
        if old.get(k, _ABSENT) != new.get(k, _ABSENT):
            out[k] = [old.get(k), new.get(k)]
    return out


_ABSENT = object()


def _layer_entry(status: str, old: Side, new: Side, o: LayerInfo | None, n: LayerInfo | None, changes: dict) -> dict:
    ref = n or o
    entry = {
        "status": status,
        "name": ref.name,
        "op": ref.op,
        "old_name": o.name if o else None,
        "old": _layer_numbers(o) if o else None,
        "new": _layer_numbers(n) if n else None,
        "old_loc": old.where(o.loc) if o else None,
        "new_loc": new.where(n.loc) if n else None,
        "changes": changes,
    }
    if o and n:
        entry["delta"] = {k: entry["new"][k] - entry["old"][k] for k in ("params", "flops", "activation_bytes")}
    return entry


def _layer_numbers(layer: LayerInfo) -> dict:
    return {
        "op": layer.op,
        "attrs": layer.attrs,
        "output_shapes": layer.output_shapes,
        "params": layer.params,
        "flops": layer.flops,
        "activation_bytes": layer.activation_bytes,
    }


def _pair_changes(o: LayerInfo, n: LayerInfo, old: Side, new: Side, old2new: dict, moved: bool) -> tuple[dict, dict]:
    """(what was changed, what was affected) for a matched pair."""
    changed, affected = {}, {}
    if o.name != n.name:
        changed["name"] = [o.name, n.name]
    if o.op != n.op:
        changed["op"] = [o.op, n.op]
    attrs = _dict_changes(o.attrs, n.attrs)
    if attrs:
        changed["attrs"] = attrs
    mapped = _map_inputs(o, old, new, old2new)
    if mapped is None or [_last_of(v, new) for v in mapped] != [_last_of(v, new) for v in n.inputs]:
        if [_last_of(v, old) for v in o.inputs] != [_last_of(v, new) for v in n.inputs]:
            changed["in"] = [o.inputs, n.inputs]
    if moved:
        changed["moved"] = [o.index, n.index]
    if o.output_shapes != n.output_shapes:
        affected["output_shapes"] = [o.output_shapes, n.output_shapes]
    shapes = _dict_changes(o.param_shapes, n.param_shapes)
    if shapes:
        affected["param_shapes"] = shapes
    for k in ("params", "flops", "activation_bytes"):
        if getattr(o, k) != getattr(n, k):
            affected[k] = [getattr(o, k), getattr(n, k)]
    return changed, affected


def _last_of(value: str, side: Side) -> str:
    """`layer2.<last>.relu_3` for `layer2.3.relu_3` when layer2 repeats 4 times: a layer that
    reads a repeat's output reads its last repetition, whichever number that has."""
    parts = value.split(".")
    for k in range(len(parts) - 1, 0, -1):
        scope = side.graph.scopes.get(".".join(parts[:k]))
        if scope is not None and scope.repeat and parts[k] == str(scope.repeat - 1):
            parts[k] = "<last>"
    return ".".join(parts)


def _deep_changes(old, new, path: str, out: list) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            p = f"{path}.{k}" if path else str(k)
            if k not in new:
                out.append({"path": p, "change": "removed", "old": old[k], "new": None})
            elif k not in old:
                out.append({"path": p, "change": "added", "old": None, "new": new[k]})
            else:
                _deep_changes(old[k], new[k], p, out)
        return
    if old != new or type(old) is not type(new) and not (isinstance(old, (int, float)) and isinstance(new, (int, float))):
        out.append({"path": path, "change": "changed", "old": old, "new": new})


SKIP_SECTIONS = ("lbdlc", "layers", "inputs", "outputs")


def _signatures(values) -> list[dict]:
    return [{"name": v["name"], "shape": v["shape"], "dtype": v["dtype"]} for v in values]


def _io_changes(old: list[dict], new: list[dict], by_position: bool) -> list[dict]:
    out = []
    if by_position:
        for k in range(max(len(old), len(new))):
            a = old[k] if k < len(old) else None
            b = new[k] if k < len(new) else None
            if a != b:
                out.append({"index": k, "change": "added" if a is None else "removed" if b is None else "changed", "old": a, "new": b})
        return out
    olds, news = {v["name"]: v for v in old}, {v["name"]: v for v in new}
    for name in list(olds) + [n for n in news if n not in olds]:
        a, b = olds.get(name), news.get(name)
        if a != b:
            out.append({"name": name, "change": "added" if a is None else "removed" if b is None else "changed", "old": a, "new": b})
    return out


def _structure(old: Side, new: Side) -> list[dict]:
    """Repeats whose count changed; block uses added, removed or given other parameters."""
    out = []
    so, sn = old.graph.scopes, new.graph.scopes
    names = list(so) + [k for k in sn if k not in so]
    for name in names:
        a, b = so.get(name), sn.get(name)
        if (a and a.repeat) or (b and b.repeat):
            ra, rb = (a.repeat if a else _repetitions(old, name)), (b.repeat if b else _repetitions(new, name))
            if ra != rb:
                added = [f"{name}.{k}" for k in range(ra, rb)]
                removed = [f"{name}.{k}" for k in range(rb, ra)]
                within = lambda side, scopes: [l for l in side.layers.values() if any(l.name.startswith(s + ".") for s in scopes)]  # noqa: E731
                out.append({
                    "scope": name, "kind": "repeat", "old": ra, "new": rb, "added": added, "removed": removed,
                    "block": next((s.block for k, s in {**so, **sn}.items() if k.startswith(name + ".") and s.block), None),
                    "added_params": sum(l.params for l in within(new, added)),
                    "removed_params": sum(l.params for l in within(old, removed)),
                })
            continue
        if any(s["kind"] == "repeat" and name in s["added"] + s["removed"] for s in out):
            continue  # a repetition added or removed: the repeat's entry says it
        if a is None or b is None:
            side, s = (new, b) if a is None else (old, a)
            other = old if a is None else new
            if any(l.startswith(name + ".") for l in other.layers):
                continue  # there too, written without blocks (a flat, resolved spec)
            members = [l for l in side.layers.values() if l.name.startswith(name + ".")]
            out.append({
                "scope": name, "kind": "block", "block": s.block, "change": "added" if a is None else "removed",
                "layers": len(members), "params": sum(l.params for l in members),
            })
        elif a.block != b.block or a.params != b.params:
            out.append({
                "scope": name, "kind": "block", "block": b.block, "change": "changed",
                "old_block": a.block, "params": _dict_changes(dict(a.params), dict(b.params)),
            })
    return out


def _repetitions(side: Side, name: str) -> int:
    """How many repetitions of `name` a side's layers hold (for a spec written flat)."""
    found = {l[len(name) + 1 :].split(".")[0] for l in side.layers if l.startswith(name + ".")}
    return len([k for k in found if k.isdigit()])


def compare(old: Side, new: Side) -> dict:
    new2old = match_layers(old, new)
    old2new = {o: n for n, o in new2old.items()}
    moved = _moved(list(new2old.items()), old, new)
    layers = []
    for name, n in new.layers.items():  # in the new graph's order; removed ones after
        if name not in new2old:
            layers.append(_layer_entry("added", old, new, None, n, {}))
            continue
        o = old.layers[new2old[name]]
        changed, affected = _pair_changes(o, n, old, new, old2new, name in moved)
        if not changed and not affected:
            continue
        status = "renamed" if "name" in changed else "changed" if changed else "affected"
        layers.append(_layer_entry(status, old, new, o, n, {**changed, **affected}))
    for name, o in old.layers.items():
        if name not in old2new:
            layers.append(_layer_entry("removed", old, new, o, None, {}))

    sections: list[dict] = []
    # a name neither spec writes is its file's name: comparing a.yaml with b.yaml is no rename
    skip = SKIP_SECTIONS + (("name",) if old.loaded.spec.name is None and new.loaded.spec.name is None else ())
    _deep_changes({k: v for k, v in old.resolved.items() if k not in skip},
                  {k: v for k, v in new.resolved.items() if k not in skip}, "", sections)
    inputs = _io_changes(_signatures(old.summary.inputs), _signatures(new.summary.inputs), by_position=False)
    outputs = _io_changes(_signatures(old.summary.outputs), _signatures(new.summary.outputs), by_position=True)
    structure = _structure(old, new)

    def totals(side: Side) -> dict:
        s = side.summary
        return {
            "params": s.params, "buffers": s.buffers, "flops": s.flops,
            "activation_bytes": sum(l.activation_bytes for l in side.layers.values()),
            "layers": len(side.layers),
        }

    to, tn = totals(old), totals(new)
    result = {
        "old": {"label": old.label, "name": old.graph.name, **to},
        "new": {"label": new.label, "name": new.graph.name, **tn},
        "delta": {k: tn[k] - to[k] for k in to},
        "counts": {s: sum(1 for l in layers if l["status"] == s) for s in ("added", "removed", "renamed", "changed", "affected")},
        "inputs": inputs,
        "outputs": outputs,
        "structure": structure,
        "layers": layers,
        "sections": sections,
        "warnings": old.warnings + new.warnings,
    }
    if old.manifest is not None and new.manifest is not None:
        result["artifacts"] = _artifact_changes(old.manifest, new.manifest)
    # the structure (repeats, block uses) only explains layer changes; a spec written flat
    # (`lbdlc show`, a lock file) builds the same model as the one with blocks
    result["same"] = not (layers or sections or inputs or outputs or any(result["delta"].values()))
    return result


def _artifact_changes(old: dict, new: dict) -> list[dict]:
    a, b = old.get("artifacts", {}), new.get("artifacts", {})
    out = []
    for name in sorted(set(a) | set(b)):
        x, y = a.get(name), b.get(name)
        if x is None or y is None or x.get("sha256") != y.get("sha256"):
            out.append({"name": name, "change": "added" if x is None else "removed" if y is None else "changed",
                        "old": x, "new": y})
    return out


# -- what the arguments name -------------------------------------------------------------------
@dataclass
class Source:
    """One side as named on the command line: a file, a file at a git revision, or a build."""

    kind: str  # "file", "rev", "manifest"
    path: str
    rev: str | None = None

    @property
    def label(self) -> str:
        return f"{self.rev}:{self.path}" if self.kind == "rev" else self.path


def _is_manifest(arg: str) -> bool:
    p = Path(arg)
    return (p.is_file() and p.suffix == ".json") or (p.is_dir() and (p / "manifest.json").is_file())


def parse_args(args: list[str], cwd: Path) -> tuple[Source, Source]:
    """`OLD NEW` (files, builds or REV:path), `REV -- PATH`, `REV1 REV2 -- PATH` or `PATH`."""
    from . import gitutil

    def one(arg: str) -> Source | None:
        if _is_manifest(arg):
            return Source("manifest", arg)
        if Path(arg).is_file():
            return Source("file", arg)
        rev, sep, path = arg.partition(":")
        if sep and rev and path and not Path(arg).exists():
            return Source("rev", path, rev)
        return None

    if not 1 <= len(args) <= 3:
        raise SpecError(f"diff takes 1 to 3 arguments, got {len(args)}",
                        hint="lbdlc diff OLD NEW, lbdlc diff REV -- PATH, lbdlc diff REV1 REV2 -- PATH")
    if len(args) == 3:
        return Source("rev", args[2], args[0]), Source("rev", args[2], args[1])
    if len(args) == 1:
        if not Path(args[0]).is_file():
            raise SpecError(f"no such file: {args[0]}", hint="with one argument, diff compares a spec with its last commit (HEAD)")
        return Source("rev", args[0], "HEAD"), Source("file", args[0])
    a, b = one(args[0]), one(args[1])
    if a is not None and b is not None:
        return a, b
    if b is None:
        raise SpecError(f"no such file: {args[1]}", hint="name two spec files or builds, REV:path, or REV -- PATH")
    if not gitutil.is_revision(args[0], cwd):
        raise SpecError(f"'{args[0]}' is neither a file nor a git revision", hint="name two spec files, REV:path, or REV -- PATH")
    if b.kind == "manifest":
        raise SpecError("a git revision compares with a spec file, not with a build", hint="lbdlc diff REV -- PATH")
    return Source("rev", b.path, args[0]), b


def load_source(src: Source, cwd: Path, overrides: list[str] = ()) -> tuple[Side, Callable[[], None]]:
    """The Side for a Source, and a cleanup function (temporary files of revisions)."""
    from . import gitutil

    if src.kind == "file":
        return build_side(Path(src.path), src.label, overrides), lambda: None
    if src.kind == "manifest":
        return _manifest_side(src, overrides)
    root = gitutil.repo_root(cwd)
    rel = src.path
    if src.path.startswith(("./", "../")) or Path(src.path).exists() and not (root / src.path).exists():
        rel = gitutil.repo_relative(src.path, cwd, root)
    co = gitutil.checkout(src.rev, rel, cwd)
    label = f"{src.rev}:{rel}"
    try:
        side = build_side(co.path, label, overrides, relabel=co.label)
    except (SpecError, SpecErrors) as exc:
        gitutil.relabel_errors(exc, co.label)
        co.cleanup()
        raise
    side.warnings += co.warnings
    return side, co.cleanup


def _manifest_side(src: Source, overrides) -> tuple[Side, Callable[[], None]]:
    """A build's manifest: its resolved spec (a flat spec that builds the same) is the model."""
    import shutil
    import tempfile

    import yaml

    path = Path(src.path)
    manifest_path = path / "manifest.json" if path.is_dir() else path
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        resolved = manifest["resolved_spec"]
    except (OSError, ValueError, KeyError, TypeError):
        raise SpecError(f"{manifest_path} is not an lbdlc build manifest (no resolved_spec)") from None
    tmp = Path(tempfile.mkdtemp(prefix="lbdlc-diff-"))
    spec = tmp / "resolved.yaml"
    spec.write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
    label = manifest_path.as_posix()
    relabel = lambda f: f"{label} (resolved spec)" if Path(f) == spec else f  # noqa: E731
    try:
        side = build_side(spec, label, overrides, relabel=relabel)
    except (SpecError, SpecErrors) as exc:
        from .gitutil import relabel_errors

        relabel_errors(exc, relabel)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    side.manifest = manifest
    return side, lambda: shutil.rmtree(tmp, ignore_errors=True)


def diff(args: list[str], cwd: Path = Path("."), old_overrides: list[str] = (), new_overrides: list[str] = ()) -> dict:
    """Parse the arguments, load both sides and compare them (SpecError/SpecErrors on errors)."""
    a, b = parse_args(args, cwd)
    cleanups = []
    try:
        old, done = load_source(a, cwd, old_overrides)
        cleanups.append(done)
        new, done = load_source(b, cwd, new_overrides)
        cleanups.append(done)
        return compare(old, new)
    finally:
        for c in cleanups:
            c()
