"""Activation checkpointing: which repeated blocks to recompute in backward.

`train.checkpointing` chooses (docs/training.md, "Activation checkpointing"):

- `none` (the default): keep every activation.
- `all`: recompute every block of every chained repetition (`h`, `layer3`, ...), one block
  per checkpoint: the least memory per segment, one extra forward pass of the blocks.
- `sqrt`: Chen et al. (2016): the n repeated blocks in segments of about sqrt(n) blocks, so
  about sqrt(n) segment inputs are kept and one segment's activations come back at a time.
- `{budget: 2GiB}`: recompute as little as possible such that the predicted peak of a
  training step (lbdlc.memory) fits the budget. The algorithm: for every segment length k
  (segments of k consecutive blocks, a repetition of m blocks cut into ceil(m/k) nearly equal
  segments), sort the segments greedily by activation bytes saved per recomputed FLOP (ties:
  earlier blocks first, their recomputation happens when backward has released the most) and
  take the shortest prefix of that order whose predicted peak fits (the peak falls as segments
  are added, so a binary search finds it); of the fitting plans over all k, the one with the
  fewest recomputed FLOPs wins, then the one with fewer checkpoint calls, then the lower peak. A budget below the least peak any plan
  reaches is an error that states that minimum.
- a list of blocks (`[h.0, h.1]`) or repetitions (`[h]`: each of its blocks): those, one
  block per checkpoint.
- `selective`: every block, one per checkpoint, under a selective policy
  (`torch.utils.checkpoint.create_selective_checkpoint_contexts`): the outputs of matrix
  products, convolutions and attention kernels are kept, pointwise ops, normalizations and
  dropout are recomputed. Most of the memory of `all` is saved (the pointwise and
  normalization activations are the bulk of a transformer block's) for a small part of its
  extra compute (recomputing them costs few FLOPs).

Units are the chained repetitions `lbdlc.backends.pytorch_blocks` turns into `for` loops in
model.py, so that the generated code wraps slices of the loop's ModuleList in
`torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .errors import SpecError, did_you_mean
from .ir import Graph, Node, Value
from .memory import MemoryConfig, OptimizerInfo, analyse, estimate, saved_bytes


@dataclass
class Segment:
    """Blocks [start, stop) of the repetition `root`, recomputed together in backward."""

    root: str
    start: int
    stop: int
    nodes: list[Node] = field(repr=False)
    inputs: list[Value] = field(repr=False)
    selective: bool = False  # keep matmul/convolution/attention outputs, recompute the rest

    @property
    def name(self) -> str:
        return f"{self.root}.{self.start}" if self.stop == self.start + 1 else f"{self.root}.{self.start}-{self.stop - 1}"


@dataclass
class Loop:
    root: str
    blocks: list  # pytorch_blocks.Instance, in order

    def segment(self, start: int, stop: int) -> Segment:
        members = self.blocks[start:stop]
        return Segment(self.root, start, stop, [n for b in members for n in b.nodes], list(members[0].inputs))


@dataclass
class Plan:
    policy: str  # none, all, sqrt, selective, budget, blocks
    segments: list[Segment]
    loops: dict[str, int]  # repetition -> its number of blocks
    line: int | None = None  # of `checkpointing:` in the spec
    spec_file: str | None = None
    budget: int | None = None
    config: MemoryConfig | None = None  # the sizes the figures below are for (None: unknown sizes)
    activations_before: int | None = None  # saved at the end of forward, without checkpointing
    activations_after: int | None = None
    peak_before: int | None = None
    peak_after: int | None = None
    extra_flops: int | None = None  # recomputed forward FLOPs per step, at `config`
    step_flops: int | None = None  # forward + backward FLOPs per step (3x forward), at `config`

    def by_root(self) -> dict[str, tuple[tuple[int, int], ...]]:
        out: dict[str, list[tuple[int, int]]] = {}
        for s in self.segments:
            out.setdefault(s.root, []).append((s.start, s.stop))
        return {r: tuple(v) for r, v in out.items()}

    @property
    def selective(self) -> bool:
        return self.policy == "selective"

    @property
    def recomputed_blocks(self) -> int:
        return sum(s.stop - s.start for s in self.segments)

    def describe(self) -> str:
        if not self.segments:
            return "no block is recomputed" + (" (the budget is met without recomputation)" if self.policy == "budget" else "")
        parts = []
        for root, segs in self.by_root().items():
            parts.append(f"{root}: " + ", ".join(f"[{a}:{b}]" for a, b in segs) + f" of {self.loops[root]}")
        n, k = self.recomputed_blocks, len(self.segments)
        what = " (selectively: matmul, convolution and attention outputs kept)" if self.selective else ""
        return f"{n} block{'s' * (n != 1)} recomputed{what} in {k} segment{'s' * (k != 1)} ({'; '.join(parts)})"

    def to_json(self) -> dict:
        c = self.config
        return {
            "policy": self.policy,
            "budget": self.budget,
            "segments": [{"blocks": s.root, "start": s.start, "stop": s.stop} for s in self.segments],
            "recomputed_blocks": self.recomputed_blocks,
            "selective": self.selective,
            "repetitions": dict(self.loops),
            "predicted_for": None if c is None else {"batch": c.batch, "sizes": dict(c.sizes), "precision": c.precision,
                                                     "device": c.device, "optimizer": c.optimizer.kind},
            "activations_bytes": None if self.activations_after is None else
            {"without": self.activations_before, "with": self.activations_after, "saved": self.activations_before - self.activations_after},
            "peak_bytes": None if self.peak_after is None else {"without": self.peak_before, "with": self.peak_after},
            "extra_flops_per_step": self.extra_flops,
            "extra_compute": None if not self.step_flops or self.extra_flops is None else round(self.extra_flops / self.step_flops, 4),
        }


def loops(graph: Graph) -> list[Loop]:
    """The chained repetitions of the graph (the `for` loops of model.py), in graph order."""
    from .backends import pytorch_blocks as blocks

    instances = blocks.find_instances(graph)
    chains = blocks._loops(graph, instances, {})
    found = [Loop(chain[0].prefix.rsplit(".", 1)[0], chain) for chain in chains.values()]
    return sorted(found, key=lambda lp: lp.blocks[0].start)


def _balanced(length: int, parts: int) -> list[tuple[int, int]]:
    """[0, length) in `parts` consecutive ranges whose sizes differ by at most one (longer first)."""
    base, extra = divmod(length, parts)
    out, start = [], 0
    for k in range(parts):
        stop = start + base + (1 if k < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def segments_of_length(found: list[Loop], k: int) -> list[Segment]:
    return [lp.segment(a, b) for lp in found for a, b in _balanced(len(lp.blocks), math.ceil(len(lp.blocks) / k))]


def sqrt_segments(found: list[Loop]) -> list[Segment]:
    n = sum(len(lp.blocks) for lp in found)
    return segments_of_length(found, max(1, round(math.sqrt(n))))


class _Evaluator:
    """Predicted peaks of candidate plans at one configuration (one analysis of the graph)."""

    def __init__(self, graph: Graph, config: MemoryConfig, losses):
        self.graph, self.config, self.losses = graph, config, losses
        self.analysis = analyse(graph, config)

    def peak(self, segments: list[Segment]) -> int:
        return estimate(self.graph, self.config, segments, self.losses, analysis=self.analysis).peak

    def flops(self, segments: list[Segment]) -> int:
        return sum(self.analysis.flops[n.name] for s in segments for n in s.nodes)

    def gain(self, s: Segment) -> int:
        """Activation bytes the end of forward no longer holds when `s` is recomputed."""
        return saved_bytes(self.analysis, self.graph) - saved_bytes(self.analysis, self.graph, [s])


def plan_budget(graph: Graph, found: list[Loop], config: MemoryConfig, budget: int, losses=None,
                loc=None) -> list[Segment]:
    ev = _Evaluator(graph, config, losses)
    if ev.peak([]) <= budget:
        return []
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    longest = max(len(lp.blocks) for lp in found)
    lengths = sorted({math.ceil(len(lp.blocks) / math.ceil(len(lp.blocks) / k)) for lp in found for k in range(1, longest + 1)} | {1})
    best, least = None, None
    for k in lengths:
        candidates = segments_of_length(found, k)
        rank = {id(s): (-ev.gain(s) / max(1, ev.flops([s])), index[id(s.nodes[0])]) for s in candidates}
        order = sorted(candidates, key=lambda s: rank[id(s)])

        def chosen(m: int, order: list[Segment] = order) -> list[Segment]:
            return sorted(order[:m], key=lambda seg: index[id(seg.nodes[0])])

        full = ev.peak(chosen(len(order)))
        if least is None or full < least[0]:
            least = (full, k)
        if full > budget:
            continue
        lo, hi = 1, len(order)  # the smallest prefix that fits (peaks fall as segments are added)
        while lo < hi:
            mid = (lo + hi) // 2
            if ev.peak(chosen(mid)) <= budget:
                hi = mid
            else:
                lo = mid + 1
        plan = chosen(lo)
        key = (ev.flops(plan), len(plan), ev.peak(plan))
        if best is None or key < best[0]:
            best = (key, plan)
    if best is None:
        from .memory import human_size

        report = estimate(graph, config, [], losses, analysis=ev.analysis)
        state = report.weights + report.grads + report.optimizer
        raise SpecError(
            f"checkpointing: the budget of {human_size(budget)} cannot be met: the least peak any checkpointing plan "
            f"reaches is {human_size(least[0])} ({least[0]:,} bytes; segments of {least[1]} block{'s' if least[1] > 1 else ''}, "
            f"all recomputed), of which weights, gradients and optimizer state take {human_size(state)}",
            loc,
            hint=f"raise the budget to at least {human_size(least[0])}, or lower the batch size "
                 f"({config.batch} per step here), or train in bf16",
        )
    return best[1]


def _named(found: list[Loop], names: list[str], locs: list) -> list[Segment]:
    by_root = {lp.root: lp for lp in found}
    blocks = {b.prefix: (lp, k) for lp in found for k, b in enumerate(lp.blocks)}
    chosen: dict[tuple[str, int], Segment] = {}
    for name, loc in zip(names, locs):
        if name in by_root:
            for k in range(len(by_root[name].blocks)):
                chosen[(name, k)] = by_root[name].segment(k, k + 1)
        elif name in blocks:
            lp, k = blocks[name]
            chosen[(lp.root, k)] = lp.segment(k, k + 1)
        else:
            known = list(by_root) + list(blocks)
            hint = did_you_mean(name, known) or (f"repetitions here: {', '.join(by_root)}" if by_root else None)
            raise SpecError(f"checkpointing: '{name}' is not a repeated block of this model", loc, hint=hint)
    order = {lp.root: i for i, lp in enumerate(found)}
    return [chosen[key] for key in sorted(chosen, key=lambda rk: (order[rk[0]], rk[1]))]


def make_plan(graph: Graph, policy, config: MemoryConfig | None, losses=None, loc=None, item_locs=None,
              spec_file: str | None = None) -> Plan | None:
    """The plan of `policy` (a `train.checkpointing` value) for `graph`; None for `none`.
    `config` gives the sizes the figures (and a budget) are predicted for; without it a
    budget is an error and the plan carries no figures."""
    from .training.schema import CheckpointBudget

    if policy is None or policy == "none":
        return None
    found = loops(graph)
    if not found:
        raise SpecError("checkpointing: this model has no repeated blocks to recompute", loc,
                        hint="checkpointing recomputes the blocks of a chained repetition (a layer with `repeat:`)")
    budget = None
    if policy == "all":
        kind, segments = "all", segments_of_length(found, 1)
    elif policy == "sqrt":
        kind, segments = "sqrt", sqrt_segments(found)
    elif policy == "selective":
        kind, segments = "selective", [replace(s, selective=True) for s in segments_of_length(found, 1)]
    elif isinstance(policy, CheckpointBudget):
        if config is None:
            raise SpecError("checkpointing: a budget needs the sizes of the symbolic dimensions", loc,
                            hint="give them as `sizes: {seq: 1024}` beside `budget:`")
        kind, budget = "budget", policy.budget
        segments = plan_budget(graph, found, config, budget, losses, loc)
    else:
        kind, segments = "blocks", _named(found, list(policy), item_locs or [loc] * len(policy))
    plan = Plan(kind, segments, {lp.root: len(lp.blocks) for lp in found}, loc.line if loc else None, spec_file, budget, config)
    if config is not None:
        _figures(plan, graph, config, losses)
    return plan


def _figures(plan: Plan, graph: Graph, config: MemoryConfig, losses) -> None:
    a = analyse(graph, config)
    before = estimate(graph, config, [], losses, analysis=a)
    after = estimate(graph, config, plan.segments, losses, analysis=a)
    plan.activations_before, plan.activations_after = before.activations, after.activations
    plan.peak_before, plan.peak_after = before.peak, after.peak
    plan.extra_flops = sum(a.flops[n.name] for s in plan.segments for n in s.nodes if not (s.selective and a.cached[n.name]))
    plan.step_flops = 3 * sum(a.flops.values())


# ---------------------------------------------------------------------------------------
# From a loaded spec


def train_config(loaded, graph: Graph, batch: int | None = None, sizes: dict[str, int] | None = None,
                 precision: str | None = None, optimizer: str | None = None, device: str = "cuda",
                 required: bool = True) -> MemoryConfig | None:
    """The configuration of one training step: the command line's values over the spec's
    (`train.batch_size` / `grad_accumulation`, `data` and `checkpointing.sizes`, `precision`,
    `optimizer`). None when a symbolic dimension has no value and `required` is false."""
    t = getattr(loaded.spec, "train", None) if loaded is not None else None
    known: dict[str, int] = {}
    if t is not None:
        data = t.data
        if getattr(data, "kind", None) == "text":
            for v in graph.inputs:
                for d in v.type.shape[1:2]:
                    if not isinstance(d, int) and len(d.free_symbols) == 1:
                        known[str(next(iter(d.free_symbols)))] = data.seq_len
        known.update(getattr(data, "sizes", {}) or {})
        policy = t.checkpointing
        known.update(getattr(policy, "sizes", {}) or {})
    known.update(sizes or {})
    if batch is None:
        if t is None:
            if not required:
                return None
            raise SpecError("the memory estimate needs a batch size", hint="give it with --batch N")
        batch = max(1, t.batch_size // t.grad_accumulation)
    known.pop("batch", None)
    missing = [s for s in graph.symbols() if s != "batch" and s not in known]
    if missing:
        if not required:
            return None
        raise SpecError(f"the memory estimate needs a value for the dimension '{missing[0]}'",
                        hint=f"give it with --{missing[0]} N" if missing[0] == "seq" else f"give it with --size {missing[0]}=N")
    opt = OptimizerInfo.of(t.optimizer) if t is not None and optimizer is None else OptimizerInfo(optimizer or "adam")
    prec = precision or (t.precision if t is not None else "fp32")
    used = {s: known[s] for s in graph.symbols() if s != "batch"}
    return MemoryConfig(batch, tuple(sorted(used.items())), prec, opt, device)


def plan_for_spec(loaded, graph: Graph, config: MemoryConfig | None = None, policy=None) -> Plan | None:
    """The checkpointing plan of a spec's `train:` section (or `policy`), at `config` (default:
    the spec's own batch and sizes, when it gives them)."""
    from .source import loc_of

    t = getattr(loaded.spec, "train", None)
    if policy is None:
        policy = t.checkpointing if t is not None else "none"
        loc = loc_of(loaded.raw, ("train", "checkpointing"))
        item_locs = [loc_of(loaded.raw, ("train", "checkpointing", k)) for k in range(len(policy))] if isinstance(policy, list) else None
    else:
        loc, item_locs = None, None
    if policy == "none":
        return None
    if config is None:
        config = train_config(loaded, graph, required=False)
    losses = t.loss_list() if t is not None else None
    return make_plan(graph, policy, config, losses, loc, item_locs, str(loaded.path))
