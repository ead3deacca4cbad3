"""LoRA adapters in PEFT's file layout.

`adapter_config.json` (peft_type LORA, r, lora_alpha, lora_dropout, target_modules, bias
"none", task_type, base_model_name_or_path, use_rslora) and `adapter_model.safetensors`
with keys `base_model.model.<module>.lora_A.weight` (r×in) / `.lora_B.weight` (out×r), where
<module> is the lbdlc layer name (or a PEFT model's module name mapped through `rename`).

`save_adapter` writes the adapters of a graph that went through the `lora` pass;
`load_adapter` reads them back as lbdlc parameter names, checked against the graph (errors
name the adapter key and the layer's spec line); `apply_adapter` wraps a base graph with
the adapter's targets and rank and fills in its tensors.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import Note, SpecError
from .ir import Graph

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


@dataclass
class AdapterConfig:
    r: int
    lora_alpha: float
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    use_rslora: bool = False
    task_type: str | None = None  # PEFT's task ("CAUSAL_LM" for a language model); None: a plain module
    base_model_name_or_path: str | None = None

    @property
    def scale(self) -> float:
        from lbdlc.passes.lora import lora_scale

        return lora_scale(self.r, self.lora_alpha, self.use_rslora)

    def to_json(self) -> dict:
        return {
            "peft_type": "LORA", "r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
            "target_modules": list(self.target_modules), "bias": "none", "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path, "use_rslora": self.use_rslora,
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {},
        }


def lora_nodes(graph: Graph) -> dict:
    return {n.name: n for n in graph.nodes if n.op in ("lora_linear", "lora_linear_q")}  # lora_linear_q: QLoRA


def save_adapter(graph: Graph, weights: dict, out_dir: str | Path, base_model: str | None = None,
                 task_type: str | None = None, alpha: float | None = None, rslora: bool = False,
                 rename: dict[str, str] | None = None) -> list[Path]:
    """Write the graph's LoRA adapters in PEFT's layout; returns the two paths. `rename` maps
    the spec's layer names to another model's module names (as for loading, the other way)."""
    from safetensors.torch import save_file

    nodes = lora_nodes(graph)
    if not nodes:
        raise SpecError("this model has no LoRA adapters to save", hint="run the `lora` pass (a `finetune:` section) first")
    ranks = {n.attrs.r for n in nodes.values()}
    scales = {n.attrs.scale for n in nodes.values()}
    dropouts = {n.attrs.dropout for n in nodes.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise SpecError("PEFT's adapter_config.json holds one rank and one alpha; these adapters differ")
    r, scale = ranks.pop(), scales.pop()
    if alpha is None:
        alpha = scale * (r ** 0.5 if rslora else r)
    modules = {name: _rename(name, rename) for name in nodes}
    cfg = AdapterConfig(r, alpha, dropouts.pop() if len(dropouts) == 1 else 0.0, tuple(sorted(modules.values())), rslora, task_type, base_model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name in sorted(nodes):
        for part in ("lora_A", "lora_B"):
            tensors[f"{PREFIX}{modules[name]}.{part}.weight"] = weights[f"{name}.{part}.weight"].detach().float().contiguous()
    (out_dir / CONFIG).write_text(json.dumps(cfg.to_json(), indent=2) + "\n", encoding="utf-8")
    save_file(tensors, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    return [out_dir / CONFIG, out_dir / WEIGHTS]


def read_config(adapter_dir: str | Path) -> AdapterConfig:
    path = Path(adapter_dir) / CONFIG
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"no {CONFIG} in {adapter_dir}", hint="a PEFT adapter directory holds adapter_config.json and adapter_model.safetensors")
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path} is not valid JSON: {exc}")
    if raw.get("peft_type") != "LORA":
        raise SpecError(f"{path}: peft_type is {raw.get('peft_type')!r}, lbdlc reads LORA adapters")
    if raw.get("bias", "none") != "none":
        raise SpecError(f"{path}: bias {raw['bias']!r} is not supported (adapters that train biases)", hint="train with bias=\"none\"")
    if raw.get("rank_pattern") or raw.get("alpha_pattern"):
        raise SpecError(f"{path}: per-module rank_pattern/alpha_pattern are not supported")
    tm = raw.get("target_modules") or ()
    return AdapterConfig(int(raw["r"]), float(raw["lora_alpha"]), float(raw.get("lora_dropout", 0.0)),
                         tuple([tm] if isinstance(tm, str) else tm), bool(raw.get("use_rslora", False)),
                         raw.get("task_type"), raw.get("base_model_name_or_path"))


def _rename(module: str, rename: dict[str, str | list[str]] | None) -> str | list[str]:
    """Apply a rename map: exact names first, else each `old: new` substring in order. An
    exact name may map to a list of layers: a fused projection (GPT-2's c_attn) whose rows
    are those layers' outputs in order."""
    if not rename:
        return module
    if module in rename:
        return rename[module]
    for old, new in rename.items():
        if isinstance(new, str):
            module = module.replace(old, new)
    return module


def read_tensors(adapter_dir: str | Path, rename: dict[str, str | list[str]] | None = None) -> dict[str, tuple[str, torch.Tensor]]:
    """lbdlc parameter name -> (adapter key, tensor)."""
    from safetensors.torch import load_file

    path = Path(adapter_dir) / WEIGHTS
    if not path.exists():
        raise SpecError(f"no {WEIGHTS} in {adapter_dir}")
    out = {}
    for key, t in load_file(str(path)).items():
        name = key.removeprefix(PREFIX)
        for part in ("lora_A", "lora_B"):
            for suffix in (f".{part}.weight", f".{part}.default.weight"):  # PEFT in memory names the adapter
                if name.endswith(suffix):
                    target = _rename(name[:-len(suffix)], rename)
                    for layer, piece in _unfused(key, target, part, t):
                        out[f"{layer}.{part}.weight"] = (key, piece)
                    break
            else:
                continue
            break
        else:
            raise SpecError(f"adapter key '{key}' is not a LoRA A/B matrix", hint="expected <module>.lora_A.weight / <module>.lora_B.weight")
    return out


def _unfused(key: str, target: str | list[str], part: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A fused projection's adapter as adapters of its parts: B·A restricted to the rows of
    part k is B[rows k]·A, so each part gets the same A and its slice of B (exact)."""
    if isinstance(target, str):
        return [(target, t)]
    if part == "lora_A":
        return [(layer, t) for layer in target]
    if t.shape[0] % len(target):
        raise SpecError(f"adapter key '{key}' has {t.shape[0]} output rows, which do not split into {len(target)} equal parts "
                        f"({', '.join(target)})", hint="map a fused projection only to layers of equal width")
    return list(zip(target, t.chunk(len(target), dim=0)))


def load_adapter(graph: Graph, adapter_dir: str | Path, rename: dict[str, str | list[str]] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the graph's parameter names, checked against its lora_linear nodes."""
    cfg = read_config(adapter_dir)
    tensors = read_tensors(adapter_dir, rename)
    nodes = lora_nodes(graph)
    layers = {n.name: n for n in graph.nodes}
    out = {}
    for name, (key, t) in sorted(tensors.items()):
        layer, part = name.rsplit(".", 2)[0], name.rsplit(".", 2)[1]
        node = nodes.get(layer)
        if node is None:
            where = layers.get(layer)
            if where is not None:
                raise SpecError(f"adapter key '{key}' targets layer '{layer}', a {where.op} layer without a LoRA adapter",
                                where.origin, hint="add it to finetune.lora.targets")
            raise SpecError(f"adapter key '{key}' targets '{layer}', which is not a layer of this model",
                            hint="pass a rename map from the adapter's module names to the spec's layer names")
        a = node.attrs
        want = (a.r, a.in_features) if part == "lora_A" else (a.out_features, a.r)
        if part == "lora_A" and t.shape[0] != cfg.r or part == "lora_B" and t.ndim == 2 and t.shape[1] != cfg.r:
            raise SpecError(f"adapter key '{key}' has rank {t.shape[0] if part == 'lora_A' else t.shape[1]} "
                            f"but adapter_config.json says r={cfg.r}", node.origin)
        if tuple(t.shape) != want:
            what = "rank" if (part == "lora_A" and t.shape[0] != a.r) or (part == "lora_B" and t.ndim == 2 and t.shape[1] != a.r) else "shape"
            raise SpecError(f"adapter key '{key}' has shape {list(t.shape)}, layer '{layer}' needs {list(want)} ({what} mismatch)",
                            node.origin, notes=[Note(f"'{layer}' is in_features={a.in_features}, out_features={a.out_features}, r={a.r}")])
        out[name] = t.float()
    missing = sorted(f"{n}.{p}.weight" for n in nodes for p in ("lora_A", "lora_B") if f"{n}.{p}.weight" not in out)
    if missing:
        raise SpecError(f"the adapter has no tensor for '{missing[0]}' (key '{PREFIX}{missing[0]}')",
                        nodes[missing[0].rsplit('.', 2)[0]].origin, hint="the adapter was trained with other targets")
    return out


def apply_adapter(graph: Graph, weights: dict, adapter_dir: str | Path, rename: dict[str, str | list[str]] | None = None):
    """Wrap a base graph with the adapter's targets, rank and scale, and load its tensors.
    Returns the pass manager's result (graph, weights, log); merge with `lora_merge`."""
    from lbdlc.passes import PassManager
    from lbdlc.passes.lora import LoRA

    cfg = read_config(adapter_dir)
    tensors = read_tensors(adapter_dir, rename)
    targets = sorted({name.rsplit(".", 2)[0] for name in tensors})
    from lbdlc.passes.decompose_attention import PROJECTIONS

    layers = {n.name: n for n in graph.nodes}
    for t in targets:
        owner, _, proj = t.rpartition(".")
        inside_attention = proj in PROJECTIONS and getattr(layers.get(owner), "op", None) == "attention"  # the lora pass writes it out
        if t not in layers and not inside_attention:
            key = tensors[f"{t}.lora_A.weight"][0] if f"{t}.lora_A.weight" in tensors else tensors[f"{t}.lora_B.weight"][0]
            raise SpecError(f"adapter key '{key}' targets '{t}', which is not a layer of this model",
                            hint="pass a rename map from the adapter's module names to the spec's layer names")
    lora = LoRA(targets=targets, r=cfg.r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, rslora=cfg.use_rslora)
    res = PassManager([lora], "training").run(graph, weights)
    res.weights.update(load_adapter(res.graph, adapter_dir, rename))
    return res


def merge_adapters(graph: Graph, weights: dict, adapters: list[tuple[str | Path, float]],
                   rename: dict[str, str] | None = None) -> tuple[dict, list[dict]]:
    """Several adapters folded into one model: W ← W + Σ_i λ_i · scale_i · B_i A_i for every
    layer an adapter targets (in float64, rounded once). Each adapter is checked against the
    graph as `apply_adapter` checks it (targets, rank, shapes; errors name the adapter key).
    The graph is unchanged (an attention projection's weight keeps its name); returns the new
    weights and, per adapter, what was merged."""
    deltas: dict[str, torch.Tensor] = {}
    report = []
    for adapter_dir, lam in adapters:
        res = apply_adapter(graph, weights, adapter_dir, rename)
        cfg = read_config(adapter_dir)
        layers = []
        for n in res.graph.nodes:
            if n.op != "lora_linear":
                continue
            A, B = res.weights[n.params["lora_A.weight"]].double(), res.weights[n.params["lora_B.weight"]].double()
            name = n.params["weight"]
            deltas[name] = deltas.get(name, 0) + lam * n.attrs.scale * (B @ A)
            layers.append(n.name)
        report.append({"adapter": str(adapter_dir), "weight": lam, "r": cfg.r, "alpha": cfg.lora_alpha,
                       "rslora": cfg.use_rslora, "layers": layers})
    out = dict(weights)
    for name, d in deltas.items():
        out[name] = (weights[name].double() + d).to(weights[name].dtype)
    return out, report
