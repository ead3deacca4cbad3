"""Optimization levels and how a build chooses its passes.

Where passes apply: to the inference artifacts (model.onnx, the TVM library). model.py,
train.py and weights.safetensors follow the spec as written, so training, `--weights`
round trips and reviews of the generated code are not affected by optimization. A spec can
opt model.py in with `compile: {pytorch: true}`; model.py then gets the passes too, except
where it trains: with a `train:` section, model.py is what train.py trains, and a pass that
changes training (inference-only: batch-norm folding, dropout removal, constant folding)
is refused there when named explicitly, and left out (and logged) when it comes from a level.

Levels (the default is -O1):
  -O0  nothing: the artifacts follow the spec op for op.
  -O1  clean-up that never changes a number: dropout removal, identities, duplicates, dead code.
  -O2  -O1, then constant and batch-norm folding and the fusions (activations, attention,
       linear/conv + bias + residual + activation): folded weights round differently (~1e-7).
  -O3  -O2, then the clean-up passes once more for what the fusions exposed.

Which list a build runs: `--passes` on the command line, else `-O`, else the spec's
`compile: {passes: [...]}` or `compile: {level: N}`, else -O1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lbdlc.errors import Note, SpecError, did_you_mean
from lbdlc.source import Loc, loc_of

from .manager import PASSES

CLEANUP = ["remove_dropout", "remove_identities", "eliminate_common_subexpressions", "eliminate_dead_code"]
FUSION = ["fold_constants", "fold_batch_norm", "recognize_layer_norm", "recognize_activations", "fuse_attention",
          "fuse_linear_activation", "fuse_conv_activation"]
LEVELS: dict[int, list[str]] = {
    0: [],
    1: CLEANUP,
    2: CLEANUP + FUSION,
    3: CLEANUP + FUSION + CLEANUP[1:],
}
DEFAULT_LEVEL = 1


@dataclass
class Pipeline:
    """The passes a build runs, and where the choice was written."""

    names: list[str]
    source: str  # "default", "-O2", "--passes", "compile.passes", "compile.level"
    level: int | None = None
    locs: list[Loc | None] = field(default_factory=list)  # where each name was written (explicit lists)
    pytorch: bool = False  # compile.pytorch: model.py gets the passes too
    pytorch_loc: Loc | None = None

    @property
    def explicit(self) -> bool:
        return self.level is None

    def for_training(self, train_loc: Loc | None) -> tuple[list[str], list[str]]:
        """The passes model.py gets when train.py trains it: (passes, left-out inference-only
        passes of a level). An inference-only pass named explicitly is refused."""
        kept, left_out = [], []
        for k, name in enumerate(self.names):
            if not PASSES[name].inference_only:
                kept.append(name)
                continue
            if not self.explicit:
                left_out.append(name)
                continue
            where = self.locs[k] if k < len(self.locs) else None
            notes = [Note("model.py gets the passes because of this", self.pytorch_loc)] if self.pytorch_loc else []
            if train_loc is not None:
                notes.append(Note("and train.py trains model.py (this spec has `train:`)", train_loc))
            raise SpecError(
                f"pass '{name}' is inference-only: applied to model.py it would change what train.py trains",
                where, notes=notes,
                hint="leave it out, or drop `pytorch: true`: the ONNX and TVM artifacts get every pass either way",
            )
        return kept, left_out


def unknown_pass_hint(name: str) -> str:
    return did_you_mean(name, PASSES) or "`lbdlc passes` lists the passes"


def _check_names(names: list[str], locs: list[Loc | None]) -> None:
    for name, loc in zip(names, locs):
        if name not in PASSES:
            raise SpecError(f"unknown pass '{name}'", loc, hint=unknown_pass_hint(name))


def choose(loaded=None, passes: list[str] | None = None, level: int | None = None) -> Pipeline:
    """The pipeline of a build: command line first (`--passes`, then `-O`), then the spec's
    `compile:` section, then the default level."""
    compile_ = getattr(loaded.spec, "compile", None) if loaded is not None else None
    raw = loaded.raw if loaded is not None else None
    pytorch = bool(compile_ and compile_.pytorch)
    pytorch_loc = loc_of(raw, ("compile", "pytorch")) if pytorch else None
    common = dict(pytorch=pytorch, pytorch_loc=pytorch_loc)
    if passes is not None:
        names = [p.strip() for item in passes for p in item.split(",") if p.strip()]
        _check_names(names, [None] * len(names))
        return Pipeline(names, "--passes", None, [None] * len(names), **common)
    if level is not None:
        if level not in LEVELS:
            raise SpecError(f"there is no optimization level -O{level}", hint="choose -O0, -O1, -O2 or -O3")
        return Pipeline(list(LEVELS[level]), f"-O{level}", level, **common)
    if compile_ is not None and compile_.passes is not None:
        locs = [loc_of(raw, ("compile", "passes", k)) for k in range(len(compile_.passes))]
        _check_names(list(compile_.passes), locs)
        return Pipeline(list(compile_.passes), "compile.passes", None, locs, **common)
    if compile_ is not None and compile_.level is not None:
        return Pipeline(list(LEVELS[compile_.level]), "compile.level", compile_.level, **common)
    return Pipeline(list(LEVELS[DEFAULT_LEVEL]), "default", DEFAULT_LEVEL, **common)


@dataclass
class Optimized:
    """What a build runs its backends on: the inference graph (ONNX, TVM) and model.py's graph,
    each with its weights and pass log (None where no pass ran for it)."""

    pipeline: Pipeline
    graph: object  # the inference artifacts' graph
    weights: dict
    log: list | None
    pytorch_graph: object
    pytorch_weights: dict
    pytorch_log: list | None = None
    pytorch_mode: str | None = None  # "training" (train.py trains model.py) or "inference"
    left_out: list[str] = field(default_factory=list)  # inference-only level passes model.py did not get

    def manifest(self) -> dict:
        """The pass section of manifest.json (no timings: a manifest is reproducible)."""
        p = self.pipeline
        out = {
            "chosen_by": p.source,
            "level": p.level,
            "passes": list(p.names),
            "inference": [r.to_json(timings=False) for r in self.log] if self.log is not None else None,
            "pytorch": None,
        }
        if self.pytorch_log is not None:
            out["pytorch"] = {"mode": self.pytorch_mode, "left_out": self.left_out,
                              "log": [r.to_json(timings=False) for r in self.pytorch_log]}
        return out


def optimize(loaded, graph, weights: dict, pipeline: Pipeline, backends) -> Optimized:
    """Run the pipeline for the inference backends, and for model.py when the spec asks."""
    from .manager import PassManager

    py_names, left_out, mode = None, [], None
    if pipeline.pytorch and "pytorch" in backends:  # checked first: a refusal comes before any work
        if getattr(loaded.spec, "train", None) is not None:
            mode = "training"
            py_names, left_out = pipeline.for_training(loaded.raw.key_locs.get("train"))
        else:
            mode, py_names = "inference", list(pipeline.names)
    inference = None
    if any(b in backends for b in ("onnx", "tvm")):
        inference = PassManager(pipeline.names, "inference").run(graph, weights)
    result = Optimized(pipeline, graph, weights, None, graph, weights)
    if inference is not None:
        result.graph, result.weights, result.log = inference.graph, inference.weights, inference.log
    if py_names is not None:
        if inference is not None and mode == "inference":
            py = inference  # the same passes in the same mode: one graph serves all three backends
        else:
            py = PassManager(py_names, mode).run(graph, weights)
        result.pytorch_graph, result.pytorch_weights, result.pytorch_log = py.graph, py.weights, py.log
        result.pytorch_mode, result.left_out = mode, left_out
    return result


def separate_inference_weights(opt: Optimized) -> bool:
    """Whether the inference artifacts need weights other than weights.safetensors (model.py's):
    a pass created or rewrote a parameter they read."""
    import torch

    file = opt.pytorch_weights
    for name in opt.graph.inference_params():
        if name not in file:
            return True
        a, b = opt.weights[name], file[name]
        if a is not b and not (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)):
            return True
    return False
