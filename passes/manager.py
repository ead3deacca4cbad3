"""Passes and the pass manager.

A pass is `Graph -> Graph` with a name, a one-line description and declared preconditions.
The manager runs a list of passes on a private copy of the graph (and of the weights, for
passes that rewrite parameters), checks the graph after every pass (SSA and no dangling
values, every node's output types re-inferred by its op, parameters declared once, used,
named as their op declares them, and matching the weights) and records what each pass
changed: nodes, parameters and bytes before and after, the rewrites it made, and its time.

Preconditions:
- `inference_only`: the pass changes what a training step computes (batch-norm folding
  replaces batch statistics by running ones; dropout removal drops the noise), so it never
  runs on code that trains (mode "training").
- `changes_weights`: the pass rewrites parameter values; it receives the weights through
  `PassContext.weights` and must keep them in step with `graph.params`. A pass that leaves
  `changes_weights` False may drop parameters (with the nodes that used them) but never
  creates or changes one; the manager checks this.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import ClassVar

from lbdlc import ops
from lbdlc.errors import SpecError
from lbdlc.ir import Graph, dim_eq

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1}
MODES = ("inference", "training")


class PassError(AssertionError):
    """A pass left the graph broken: a bug in the pass, reported with its name."""


@dataclass
class PassContext:
    """What a pass may read besides the graph, and where it records what it changed."""

    mode: str = "inference"  # "training": the graph becomes code that trains (model.py with train.py)
    weights: dict | None = None  # parameter name -> torch.Tensor; None when only the graph is wanted
    changes: Counter = field(default_factory=Counter)

    def note(self, what: str, count: int = 1) -> None:
        """Record a rewrite for the log: `ctx.note("batch_norm folded into conv2d")`."""
        self.changes[what] += count


class Pass:
    name: ClassVar[str]
    description: ClassVar[str]  # one line, shown by `lbdlc passes`
    inference_only: ClassVar[bool] = False
    changes_weights: ClassVar[bool] = False

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        raise NotImplementedError

    @property
    def preconditions(self) -> list[str]:
        out = []
        if self.inference_only:
            out.append("inference only")
        if self.changes_weights:
            out.append("rewrites weights")
        return out


PASSES: dict[str, Pass] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if cls.name in PASSES:
        raise ValueError(f"pass '{cls.name}' is registered twice")
    PASSES[cls.name] = cls()
    return cls


@dataclass
class PassRecord:
    """One line of the pass log."""

    name: str
    nodes_before: int
    nodes_after: int
    params_before: int  # trainable parameter values (buffers apart), as `lbdlc check` counts them
    params_after: int
    bytes_before: int  # bytes of everything an inference artifact carries (buffers included)
    bytes_after: int
    seconds: float
    changes: dict[str, int]
    skipped: str | None = None  # why the pass did not run

    @property
    def changed(self) -> bool:
        return bool(self.changes) or self.nodes_before != self.nodes_after or self.bytes_before != self.bytes_after

    def to_json(self, timings: bool = True) -> dict:
        out = {
            "pass": self.name,
            "nodes": [self.nodes_before, self.nodes_after],
            "params": [self.params_before, self.params_after],
            "bytes": [self.bytes_before, self.bytes_after],
            "changes": dict(sorted(self.changes.items())),
        }
        if self.skipped:
            out["skipped"] = self.skipped
        if timings:
            out["seconds"] = round(self.seconds, 6)
        return out


@dataclass
class PipelineResult:
    graph: Graph
    weights: dict | None
    log: list[PassRecord]


def graph_stats(graph: Graph) -> tuple[int, int, int]:
    """(nodes, trainable parameter values, bytes of the inference parameters)."""
    params = sum(p.numel for p in graph.params.values() if not p.buffer)
    nbytes = sum(graph.params[n].numel * DTYPE_BYTES[graph.params[n].dtype] for n in graph.inference_params())
    return len(graph.nodes), params, nbytes


def copy_graph(graph: Graph) -> Graph:
    """A copy a pass may edit freely: new node objects and containers; values, parameter
    declarations and attributes (all immutable by convention) are shared."""
    nodes = [replace(n, inputs=list(n.inputs), outputs=list(n.outputs), params=dict(n.params)) for n in graph.nodes]
    return Graph(graph.name, list(graph.inputs), nodes, list(graph.outputs), dict(graph.params), dict(graph.scopes))


def check_graph(graph: Graph, weights: dict | None = None) -> None:
    """The invariants every pass keeps; raises AssertionError naming what broke."""
    graph.verify()
    used: set[str] = set()
    for n in graph.nodes:
        if n.op not in ops.REGISTRY:
            raise AssertionError(f"node {n.name}: unknown op '{n.op}'")
        op = ops.get(n.op)
        lo, hi = (op.arity, op.arity) if isinstance(op.arity, int) else op.arity
        if len(n.inputs) < lo or (hi is not None and len(n.inputs) > hi):
            raise AssertionError(f"node {n.name}: {n.op} takes {op.arity} inputs, has {len(n.inputs)}")
        ins = [v.type for v in n.inputs]
        try:
            outs = op.infer(n.attrs, ins)
            declared = op.params(n.attrs, ins)
        except ops.ShapeError as exc:
            raise AssertionError(f"node {n.name} ({n.op}): {exc.message}") from None
        if len(outs) != len(n.outputs):
            raise AssertionError(f"node {n.name}: {n.op} infers {len(outs)} outputs, the node has {len(n.outputs)}")
        for want, v in zip(outs, n.outputs):
            if want.dtype != v.type.dtype or want.rank != v.type.rank or not all(dim_eq(a, b) for a, b in zip(want.shape, v.type.shape)):
                raise AssertionError(f"node {n.name}: output {v.name} is typed {v.type} {v.type.dtype}, its op infers {want} {want.dtype}")
        if set(declared) != set(n.params):
            raise AssertionError(f"node {n.name}: parameters {sorted(n.params)}, its op declares {sorted(declared)}")
        for local, full in n.params.items():
            p = graph.params.get(full)
            if p is None:
                raise AssertionError(f"node {n.name}: parameter {full} is not in the graph")
            if tuple(p.shape) != tuple(declared[local].shape) or p.dtype != declared[local].dtype:
                raise AssertionError(f"node {n.name}: parameter {full} is {list(p.shape)} {p.dtype}, "
                                     f"its op declares {list(declared[local].shape)} {declared[local].dtype}")
            used.add(full)
    for name, p in graph.params.items():
        if p.name != name:
            raise AssertionError(f"parameter {p.name} is stored under the name {name}")
    unused = sorted(set(graph.params) - used)
    if unused:
        raise AssertionError(f"parameters no node uses: {', '.join(unused[:5])}")
    if weights is not None:
        if set(weights) != set(graph.params):
            extra, missing = sorted(set(weights) - set(graph.params)), sorted(set(graph.params) - set(weights))
            raise AssertionError(f"weights and parameters differ (weights only: {extra[:5]}, parameters only: {missing[:5]})")
        for name, p in graph.params.items():
            if tuple(weights[name].shape) != tuple(p.shape):
                raise AssertionError(f"weight {name} has shape {list(weights[name].shape)}, the parameter {list(p.shape)}")


class PassManager:
    """Runs passes in order; `run` never modifies the graph or the weights it is given."""

    def __init__(self, passes: list[Pass | str], mode: str = "inference", verify: bool = True):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.passes = [PASSES[p] if isinstance(p, str) else p for p in passes]
        self.mode = mode
        self.verify = verify

    def run(self, graph: Graph, weights: dict | None = None) -> PipelineResult:
        for p in self.passes:
            if p.inference_only and self.mode == "training":
                raise SpecError(f"pass '{p.name}' is inference-only and cannot run on code that trains",
                                hint="leave it out of this build's passes")
        graph = copy_graph(graph)
        weights = dict(weights) if weights is not None else None
        log = []
        for p in self.passes:
            before = graph_stats(graph)
            old_params = dict(graph.params)
            ctx = PassContext(self.mode, weights)
            start = time.perf_counter()
            graph = p.run(graph, ctx)
            seconds = time.perf_counter() - start
            if self.verify:
                self._check(p, graph, weights, old_params)
            after = graph_stats(graph)
            log.append(PassRecord(p.name, before[0], after[0], before[1], after[1], before[2], after[2], seconds, dict(ctx.changes)))
        return PipelineResult(graph, weights, log)

    @staticmethod
    def _check(p: Pass, graph: Graph, weights: dict | None, old_params: dict) -> None:
        try:
            check_graph(graph, weights)
            if not p.changes_weights:
                for name, param in graph.params.items():
                    if old_params.get(name) != param:
                        raise AssertionError(f"it created or changed parameter {name} without declaring changes_weights")
        except AssertionError as exc:
            raise PassError(f"pass '{p.name}' broke the graph: {exc}") from None
