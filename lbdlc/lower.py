"""Lowering: a validated spec becomes an IR graph, with shapes inferred and checked on the way.

Every node keeps the YAML position of the layer it came from; shape and wiring errors are
reported there, naming both shapes and the line that produced the incoming tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from pydantic import BaseModel

from . import ops
from .errors import Note, SpecError, SpecErrors, did_you_mean
from .ir import Graph, Init, Node, Param, TensorType, Value, as_dim, symbol
from .source import Loc, LocDict, key_loc, loc_of
from .ops.rules import check_input_kind
from .spec import attrs_of, parse_spec, trail_notes


@dataclass
class Loaded:
    """A spec as read from disk: the validated model, the raw located data, and the file."""

    spec: BaseModel
    raw: LocDict
    path: Path
    text: str
    warnings: list = field(default_factory=list)  # SpecErrors of severity "warning", from lowering

    @property
    def name(self) -> str:
        return self.spec.name or _identifier(self.path.stem)


def _identifier(stem: str) -> str:
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in stem)
    return out if out and not out[0].isdigit() else "model_" + out


def load(path: str | Path, overrides: list[str] = ()) -> Loaded:
    """Read a spec: compose (`extends`, `--set`), validate, expand blocks and repeats."""
    from .compose import load_composed
    from .expand import expand
    from .spec import migrate, parse_source

    path = Path(path)
    composed = migrate(load_composed(path, list(overrides)))
    source = parse_source(composed, str(path))
    flat = expand(composed, source)
    spec = parse_spec(flat, str(path))
    return Loaded(spec, flat, path, path.read_text(encoding="utf-8"))


def lower(loaded: Loaded, strict: bool = False) -> Graph:
    spec, raw = loaded.spec, loaded.raw
    env: dict[str, tuple[Value, Loc | None]] = {}
    inputs: list[Value] = []
    for name, inp in spec.inputs.items():
        shape = tuple(d if isinstance(d, int) else as_dim(symbol(d)) for d in inp.shape)
        value = Value(name, TensorType(shape, inp.dtype))
        inputs.append(value)
        env[name] = (value, raw["inputs"].key_locs[name])

    names = _layer_names(spec)
    _check_unique(names, env, raw)
    wiring = _wiring(spec, names, inputs[0].name, env, raw)
    nodes: list[Node] = []
    params: dict[str, Param] = {}
    produced: dict[str, Node] = {}  # layer name -> its node, to explain reads of multi-output layers
    for i in _topological_order(names, wiring, raw):
        layer, name, path = spec.layers[i], names[i], ("layers", i)
        origin = loc_of(raw, path)
        in_values = [_read(ref, env, produced, names[i], raw, i, k) for k, ref in enumerate(wiring[i])]
        op = ops.get(layer.op)
        _check_arity(op, in_values, raw, path)
        in_types = [v.type for v in in_values]
        try:
            for t in in_types:
                check_input_kind(op.name, op.input_kind, t)
            attrs = op.resolve(attrs_of(layer), in_types)
            out_types = op.infer(attrs, in_types)
            param_defs = op.params(attrs, in_types)
        except ops.ShapeError as exc:
            raise _shape_error(exc, layer, name, in_values, env, raw, path) from None
        outputs = [Value(name if len(out_types) == 1 else f"{name}.{k}", t) for k, t in enumerate(out_types)]
        node = Node(layer.op, name, in_values, outputs, attrs, origin=origin)
        param_defs = _initialised(layer, param_defs, raw, path)
        tied = _tied(layer, param_defs, params, raw, path)
        for local, pd in param_defs.items():
            if local in tied:
                node.params[local] = tied[local]
                continue
            full = f"{name}.{local}"
            params[full] = Param.named(full, pd)
            node.params[local] = full
        nodes.append(node)
        produced[name] = node
        for v in outputs:
            env[v.name] = (v, origin)

    outputs = _outputs(spec, env, produced, nodes[-1].outputs[0], raw)
    graph = Graph(loaded.name, inputs, nodes, outputs, params, dict(getattr(raw, "scopes", {})))
    loaded.warnings = _check_unused(graph, raw, strict)
    graph.verify()
    if getattr(spec, "train", None) is not None:  # the training protocol against the graph
        from .training.check import plan

        plan(loaded, graph)
    return graph


def _initialised(layer, param_defs: dict, raw, path) -> dict:
    """`init: {weight: {kind: normal, std: 0.02}}`: the layer's own initialisers."""
    out = dict(param_defs)
    for local, spec in (layer.init or {}).items():
        if local not in param_defs:
            raise SpecError(f"{layer.op} has no parameter '{local}' to initialise", key_loc(raw, path + ("init", local)) or loc_of(raw, path + ("init",)),
                            hint=did_you_mean(local, param_defs) or (f"its parameters: {', '.join(param_defs)}" if param_defs else f"{layer.op} has no parameters"))
        out[local] = replace(param_defs[local], init=Init(spec.kind, spec.args()))
    return out


def _tied(layer, param_defs, params: dict[str, Param], raw, path) -> dict[str, str]:
    """`tie: {weight: wte.weight}`: the layer uses an existing parameter instead of its own."""
    for local, target in (layer.tie or {}).items():
        where = loc_of(raw, path + ("tie", local))
        if local not in param_defs:
            raise SpecError(f"{layer.op} has no parameter '{local}' to tie", where,
                            hint=did_you_mean(local, param_defs) or f"its parameters: {', '.join(param_defs) or 'none'}")
        if target not in params:
            raise SpecError(f"no parameter named '{target}' (yet) to tie '{local}' to", where,
                            hint=did_you_mean(target, params) or "tie to a parameter of a layer that runs earlier, by its full name")
        want, have = tuple(param_defs[local].shape), params[target].shape
        if want != have:
            raise SpecError(f"cannot tie '{local}' of shape {list(want)} to '{target}' of shape {list(have)}", where)
    return dict(layer.tie or {})


def _layer_names(spec) -> list[str]:
    """Explicit names, else `<op>_<k>` counting layers of that op (conv2d_1, conv2d_2, ...)."""
    names, counts = [], {}
    taken = {layer.name for layer in spec.layers if layer.name}
    for layer in spec.layers:
        if layer.name:
            names.append(layer.name)
            continue
        k = counts.get(layer.op, 0) + 1
        while f"{layer.op}_{k}" in taken:
            k += 1
        counts[layer.op] = k
        names.append(f"{layer.op}_{k}")
        taken.add(names[-1])
    return names


def _name_loc(raw, i: int) -> Loc | None:
    return loc_of(raw, ("layers", i, "name")) if "name" in raw["layers"][i] else loc_of(raw, ("layers", i))


def _check_unique(names: list[str], env, raw) -> None:
    first: dict[str, Loc | None] = {n: loc for n, (_, loc) in env.items()}
    scopes = {n.rsplit(".", k)[0] for n in names for k in range(1, n.count(".") + 1)}
    for i, name in enumerate(names):
        where = _name_loc(raw, i)
        if name in first:
            raise SpecError(
                f"the name '{name}' is already used", where,
                notes=[Note("first used here", first[name])], hint="layer and input names must be unique",
            )
        if name in scopes:
            raise SpecError(f"'{name}' names both a layer and a scope of other layers ({name}.…)", where,
                            hint="a layer's name cannot prefix other layers' names")
        first[name] = where


def _in_loc(raw, i: int, k: int | None = None) -> Loc | None:
    layer = raw["layers"][i]
    if "in" not in layer:
        return loc_of(raw, ("layers", i))
    return loc_of(raw, ("layers", i, "in") if k is None or isinstance(layer["in"], str) else ("layers", i, "in", k))


def _wiring(spec, names: list[str], first_input: str, env, raw) -> list[list[str]]:
    """Each layer's input names: its `in`, else the layer written before it."""
    known = set(env) | set(names)
    wiring = []
    for i, layer in enumerate(spec.layers):
        if layer.in_ is None:
            wiring.append([names[i - 1] if i else first_input])
            continue
        refs = [layer.in_] if isinstance(layer.in_, str) else layer.in_
        for k, ref in enumerate(refs):
            if ref not in known and _indexed(ref, names) is None:
                raise SpecError(f"no layer or input named '{ref}'", _in_loc(raw, i, k),
                                hint=did_you_mean(ref, sorted(known)) or ("defined: " + ", ".join(sorted(known))))
        wiring.append(list(refs))
    return wiring


def _indexed(ref: str, names) -> str | None:
    """The layer that `ref` names one output of (`split_1` for `split_1.0`), if it is one."""
    head, _, k = ref.rpartition(".")
    return head if head and k.isdigit() and head in names else None


def _read(ref: str, env, produced: dict[str, Node], name: str, raw, i: int, k: int) -> Value:
    """The value a layer reads; a multi-output layer is read as `<layer>.<k>`."""
    if ref in env:
        return env[ref][0]
    where, trail = _in_loc(raw, i, k), trail_notes(raw, ("layers", i))
    if ref in produced:  # a layer with several outputs, read without saying which
        node = produced[ref]
        outs = ", ".join(v.name for v in node.outputs)
        raise SpecError(
            f"layer '{name}' reads '{ref}', which has {len(node.outputs)} outputs ({node.op}); it must name one",
            where, hint=f"read one of them, e.g. `in: {ref}.0` (its outputs: {outs})",
            notes=[Note(f"'{ref}' is defined here", node.origin)] + trail,
        )
    error = _index_error(ref, produced, where)
    error.notes += trail
    raise error


def _index_error(ref: str, produced: dict[str, Node], where) -> SpecError:
    """`name.k` where layer `name` has no output k (or only one output, read as `name`)."""
    head = ref.rpartition(".")[0]
    node = produced[head]
    note = [Note(f"'{head}' is defined here", node.origin)]
    if len(node.outputs) == 1:
        return SpecError(f"'{head}' has one output; there is no '{ref}'", where, hint=f"read it as '{head}'", notes=note)
    outs = ", ".join(v.name for v in node.outputs)
    return SpecError(f"'{head}' has {len(node.outputs)} outputs, {outs}; there is no '{ref}'", where,
                     hint=f"read one of {outs}", notes=note)


def _topological_order(names: list[str], wiring: list[list[str]], raw) -> list[int]:
    """Layers in dependency order, written order among independent ones; cycles are errors."""
    index = {n: i for i, n in enumerate(names)}
    producer = lambda ref: index.get(ref, index.get(_indexed(ref, index)))  # noqa: E731 (`split_1.0`: split_1)
    deps = [{producer(r) for r in refs} - {None} for refs in wiring]
    order, done = [], set()
    remaining = list(range(len(names)))
    while remaining:
        ready = next((i for i in remaining if deps[i] <= done), None)
        if ready is None:
            raise _cycle_error(remaining, deps, names, raw)
        order.append(ready)
        done.add(ready)
        remaining.remove(ready)
    return order


def _cycle_error(remaining: list[int], deps, names, raw) -> SpecError:
    path, node = [], remaining[0]
    while node not in path:  # follow dependencies until one repeats: that closes a cycle
        path.append(node)
        node = min(d for d in deps[node] if d in remaining)
    cycle = list(reversed(path[path.index(node):]))  # producer -> consumer order
    # Start the cycle so that the error lands on a written `in`, the likely mistake.
    start = next((k for k, i in enumerate(cycle) if "in" in raw["layers"][i]), 0)
    cycle = cycle[start - 1 :] + cycle[: start - 1] if start else cycle
    cycle.append(cycle[0])
    return SpecError(
        "the layers form a cycle: " + " -> ".join(names[i] for i in cycle),
        _in_loc(raw, cycle[1]),
        notes=[Note(f"'{names[c]}' reads '{names[p]}'", _in_loc(raw, c)) for p, c in zip(cycle[1:], cycle[2:])],
        hint="a layer without `in` reads the layer written before it",
    )


def _check_arity(op, in_values, raw, path) -> None:
    n = len(in_values)
    lo, hi = (op.arity, op.arity) if isinstance(op.arity, int) else op.arity
    if n < lo or (hi is not None and n > hi):
        want = str(lo) if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
        raise SpecError(
            f"{op.name} takes {want} input{'s' if want != '1' else ''}, got {n}",
            loc_of(raw, path + ("in",)) if "in" in raw["layers"][path[1]] else loc_of(raw, path),
            hint="list its inputs with `in: [a, b]`" if lo > 1 else None,
        )


def _shape_error(exc: ops.ShapeError, layer, name, in_values, env, raw, path) -> SpecError:
    field_loc = loc_of(raw, path + (exc.field,)) if exc.field and exc.field in raw["layers"][path[1]] else None
    notes = [
        Note(f"input '{v.name}' has shape {v.type}" + (", produced here" if env[v.name][1] else ""), env[v.name][1])
        for v in in_values
    ]
    return SpecError(
        f"{layer.op} layer '{name}': {exc.message}",
        field_loc or loc_of(raw, path + ("op",)),
        hint=exc.hint,
        notes=notes + trail_notes(raw, path),
    )


def _outputs(spec, env, produced, last: Value, raw) -> list[Value]:
    if spec.outputs is None:
        return [last]
    values = []
    for k, ref in enumerate(spec.outputs):
        if ref in produced and ref not in env:  # a layer with several outputs: all of them, in order
            values += produced[ref].outputs
            continue
        if _indexed(ref, produced) is not None and ref not in env:
            raise _index_error(ref, produced, loc_of(raw, ("outputs", k)))
        if ref not in env:
            raise SpecError(
                f"no layer or input named '{ref}'",
                loc_of(raw, ("outputs", k)),
                hint=did_you_mean(ref, env),
            )
        values.append(env[ref][0])
    return values


def _check_unused(graph: Graph, raw, strict: bool) -> list[SpecError]:
    """Inputs and layers whose values nobody reads: warnings, or errors with `strict`."""
    used = {id(v) for n in graph.nodes for v in n.inputs} | {id(v) for v in graph.outputs}
    severity = "error" if strict else "warning"
    problems = [
        SpecError(f"input '{v.name}' is never used", raw["inputs"].key_locs[v.name],
                  hint="remove it, or read it from a layer with `in:`", severity=severity)
        for v in graph.inputs
        if id(v) not in used
    ] + [
        SpecError(f"the output of layer '{n.name}' is never used", n.origin,
                  hint="remove the layer, read it with `in:`, or list it in `outputs:`", severity=severity)
        for n in graph.nodes
        if not any(id(v) in used for v in n.outputs)
    ]
    if strict and problems:
        raise SpecErrors(problems)
    return problems
