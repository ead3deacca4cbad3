"""A build of a spec with `finetune:` (LoRA), or with `--adapter DIR` / `--merge`.

The driver calls `prepare(loaded, graph, options)` after lowering. It

1. loads the base weights: `--weights FILE` if given, else `finetune.base` (a path relative
   to the spec's folder, like train data), else the seeded initial weights. The names and
   shapes must be the spec's; an error names the first parameter that differs, at the
   `finetune.base` line, with a note at the layer's line. A `--weights` file that already
   holds the adapters (`<layer>.lora_A.weight`, as train.py writes run/weights.safetensors) is
   the fine-tuned model itself and is loaded against the adapted graph;
2. runs the spec's `lora` pass (lbdlc/lora.py's `lora_pass`: targets, r, α, dropout, rsLoRA;
   attention projections are written out by passes/decompose_attention.py);
3. with `--adapter DIR`, fills A and B from a PEFT adapter directory (lbdlc/adapters.py:
   rank, shapes and targets checked, errors name the adapter key); without a `finetune:`
   section the adapter's own targets, rank and alpha are used;
4. with `--merge`, folds every adapter into its base weight (`lora_merge`): the artifacts then
   have the base model's parameters and ops, and train.py (if any) trains the merged model;
5. otherwise lists the parameters train.py trains (`trainable`: A and B, and what `freeze`
   leaves or `train_also` names); backends/train_lora.py makes train.py freeze the rest and
   save the adapters in PEFT's layout beside run/weights.safetensors.

`Finetuned.report` is the manifest's `finetune` section.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import Note, SpecError
from .ir import Graph
from .source import loc_of


@dataclass
class TrainFinetune:
    """What train.py needs (backends/train_lora.py): the parameters it trains, the adapters
    it saves and their PEFT config."""

    trainable: list[str]
    adapters: list[str]  # lora_linear layer names
    r: int
    alpha: float
    dropout: float
    rslora: bool
    base: str | None
    spec_line: int | None = None
    quantized_values: int = 0  # QLoRA: weight values held as quantized buffers (counted in the total train.py prints)


@dataclass
class Finetuned:
    graph: Graph
    weights: dict
    train: TrainFinetune | None  # None for a merged build
    report: dict = field(default_factory=dict)


def _base_path(loaded, options) -> tuple[Path | None, object]:
    if options.weights:
        return Path(options.weights), None
    spec = getattr(loaded.spec, "finetune", None)
    if spec is None or spec.base is None:
        return None, None
    p = Path(spec.base)
    if not p.is_absolute():
        p = loaded.path.parent / p
    return p, loc_of(loaded.raw, ("finetune", "base"))


def load_base(graph: Graph, path: Path, loc=None, what: str = "finetune.base") -> dict:
    """Base weights for `graph`; a mismatch names the first differing parameter and its layer."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .weights import TORCH_DTYPES

    hint_read = "paths are relative to the spec's folder" if loc is not None else None
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise SpecError(f"{what}: no such weights file: {path}", loc, hint=hint_read or "check the path") from None
    except (SafetensorError, OSError) as exc:
        raise SpecError(f"{what}: {path} is not a readable safetensors file: {exc}", loc) from None
    owner = {full: n for n in graph.nodes for full in n.params.values()}

    def layer_note(name):
        node = owner.get(name)
        return [Note(f"parameter '{name}' belongs to layer '{node.name}' ({node.op})", node.origin)] if node is not None else []

    for name, p in graph.params.items():
        if name not in tensors:
            close = [k for k in tensors if k.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]][:3]
            raise SpecError(f"{what} {path} has no tensor '{name}' ({len(tensors)} tensors in the file, the spec has {len(graph.params)} parameters)",
                            loc, notes=layer_note(name),
                            hint="weights are matched by the spec's parameter names" + (f"; the file has e.g. {', '.join(close)}" if close else ""))
        t = tensors[name]
        if tuple(t.shape) != tuple(p.shape) or t.dtype != TORCH_DTYPES[p.dtype]:
            raise SpecError(f"{what} {path}: tensor '{name}' is {list(t.shape)} {str(t.dtype).removeprefix('torch.')}, "
                            f"the spec's parameter is {list(p.shape)} {p.dtype}", loc, notes=layer_note(name),
                            hint="the base must come from the same architecture (check the spec's sizes and vars)")
    extra = sorted(set(tensors) - set(graph.params))
    if extra:
        raise SpecError(f"{what} {path} has tensor '{extra[0]}', which is no parameter of this spec"
                        + (f" ({len(extra)} such tensors)" if len(extra) > 1 else ""), loc,
                        hint="weights are matched by the spec's parameter names; `lbdlc check --json` lists them")
    return {n: tensors[n] for n in graph.params}


def _has_adapters(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return any(".lora_A." in k or ".lora_B." in k for k in f.keys())
    except Exception:  # unreadable: load_base reports it
        return False


def prepare(loaded, graph: Graph, options) -> Finetuned | None:
    """The graph and weights a build compiles when the spec fine-tunes or --adapter/--merge
    ask for it; None when neither applies (the driver then loads weights as usual)."""
    from .passes import PassManager
    from .passes.lora import LoRAMerge
    from .weights import initialize

    spec = getattr(loaded.spec, "finetune", None)
    adapter = getattr(options, "adapter", None)
    adapters = [Path(a) for a in adapter] if isinstance(adapter, (list, tuple)) else ([Path(adapter)] if adapter else [])
    lambdas = list(getattr(options, "adapter_weights", None) or [])
    merge = getattr(options, "merge", False)
    if lambdas or len(adapters) > 1:
        return _merge_several(loaded, graph, options, adapters, lambdas)
    adapter = adapters[0] if adapters else None
    if spec is None and adapter is None:
        if merge:
            raise SpecError("--merge folds LoRA adapters into the base weights, and this build has none",
                            hint="give the adapter with --adapter DIR, or add a `finetune:` section")
        return None
    path, loc = _base_path(loaded, options)
    what = "--weights" if options.weights else "finetune.base"
    if spec is not None:
        from .lora import lora_pass, qlora_pass

        lora, qlora = lora_pass(loaded, options.seed), qlora_pass(loaded)
        passes = [lora] + ([qlora] if qlora is not None else [])
        if path is not None and options.weights and _has_adapters(path):  # the fine-tuned model itself
            res = PassManager(passes, "training").run(graph, initialize(graph, options.seed))
            res.weights = load_base(res.graph, path, None, "--weights")
            source = "fine-tuned"
        else:
            base = load_base(graph, path, loc, what) if path is not None else initialize(graph, options.seed)
            res = PassManager(passes, "training").run(graph, base)
            source = "base"
        if adapter is not None:
            from .adapters import load_adapter

            res.weights.update(load_adapter(res.graph, adapter))
        alpha, rslora, dropout = spec.lora.alpha, spec.lora.rslora, spec.lora.dropout
    else:
        from .adapters import apply_adapter, read_config

        base = load_base(graph, path, None, "--weights") if path is not None else initialize(graph, options.seed)
        res = apply_adapter(graph, base, adapter)
        cfg = read_config(adapter)
        alpha, rslora, dropout, source = cfg.lora_alpha, cfg.use_rslora, cfg.lora_dropout, "base"
    adapted = [n for n in res.graph.nodes if n.op in ("lora_linear", "lora_linear_q")]
    total = sum(p.numel for p in res.graph.params.values() if not p.buffer)
    report = {
        "weights": str(path) if path is not None else None,
        "weights_are": source if path is not None else "seeded initialization",
        "adapter": str(adapter) if adapter is not None else None,
        "adapted_layers": [n.name for n in adapted],
        "r": adapted[0].attrs.r if adapted else None,
        "alpha": alpha,
        "rslora": rslora,
        "lora_params": sum(res.graph.params[n.params[k]].numel for n in adapted for k in ("lora_A.weight", "lora_B.weight")),
    }
    qspec = spec.qlora if spec is not None else None
    if qspec is not None:  # QLoRA: which layers have a quantized base
        report["qlora"] = {"format": qspec.format, "layers": qlora.report}
    if merge:
        requantize = qspec is None or qspec.merge == "requantize"
        merger = LoRAMerge(requantize=requantize)
        merged = PassManager([merger], "inference").run(res.graph, res.weights)
        report.update(merged=True, params=sum(p.numel for p in merged.graph.params.values() if not p.buffer))
        if qspec is None:
            report["precision"] = "float32 (adapters folded in float64, rounded once)"
        elif requantize:
            report["precision"] = f"{qspec.format}: dequantized base + adapters, requantized (finetune.qlora.merge: requantize)"
            report["qlora"]["merged"] = merger.report
        else:
            report["precision"] = "float32: dequantized base + adapters, kept unquantized (finetune.qlora.merge: float32)"
        return Finetuned(merged.graph, merged.weights, None, report)
    train = None
    if spec is not None:
        from .lora import trainable

        names = trainable(loaded, res.graph)
        n_train = sum(res.graph.params[n].numel for n in names)
        quantized = sum(n.attrs.in_features * n.attrs.out_features for n in adapted if n.op == "lora_linear_q")
        total += quantized  # QLoRA: the base's weights are buffers, still values of the model
        report.update(merged=False, params=total, trainable_params=n_train, trainable_fraction=n_train / total if total else 0.0)
        if quantized:
            report["quantized_base_values"] = quantized
        line = loaded.raw.key_locs.get("finetune")
        train = TrainFinetune(names, [n.name for n in adapted], report["r"] or spec.lora.r, alpha, dropout, rslora,
                              str(path) if path is not None else None, line.line if line is not None else None, quantized)
    else:
        report.update(merged=False, params=total)
    return Finetuned(res.graph, res.weights, train, report)


def _merge_several(loaded, graph: Graph, options, adapters: list[Path], lambdas: list[float]) -> Finetuned:
    """--adapter A --adapter B [--adapter-weights λ1,λ2] --merge: W + Σ λ_i·scale_i·B_i A_i on the base."""
    from .adapters import merge_adapters
    from .weights import initialize

    if not adapters:
        raise SpecError("--adapter-weights gives a weight per adapter, and there is no --adapter", hint="add --adapter DIR for each weight")
    if lambdas and len(lambdas) != len(adapters):
        raise SpecError(f"--adapter-weights has {len(lambdas)} weights for {len(adapters)} adapters", hint="give one weight per --adapter")
    if not getattr(options, "merge", False):
        raise SpecError(f"{len(adapters)} adapters with weights can only be built merged into one model",
                        hint="add --merge (a build without it holds one adapter: its A and B stay separate layers)")
    path, loc = _base_path(loaded, options)
    what = "--weights" if options.weights else "finetune.base"
    if path is not None and options.weights and _has_adapters(path):
        raise SpecError(f"--weights {path} holds LoRA adapters; merging several adapters needs the base model's weights",
                        hint="pass the base weights with --weights, and each adapter with --adapter")
    base = load_base(graph, path, loc, what) if path is not None else initialize(graph, options.seed)
    weights, merged = merge_adapters(graph, base, list(zip(adapters, lambdas or [1.0] * len(adapters))))
    report = {
        "weights": str(path) if path is not None else None,
        "weights_are": "base" if path is not None else "seeded initialization",
        "adapters": merged,
        "merged": True,
        "params": sum(p.numel for p in graph.params.values() if not p.buffer),
        "precision": "float32 (adapters folded in float64, rounded once)",
    }
    return Finetuned(graph, weights, None, report)


def describe(loaded, graph: Graph) -> str | None:
    """One line for `lbdlc check` on a spec with `finetune:`: the adapters the LoRA pass adds
    and the parameters train.py trains (no weights are made)."""
    spec = getattr(loaded.spec, "finetune", None)
    if spec is None:
        return None
    from .lora import lora_pass, qlora_pass, trainable
    from .passes import PassManager

    qlora = qlora_pass(loaded)
    res = PassManager([lora_pass(loaded)] + ([qlora] if qlora is not None else []), "training").run(graph)
    adapted = [n for n in res.graph.nodes if n.op in ("lora_linear", "lora_linear_q")]
    added = sum(res.graph.params[n.params[k]].numel for n in adapted for k in ("lora_A.weight", "lora_B.weight"))
    n_train = sum(res.graph.params[n].numel for n in trainable(loaded, res.graph))
    total = sum(p.numel for p in graph.params.values() if not p.buffer) + added
    names = ", ".join(n.name for n in adapted[:6]) + (" ..." if len(adapted) > 6 else "")
    q = f", base in {spec.qlora.format}" if spec.qlora is not None else ""
    return (f"finetune: LoRA r={spec.lora.r} on {len(adapted)} layers ({names}){q}: +{added:,} parameters; "
            f"{n_train:,} of {total:,} train ({100 * n_train / total:.2f}%)")


def training_graph(loaded, graph: Graph) -> Graph:
    """The graph train.py trains for a spec with `finetune:` (the LoRA/QLoRA passes run, no
    weights), with `frozen` naming the parameters it does not train (lbdlc/memory.py reads it:
    no gradients, no optimizer state); the graph itself otherwise."""
    spec = getattr(loaded.spec, "finetune", None)
    if spec is None:
        return graph
    from .lora import lora_pass, qlora_pass, trainable
    from .passes import PassManager

    qlora = qlora_pass(loaded)
    res = PassManager([lora_pass(loaded)] + ([qlora] if qlora is not None else []), "training").run(graph)
    train = set(trainable(loaded, res.graph))
    res.graph.frozen = sorted(n for n, p in res.graph.params.items() if not p.buffer and n not in train)
    return res.graph
