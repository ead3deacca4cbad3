"""The intermediate representation: a small SSA dataflow graph with symbolic shapes.

`Graph(inputs, nodes, outputs, params)`; `Node(op, name, inputs, outputs, attrs, origin)`;
`Value(name, TensorType(shape, dtype))`. A dimension is an `int` or a sympy expression over
named symbols (`batch`, `seq`), so one build serves many batch sizes. Parameters and
buffers live in one dotted namespace (`conv1.weight`) shared by every backend.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Union

import sympy

from .source import Loc

Dim = Union[int, sympy.Expr]


def symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True, positive=True)


def as_dim(value) -> Dim:
    """Normalise a dimension: plain ints stay ints, integer-valued expressions become ints."""
    if isinstance(value, int):
        return value
    value = sympy.sympify(value)  # sympy keeps sums and products canonical; no simplify() needed
    return int(value) if value.is_Integer else value


def dim_eq(a: Dim, b: Dim) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0


def dim_str(d: Dim) -> str:
    return str(d)


def numel(shape) -> Dim:
    total: Dim = 1
    for d in shape:
        total = total * d
    return as_dim(total)


def per_sample(value: Dim) -> int:
    """An int for reports: every symbol (batch, seq, ...) taken as 1."""
    if isinstance(value, int):
        return value
    return int(value.subs({s: 1 for s in value.free_symbols}))


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: str = "float32"

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        return "[" + ", ".join(dim_str(d) for d in self.shape) + "]"


@dataclass(eq=False)
class Value:
    name: str
    type: TensorType


@dataclass(frozen=True)
class Init:
    """How a parameter is initialised: a kind (`kaiming_uniform`, `uniform`, `zeros`, `ones`,
    `normal`) and its arguments; materialised by `lbdlc.weights`."""

    kind: str
    args: tuple[tuple[str, Any], ...] = ()

    def arg(self, key: str, default=None):
        return dict(self.args).get(key, default)


@dataclass(frozen=True)
class ParamDef:
    """A parameter or buffer as an op declares it, before it gets its dotted name."""

    shape: tuple[int, ...]
    init: Init
    dtype: str = "float32"
    buffer: bool = False  # buffers (BatchNorm running statistics) are state, not trainable
    training_only: bool = False  # never read at inference (BatchNorm's batch counter)


@dataclass(frozen=True, kw_only=True)
class Param(ParamDef):
    """A declared parameter with its dotted name in the graph (`conv1.weight`)."""

    name: str

    @classmethod
    def named(cls, name: str, decl: ParamDef) -> "Param":
        return cls(name=name, **{f.name: getattr(decl, f.name) for f in fields(ParamDef)})

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(eq=False)
class Node:
    op: str
    name: str  # dotted scope, also the prefix of its parameters
    inputs: list[Value]
    outputs: list[Value]
    attrs: Any  # the op's resolved, frozen attribute model
    params: dict[str, str] = field(default_factory=dict)  # local name -> dotted Param name
    origin: Loc | None = None


@dataclass(frozen=True)
class SpecScope:
    """Where a spec's structure put a group of nodes: a block use (`layer2.0`, a use of block
    `bottleneck`) or a repetition (`h`, repeated 12 times). Backends that mirror the spec's
    structure (the PyTorch code's block classes and loops) read it; nothing else depends on it,
    and a pass that moves nodes across scopes may leave it stale (backends re-check it)."""

    block: str | None = None  # the block's name, for a block use
    params: tuple[tuple[str, Any], ...] = ()  # the block's parameter values at this use
    inputs: tuple[str, ...] = ()  # the block's input names
    description: str | None = None
    defined: Loc | None = None  # where the block is defined
    repeat: int = 0  # for a repetition: how many times


@dataclass(eq=False)
class Graph:
    name: str
    inputs: list[Value]
    nodes: list[Node]
    outputs: list[Value]
    params: dict[str, Param]
    scopes: dict[str, SpecScope] = field(default_factory=dict)  # name prefix -> what made it

    def inference_params(self) -> list[str]:
        """Parameter names an inference artifact reads, in graph order (the TVM argument order)."""
        return [n for n, p in self.params.items() if not p.training_only]

    def producers(self) -> dict[int, Node]:
        return {id(v): n for n in self.nodes for v in n.outputs}

    def users(self) -> dict[int, list[Node]]:
        out: dict[int, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                out.setdefault(id(v), []).append(n)
        return out

    def symbols(self) -> list[str]:
        """The symbolic dimension names of the inputs, in order of first appearance."""
        seen: list[str] = []
        for v in self.inputs:
            for d in v.type.shape:
                if not isinstance(d, int):
                    for s in sorted(d.free_symbols, key=str):
                        if str(s) not in seen:
                            seen.append(str(s))
        return seen

    def verify(self) -> None:
        """Structural invariants: SSA, no dangling values, unique names, params declared."""
        defined = {id(v) for v in self.inputs}
        names = {v.name for v in self.inputs}
        for n in self.nodes:
            for v in n.inputs:
                if id(v) not in defined:
                    raise AssertionError(f"node {n.name}: input {v.name} is used before it is defined")
            for v in n.outputs:
                if v.name in names:
                    raise AssertionError(f"value name {v.name} is defined twice")
                defined.add(id(v))
                names.add(v.name)
            for p in n.params.values():
                if p not in self.params:
                    raise AssertionError(f"node {n.name}: parameter {p} is not in the graph")
        for v in self.outputs:
            if id(v) not in defined:
                raise AssertionError(f"output {v.name} is not produced by the graph")
