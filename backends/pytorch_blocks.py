"""Block classes for the generated module: the spec's block uses and repetitions become one
`nn.Module` class per structure and a loop over repeated blocks, the way a person writes
them (torchvision's `Bottleneck`, nanoGPT's `Block`).

`Graph.scopes` says which name prefixes came from a block use or a repetition; the IR stays
the truth. A prefix becomes a class instance only when its nodes form one contiguous,
self-contained stretch of the graph. Instances share a class only when their structure
(ops, wiring, ranks, parameter names) is the same; attributes that differ between instances
become constructor arguments, named after the block's parameters when their values match
(`width`, `4 * width`). Every instance's submodules are then built on the meta device from
the class's constructor and compared with what the flat code would build; an attribute that
cannot be an argument (it shows up in `forward`, or the comparison fails) splits the class
instead. Anything that does not fit stays flat code, which is always correct.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from lbdlc.ir import Graph, Node, SpecScope, Value

# node -> (submodule constructor or None, forward expression); the backend's emitter.
EmitNode = Callable[[Node, list[str]], tuple[str | None, str]]


@dataclass(eq=False)
class Instance:
    """The nodes under one name prefix (`layer2.0`), seen as a unit."""

    prefix: str
    nodes: list[Node]
    start: int  # index of its first node in graph.nodes
    inputs: list[Value]  # values it reads from outside, in order of first use
    outputs: list[Value]  # values it produces that are read outside, in graph order
    scope: SpecScope | None

    def rel(self, name: str) -> str:
        return name[len(self.prefix) + 1:]


@dataclass(eq=False)
class BlockClass:
    name: str
    instances: list[Instance]
    args: list[tuple[str, str]] = field(default_factory=list)  # (name, type annotation)
    arg_values: list[dict[str, Any]] = field(default_factory=list)  # per instance
    exprs: dict[tuple[str, str], str] = field(default_factory=dict)  # (node, attr) -> expression
    description: str | None = None
    defined: Any = None  # Loc of the block definition


@dataclass
class Plan:
    classes: list[BlockClass]
    class_of: dict[int, BlockClass]  # id(instance) -> its class
    instances: list[Instance]  # in graph order
    loops: dict[int, list[Instance]]  # id(first instance) -> a chained repetition


class Marker:
    """Stands for a constructor argument inside an attribute while emitting a class; prints
    as a token that is replaced by the argument's expression afterwards."""

    def __init__(self, index: int):
        self.token = f"\x00{index}\x00"

    def __repr__(self) -> str:
        return self.token

    __str__ = __repr__

    def __eq__(self, other) -> bool:  # never equal to a default, so emitters always print it
        return other is self

    def __ne__(self, other) -> bool:
        return other is not self

    __hash__ = object.__hash__


class IntMarker(int):
    """A Marker that also passes `isinstance(v, int)` checks in emitters (`pair(kernel_size)`).
    Arithmetic on it yields a plain int without the token: the meta-device check then finds
    the constructor wrong and the attribute splits the class instead."""

    def __new__(cls, index: int, value: int):
        self = super().__new__(cls, value)
        self.token = f"\x00{index}\x00"
        return self

    __repr__ = __str__ = Marker.__repr__
    __eq__, __ne__ = Marker.__eq__, Marker.__ne__
    __hash__ = object.__hash__


def find_instances(graph: Graph) -> list[Instance]:
    """Outermost block uses and repetitions whose nodes are contiguous and self-contained."""
    prefixes = {p for p, s in graph.scopes.items() if s.block is not None}
    for root, s in graph.scopes.items():
        prefixes |= {f"{root}.{k}" for k in range(s.repeat)}
    outermost = [p for p in prefixes if not any(p.startswith(q + ".") for q in prefixes)]
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    used_outside = graph.users()
    graph_outputs = {id(v) for v in graph.outputs}
    found = []
    for prefix in outermost:
        nodes = [n for n in graph.nodes if n.name.startswith(prefix + ".")]
        if not nodes or any(n.name == prefix for n in graph.nodes):
            continue
        first = index[id(nodes[0])]
        if [index[id(n)] for n in nodes] != list(range(first, first + len(nodes))):
            continue
        members = {id(n) for n in nodes}
        if any(not p.startswith(prefix + ".") for n in nodes for p in n.params.values()) or any(
                p.startswith(prefix + ".") for n in graph.nodes if id(n) not in members for p in n.params.values()):
            continue  # shares a parameter with the outside (a tie): stays flat
        produced = {id(v) for n in nodes for v in n.outputs}
        inputs: list[Value] = []
        for n in nodes:
            for v in n.inputs:
                if id(v) not in produced and all(v is not u for u in inputs):
                    inputs.append(v)
        outputs = [v for n in nodes for v in n.outputs
                   if id(v) in graph_outputs or any(id(u) not in members for u in used_outside.get(id(v), []))]
        if not outputs or not inputs:
            continue
        found.append(Instance(prefix, nodes, first, inputs, outputs, graph.scopes.get(prefix)))
    return sorted(found, key=lambda inst: inst.start)


def attr_names(node: Node) -> list[str]:
    return list(type(node.attrs).model_fields) if hasattr(type(node.attrs), "model_fields") else []


def structure(inst: Instance, fixed: set[tuple[str, str, str]]) -> tuple:
    """What must be equal for two instances to share a class."""
    ext = {id(v): k for k, v in enumerate(inst.inputs)}
    produced: dict[int, tuple[str, int]] = {}
    items = []
    for n in inst.nodes:
        rel = inst.rel(n.name)
        ins = tuple(("in", ext[id(v)], v.type.rank, v.type.dtype) if id(v) in ext else ("v",) + produced[id(v)]
                    for v in n.inputs)
        for j, v in enumerate(n.outputs):
            produced[id(v)] = (rel, j)
        params = tuple(sorted((local, inst.rel(full)) for local, full in n.params.items()))
        attrs = tuple((k, _key(rel, k, getattr(n.attrs, k), fixed)) for k in attr_names(n))
        outs = tuple((v.type.rank, v.type.dtype) for v in n.outputs)
        if (rel, SHAPES, "") in fixed:  # its flat code reads sizes: only equal shapes share
            outs = (tuple(str(v.type) for v in n.inputs), tuple(str(v.type) for v in n.outputs), outs)
        items.append((rel, n.op, ins, params, attrs, outs))
    return tuple(items), tuple(produced[id(v)] for v in inst.outputs)


SHAPES = "<shapes>"  # a `fixed` entry (rel, SHAPES, ""): the node's emitted code depends on its shapes


def _key(rel: str, attr: str, value, fixed: set[tuple[str, str, str]]) -> str:
    """An attribute's part in the structure: its type, or its value where that value could
    not be a constructor argument (then only instances with the same value share a class)."""
    return repr(value) if (rel, attr, repr(value)) in fixed else type(value).__name__


def _camel(name: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in name.replace(".", "_").split("_") if p)


def _base_name(inst: Instance) -> str:
    if inst.scope is not None and inst.scope.block:
        return _camel(inst.scope.block)
    root = inst.prefix.rsplit(".", 1)[0].split(".")[-1]
    singular = root[:-1] if root.endswith("s") and len(root) > 1 else root
    return _camel(singular) or "Block"


def _same_typed(a: tuple, b: tuple) -> bool:
    return a == b and tuple(map(type, a)) == tuple(map(type, b))


def _name_args(cls: BlockClass, varying: list[tuple[str, str]]) -> None:
    """Constructor arguments for the varying attributes, named after the block's parameters
    when the values match one (`width`) or a whole multiple of one (`4 * width`)."""
    scopes = [inst.scope for inst in cls.instances]
    block_params: dict[str, tuple] = {}
    if all(s is not None and s.block for s in scopes):
        for pname in [p for p, _ in scopes[0].params]:
            block_params[pname] = tuple(dict(s.params).get(pname) for s in scopes)
    nodes = [{inst.rel(n.name): n for n in inst.nodes} for inst in cls.instances]
    used_params: list[str] = []
    new_args: list[tuple[tuple, str]] = []  # (values, argument name); values may hold lists
    for rel, attr in varying:
        values = tuple(getattr(by_rel[rel].attrs, attr) for by_rel in nodes)
        expr = None
        for pname, pvalues in block_params.items():
            if _same_typed(values, pvalues):
                expr = pname
            elif all(type(v) is int for v in values + pvalues):
                for c in range(2, 17):
                    if values == tuple(c * v for v in pvalues):
                        expr = f"{c} * {pname}"
                        break
            if expr:
                if pname not in used_params:
                    used_params.append(pname)
                break
        if expr is None:
            for known, name in new_args:
                if _same_typed(known, values):
                    expr = name
                    break
        if expr is None:
            taken = set(block_params) | {name for _, name in new_args}
            expr = attr if attr not in taken else f"{rel.replace('.', '_')}_{attr}"
            new_args.append((values, expr))
        cls.exprs[(rel, attr)] = expr
    names = [p for p in block_params if p in used_params] + [name for _, name in new_args]
    values_of = {p: block_params[p] for p in used_params} | {name: v for v, name in new_args}
    cls.args = [(name, type(values_of[name][0]).__name__) for name in names]
    cls.arg_values = [{name: values_of[name][k] for name in names} for k in range(len(cls.instances))]


def relative_view(inst: Instance, exprs: dict[tuple[str, str], str], markers: dict[str, Marker]) -> Graph:
    """The instance as a graph of its own: relative names, inputs named as the block names
    them, constructor arguments as markers in the attributes."""
    names = list(inst.scope.inputs) if inst.scope and len(inst.scope.inputs) == len(inst.inputs) else []
    names = names or ["x"] + [f"x{k}" for k in range(1, len(inst.inputs))]
    mapping: dict[int, Value] = {id(v): Value(name, v.type) for v, name in zip(inst.inputs, names)}
    nodes = []
    for n in inst.nodes:
        rel = inst.rel(n.name)
        outs = [Value(inst.rel(v.name), v.type) for v in n.outputs]
        for v, new in zip(n.outputs, outs):
            mapping[id(v)] = new
        update = {attr: markers[expr] for (r, attr), expr in exprs.items() if r == rel}
        attrs = n.attrs.model_copy(update=update) if update else n.attrs
        params = {local: inst.rel(full) for local, full in n.params.items()}
        nodes.append(Node(n.op, rel, [mapping[id(v)] for v in n.inputs], outs, attrs, params, n.origin))
    return Graph(inst.prefix, [mapping[id(v)] for v in inst.inputs], nodes, [mapping[id(v)] for v in inst.outputs], {})


def class_constructor(cls: BlockClass, inst: Instance) -> str:
    values = cls.arg_values[next(k for k, member in enumerate(cls.instances) if member is inst)]
    if len(cls.args) == 1:
        return f"{cls.name}({values[cls.args[0][0]]!r})"
    return f"{cls.name}(" + ", ".join(f"{name}={values[name]!r}" for name, _ in cls.args) + ")"


def markers_for(cls: BlockClass) -> dict[str, Marker | IntMarker]:
    first = {}  # expression -> its value in the first instance
    by_rel = {cls.instances[0].rel(n.name): n for n in cls.instances[0].nodes}
    for (rel, attr), expr in cls.exprs.items():
        first.setdefault(expr, getattr(by_rel[rel].attrs, attr))
    return {expr: IntMarker(i, v) if type(v) is int else Marker(i) for i, (expr, v) in enumerate(first.items())}


def fill(text: str, markers: dict[str, Marker]) -> str:
    for expr, m in markers.items():
        text = text.replace(m.token, expr)
    return text


def fill_forward(text: str, markers: dict[str, "Marker | IntMarker"]) -> str:
    """Markers in a forward expression read the attributes the constructor stored:
    `negative_slope=\x000\x00` becomes `negative_slope=self.slope`."""
    for expr, m in markers.items():
        text = text.replace(m.token, re.sub(r"\b([A-Za-z_]\w*)\b", r"self.\1", expr))
    return text


def forward_args(cls: BlockClass, forward_lines: list[str]) -> list[str]:
    """The constructor arguments that forward reads (and __init__ must keep as attributes)."""
    return [name for name, _ in cls.args if any(f"self.{name}" in line for line in forward_lines)]


def _failures(cls: BlockClass, emit: EmitNode, evaluate: Callable[[str, dict], str]) -> set[tuple[str, str, str]]:
    """Varying attributes that cannot be constructor arguments of `cls`: a submodule built
    from the class's constructor differs from the flat code's, or a forward expression with
    the instance's values differs from the flat code's."""
    markers = markers_for(cls)
    view = relative_view(cls.instances[0], cls.exprs, markers)
    bad: set[tuple[str, str]] = set()
    varying_of: dict[str, list[str]] = {}
    for rel, attr in cls.exprs:
        varying_of.setdefault(rel, []).append(attr)
    submodules = {n.name.split(".")[0] for n in view.nodes}
    for node in view.nodes:
        if node.name not in varying_of:
            # Same attributes, but an emitter may still write sizes it reads from the shapes
            # (reshape): the flat code of every instance must then be the same.
            reals = [next(n for n in inst.nodes if inst.rel(n.name) == node.name) for inst in cls.instances]
            flat = {repr(emit(real, ["x"] * len(real.inputs))) for real in reals}
            if len(flat) > 1:
                bad.add((node.name, SHAPES, ""))
            continue
        reals = [next(n for n in inst.nodes if inst.rel(n.name) == node.name) for inst in cls.instances]

        def failed(real: Node) -> set[tuple[str, str, str]]:
            return {(node.name, a, repr(getattr(real.attrs, a))) for a in varying_of[node.name]}

        try:
            ctor, expr = emit(node, ["x"] * len(node.inputs))
        except Exception:  # an emitter computing with the attribute: it cannot vary
            bad = bad.union(*map(failed, reals))
            continue
        if "\x00" in expr and any(cls.exprs[(node.name, a)] in submodules for a in varying_of[node.name]):
            bad = bad.union(*map(failed, reals))  # `self.<argument>` would name a submodule
            continue
        for k, real in enumerate(reals):
            flat_ctor, flat_expr = emit(real, ["x"] * len(real.inputs))
            env = {name: cls.arg_values[k][name] for name, _ in cls.args}
            values = {e: repr(eval(e, {}, dict(env))) for e in markers}  # `4 * width` at this instance
            try:
                same = _filled_values(expr, markers, values) == flat_expr
                if ctor is not None or flat_ctor is not None:
                    same = same and ctor is not None and flat_ctor is not None and \
                        evaluate(fill(ctor, markers), env) == evaluate(flat_ctor, {})
            except Exception:
                same = False
            if not same:
                bad |= failed(real)  # this value stands alone; the others may still share
    return bad


def _filled_values(text: str, markers: dict, values: dict[str, str]) -> str:
    for expr, m in markers.items():
        text = text.replace(m.token, values[expr])
    return text


def plan(graph: Graph, emit: EmitNode, evaluate: Callable[[str, dict], str], taken_names: set[str]) -> Plan:
    instances = find_instances(graph)
    fixed: set[tuple[str, str, str]] = set()
    while True:
        groups: dict[tuple, list[Instance]] = {}
        for inst in instances:
            groups.setdefault((_base_name(inst), structure(inst, fixed)), []).append(inst)
        classes = []
        for (base, _), members in groups.items():
            cls = BlockClass(base, members)
            first = members[0]
            if first.scope is not None:
                cls.description, cls.defined = first.scope.description, first.scope.defined
            varying = []
            for n in first.nodes:
                rel = first.rel(n.name)
                for attr in attr_names(n):
                    values = [getattr(next(m for m in inst.nodes if inst.rel(m.name) == rel).attrs, attr) for inst in members]
                    if any(repr(v) != repr(values[0]) or type(v) is not type(values[0]) for v in values):
                        varying.append((rel, attr))
            _name_args(cls, varying)
            classes.append(cls)
        bad = set().union(*(_failures(c, emit, evaluate) for c in classes if c.exprs)) if classes else set()
        if not bad - fixed:
            break
        fixed |= bad
    _name_classes(classes, taken_names)
    class_of = {id(inst): cls for cls in classes for inst in cls.instances}
    return Plan(classes, class_of, instances, _loops(graph, instances, class_of))


def _name_classes(classes: list[BlockClass], taken: set[str]) -> None:
    by_base: dict[str, list[BlockClass]] = {}
    for cls in classes:
        by_base.setdefault(cls.name, []).append(cls)
    used = set(taken)
    for base, variants in by_base.items():
        variants.sort(key=lambda c: (-len(c.instances), c.instances[0].start))
        main_parts = _parts(variants[0])
        for k, cls in enumerate(variants):
            name = base
            if k:  # variants are named by the layers they have, or lack, compared to the main one
                extra = [p for p in _parts(cls) if p not in main_parts]
                missing = [p for p in main_parts if p not in _parts(cls)]
                if extra:
                    name = base + "With" + "".join(_camel(p) for p in extra[:2])
                elif missing:
                    name = base + "Without" + "".join(_camel(p) for p in missing[:2])
                else:
                    name = base + str(k + 1)
            while name in used:
                name += "_"
            used.add(name)
            cls.name = name
    classes.sort(key=lambda c: c.instances[0].start)


def _parts(cls: BlockClass) -> list[str]:
    """The named top-level layers of a class (automatic names like `relu_1` left out)."""
    inst = cls.instances[0]
    parts = dict.fromkeys(inst.rel(n.name).split(".")[0] for n in inst.nodes)
    return [p for p in parts if p.isidentifier() and not p.startswith(tuple(f"{op}_" for op in {n.op for n in inst.nodes}))]


def _loops(graph: Graph, instances: list[Instance], class_of: dict[int, BlockClass]) -> dict[int, list[Instance]]:
    """Repetitions whose instances are chained (each reads the previous one's output and the
    same other inputs) and whose intermediate outputs nothing else reads: `for` loops."""
    by_prefix = {inst.prefix: inst for inst in instances}
    users = graph.users()
    graph_outputs = {id(v) for v in graph.outputs}
    loops = {}
    for root, scope in graph.scopes.items():
        if scope.repeat < 2:
            continue
        chain = [by_prefix.get(f"{root}.{k}") for k in range(scope.repeat)]
        if any(inst is None for inst in chain):
            continue
        ok = all(len(inst.outputs) == 1 and len(inst.inputs) == len(chain[0].inputs) for inst in chain)
        for prev, inst in zip(chain, chain[1:]):
            ok = ok and inst.start == prev.start + len(prev.nodes)
            ok = ok and inst.inputs[0] is prev.outputs[0] and all(a is b for a, b in zip(inst.inputs[1:], chain[0].inputs[1:]))
            ok = ok and id(prev.outputs[0]) not in graph_outputs
            ok = ok and all(u in inst.nodes for u in users.get(id(prev.outputs[0]), []))
        if ok:
            loops[id(chain[0])] = chain
    return loops
