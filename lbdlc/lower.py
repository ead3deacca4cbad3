"""Lowering: a validated spec becomes an IR graph, with shapes inferred and checked on the way.

Every node keeps the YAML position of the layer it came from; shape and wiring errors are
reported there, naming both shapes and the line that produced the incoming tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from . import ops
from .errors import Note, SpecError, SpecErrors, did_you_mean
from .ir import Graph, Node, Param, TensorType, Value, as_dim, symbol
from .source import Loc, LocDict, load_yaml_file, loc_of
from .spec import attrs_of, parse_spec


@dataclass
class Loaded:
    """A spec as read from disk: the validated model, the raw located data, and the file."""

    spec: BaseModel
    raw: LocDict
    path: Path
    text: str

    @property
    def name(self) -> str:
        return self.spec.name or _identifier(self.path.stem)


def _identifier(stem: str) -> str:
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in stem)
    return out if out and not out[0].isdigit() else "model_" + out


def load(path: str | Path) -> Loaded:
    path = Path(path)
    raw = load_yaml_file(path)
    spec = parse_spec(raw, str(path))
    return Loaded(spec, raw, path, path.read_text(encoding="utf-8"))


def lower(loaded: Loaded) -> Graph:
    spec, raw = loaded.spec, loaded.raw
    env: dict[str, tuple[Value, Loc | None]] = {}
    inputs: list[Value] = []
    for name, inp in spec.inputs.items():
        shape = tuple(d if isinstance(d, int) else as_dim(symbol(d)) for d in inp.shape)
        value = Value(name, TensorType(shape, inp.dtype))
        inputs.append(value)
        env[name] = (value, raw["inputs"].key_locs[name])

    nodes: list[Node] = []
    params: dict[str, Param] = {}
    all_layer_names = _layer_names(spec)
    previous = inputs[0]
    for i, layer in enumerate(spec.layers):
        path = ("layers", i)
        origin = loc_of(raw, path)
        name = all_layer_names[i]
        if name in env:
            first = env[name][1]
            raise SpecError(
                f"the name '{name}' is already used",
                loc_of(raw, path + ("name",)),
                notes=[Note("first used here", first)],
                hint="layer and input names must be unique",
            )
        in_values = _wire(layer, previous, env, all_layer_names, raw, path, i)
        op = ops.get(layer.op)
        _check_arity(op, in_values, raw, path)
        in_types = [v.type for v in in_values]
        try:
            attrs = op.resolve(attrs_of(layer), in_types)
            out_types = op.infer(attrs, in_types)
            param_defs = op.params(attrs, in_types)
        except ops.ShapeError as exc:
            raise _shape_error(exc, layer, name, in_values, env, raw, path) from None
        outputs = [Value(name if len(out_types) == 1 else f"{name}.{k}", t) for k, t in enumerate(out_types)]
        node = Node(layer.op, name, in_values, outputs, attrs, origin=origin)
        for local, pd in param_defs.items():
            full = f"{name}.{local}"
            params[full] = Param.named(full, pd)
            node.params[local] = full
        nodes.append(node)
        for v in outputs:
            env[v.name] = (v, origin)
        previous = outputs[0]

    outputs = _outputs(spec, env, previous, raw)
    graph = Graph(loaded.name, inputs, nodes, outputs, params)
    _check_unused(graph, raw)
    graph.verify()
    return graph


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


def _wire(layer, previous: Value, env, all_names, raw, path, index) -> list[Value]:
    refs = layer.in_
    if refs is None:
        return [previous]
    refs = [refs] if isinstance(refs, str) else refs
    values = []
    for k, ref in enumerate(refs):
        ref_path = path + ("in",) if isinstance(layer.in_, str) else path + ("in", k)
        if ref in env:
            values.append(env[ref][0])
            continue
        loc = loc_of(raw, ref_path)
        if ref in all_names[index:]:
            raise SpecError(
                f"'{ref}' is defined after this layer (or is this layer), so it cannot be its input",
                loc,
                hint="layers run in the order written; move this layer below the one it reads",
            )
        raise SpecError(
            f"no layer or input named '{ref}'",
            loc,
            hint=did_you_mean(ref, env) or ("defined so far: " + ", ".join(env)),
        )
    return values


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
        Note(f"input '{v.name}' has shape {v.type}" + (f", produced here" if env[v.name][1] else ""), env[v.name][1])
        for v in in_values
    ]
    return SpecError(
        f"{layer.op} layer '{name}': {exc.message}",
        field_loc or loc_of(raw, path + ("op",)),
        hint=exc.hint,
        notes=notes,
    )


def _outputs(spec, env, last: Value, raw) -> list[Value]:
    if spec.outputs is None:
        return [last]
    values = []
    for k, ref in enumerate(spec.outputs):
        if ref not in env:
            raise SpecError(
                f"no layer or input named '{ref}'",
                loc_of(raw, ("outputs", k)),
                hint=did_you_mean(ref, env),
            )
        values.append(env[ref][0])
    return values


def _check_unused(graph: Graph, raw) -> None:
    used = {id(v) for n in graph.nodes for v in n.inputs} | {id(v) for v in graph.outputs}
    errors = [
        SpecError(
            f"input '{v.name}' is never used",
            raw["inputs"].key_locs[v.name],
            hint="remove it, or read it from a layer with `in:`",
        )
        for v in graph.inputs
        if id(v) not in used
    ]
    if errors:
        raise SpecErrors(errors)
