"""Pattern rewriting over the IR: match a subgraph by op types and attribute predicates, replace it.

A pattern is a tree of `P(op, *inputs)` read from the root (the last node of the subgraph)
back through its inputs; an input is another `P` (the value must come from a node matching
it) or a name (any value, captured under that name; a name used twice must be the same value,
so `P("mul", "x", P("sigmoid", "x"))` is x·sigmoid(x)). Every matched node except the root
must be single-use: its output feeds only the matched consumer and is no graph output, so
that removing it changes nothing else. `name=` captures a node, `where=` tests it
(`where=lambda n: n.attrs.dim == -1`), `commutative=True` also tries the two inputs of a
binary op swapped, `any_inputs=True` matches whatever the inputs are.

A `Rewrite` pairs a pattern with a builder: given the `Match`, it returns the replacement
nodes (or None to leave this match alone). The last replacement node produces the root's
output values themselves, so every reader of the old root, and the graph's output names, stay
as they were; the replacements take the root's place in the node order. Each fusion is then a
few declarative lines:

    Rewrite(P(ACTIVATIONS, P("linear", "x", name="layer"), name="act"),
            lambda m: [fuse(m["layer"], "fused_linear", m.root, activation=activation_of(m["act"]))])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from lbdlc import ops
from lbdlc.ir import Graph, Node, Value

from .manager import PassContext


class P:
    """A node pattern: op (a name or a collection of names), input patterns, predicates."""

    def __init__(self, op: str | Iterable[str], *inputs: "P | str", name: str | None = None,
                 where: Callable[[Node], bool] | None = None, commutative: bool = False, any_inputs: bool = False):
        self.ops = {op} if isinstance(op, str) else set(op)
        self.any_inputs = any_inputs  # match the node whatever its inputs (a fused op with or without a residual)
        self.inputs = inputs
        self.name = name
        self.where = where
        self.commutative = commutative


@dataclass
class Match:
    root: Node
    nodes: dict[str, Node] = field(default_factory=dict)  # captured by `name=`
    values: dict[str, Value] = field(default_factory=dict)  # captured input names
    matched: list[Node] = field(default_factory=list)  # every node of the subgraph, root last

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def value(self, name: str) -> Value:
        return self.values[name]


@dataclass
class Rewrite:
    pattern: P
    build: Callable[[Match], list[Node] | None]
    note: str | None = None  # what the log calls one application, e.g. "linear + gelu fused"


class _Index:
    """Producers and readers of every value of a graph."""

    def __init__(self, graph: Graph):
        self.producer = graph.producers()
        self.readers: dict[int, list[Node]] = {}
        for n in graph.nodes:
            for v in n.inputs:
                self.readers.setdefault(id(v), []).append(n)
        self.outputs = {id(v) for v in graph.outputs}

    def only_feeds(self, node: Node, consumer: Node) -> bool:
        """Every output of `node` is read by `consumer` alone and by nothing else."""
        return all(
            id(v) not in self.outputs and all(r is consumer for r in self.readers.get(id(v), []))
            for v in node.outputs
        )


def _match(pat: P, node: Node, index: _Index, m: Match) -> Match | None:
    if node.op not in pat.ops or (pat.where is not None and not pat.where(node)):
        return None
    if pat.any_inputs:
        m = Match(m.root, dict(m.nodes), dict(m.values), m.matched + [node])
        if pat.name:
            m.nodes[pat.name] = node
        return m
    if len(pat.inputs) != len(node.inputs):
        return None
    orders = [list(node.inputs)]
    if pat.commutative and len(node.inputs) == 2:
        orders.append(list(reversed(node.inputs)))
    for values in orders:
        trial = Match(m.root, dict(m.nodes), dict(m.values), list(m.matched))
        if _match_inputs(pat, node, values, index, trial):
            if pat.name:
                trial.nodes[pat.name] = node
            trial.matched.append(node)
            return trial
    return None


def _match_inputs(pat: P, node: Node, values: list[Value], index: _Index, m: Match) -> bool:
    for sub, v in zip(pat.inputs, values):
        if isinstance(sub, str):
            if sub in m.values and m.values[sub] is not v:
                return False
            m.values[sub] = v
            continue
        producer = index.producer.get(id(v))
        if producer is None or len(producer.outputs) != 1 or not index.only_feeds(producer, node):
            return False
        found = _match(sub, producer, index, m)
        if found is None:
            return False
        m.nodes, m.values, m.matched = found.nodes, found.values, found.matched
    return True


def match_at(pattern: P, node: Node, graph: Graph, index: _Index | None = None) -> Match | None:
    """The match of `pattern` rooted at `node`, if any."""
    return _match(pattern, node, index or _Index(graph), Match(node))


def rewrite(graph: Graph, rules: list[Rewrite], ctx: PassContext | None = None) -> Graph:
    """Apply the rules in one forward sweep: at each node, the first rule whose pattern
    matches there (and whose builder accepts the match) replaces the matched subgraph. A
    replacement can itself be matched by a later root, so chains fuse in one sweep."""
    nodes = graph.nodes
    index = _Index(graph)
    i = 0
    while i < len(nodes):
        node = nodes[i]
        for rule in rules:
            m = _match(rule.pattern, node, index, Match(node))
            if m is None:
                continue
            new = rule.build(m)
            if new is None:
                continue
            if [id(v) for v in new[-1].outputs] != [id(v) for v in node.outputs]:
                raise AssertionError("a rewrite's last node must produce the root's outputs")
            gone = {id(n) for n in m.matched}
            before = sum(1 for n in nodes[:i] if id(n) in gone)
            nodes[:] = [n for n in nodes[:i] if id(n) not in gone] + new + nodes[i + 1:]
            graph.nodes = nodes
            index = _Index(graph)
            i = i - before + len(new) - 1
            if ctx is not None and rule.note:
                ctx.note(rule.note)
            break
        i += 1
    prune_params(graph, ctx)
    return graph


def prune_params(graph: Graph, ctx: PassContext | None = None) -> None:
    """Drop parameters no node uses any more (and their weights)."""
    used = {p for n in graph.nodes for p in n.params.values()}
    for name in [n for n in graph.params if n not in used]:
        del graph.params[name]
        if ctx is not None and ctx.weights is not None:
            ctx.weights.pop(name, None)


def fuse(base: Node, op: str, root: Node, inputs: list[Value] | None = None, **attrs) -> Node:
    """A node of `op` that takes over `base` (its name, parameters and spec line) and the root's
    outputs; its attributes are base's plus `attrs`. Keeping the base's name keeps the fused
    layer inside its scope (a block of the generated code) and its parameter names as they were."""
    new_attrs = ops.get(op).Attrs(**{**base.attrs.model_dump(), **attrs})
    return Node(op, base.name, list(inputs if inputs is not None else base.inputs), list(root.outputs), new_attrs,
                dict(base.params), base.origin)

