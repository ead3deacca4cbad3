"""The `lora` and `lora_merge` passes (BOOK: fine-tuning with low-rank adapters).

`lora` turns each targeted `linear` node (fnmatch on the layer name) into a `lora_linear`
node (lbdlc/ops/lora.py) that keeps the layer's `weight` and `bias` and adds `lora_A.weight`
(r×in, PEFT's Kaiming-uniform) and `lora_B.weight` (out×r, zeros), so the outputs are the base
model's until B is trained. Scale α/r, or α/√r with rsLoRA. Layers whose weight is shared
with another layer (GPT-2's lm_head, tied to wte) are not adapted. An `attention` layer `<L>`
whose projection a target names (`*.attn.q_proj`) is first written out by
passes/decompose_attention.py, so `<L>.q_proj` etc. become linear layers with the same
parameter names.

`lora_merge` folds every adapter back into its base weight, W ← W + scale·B·A (in float64,
rounded once), and gives back plain `linear` nodes (and `attention` nodes where `lora` wrote
them out): the merged graph has the base model's parameters and ops exactly.

The registered instances use the defaults (all untied linear layers, r 8, α 16); a spec's
`finetune:` section or a caller configures its own instance: `PassManager([LoRA(...)])`.
"""
from __future__ import annotations

import fnmatch
import math

import torch

from lbdlc import ops
from lbdlc.errors import SpecError
from lbdlc.ir import Graph, Node, Param

from .manager import Pass, PassContext, register

DEFAULT_TARGETS = ("*",)


def lora_scale(r: int, alpha: float, rslora: bool = False) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def adaptable(graph: Graph) -> list[Node]:
    """The linear nodes a LoRA adapter can wrap: their weight is their own (not tied)."""
    uses: dict[str, int] = {}
    for n in graph.nodes:
        for full in n.params.values():
            uses[full] = uses.get(full, 0) + 1
    return [n for n in graph.nodes
            if n.op == "linear" and n.params["weight"] == f"{n.name}.weight" and uses[n.params["weight"]] == 1]


class LoRA(Pass):
    name = "lora"
    description = "wrap linear layers in low-rank adapters (lora_linear: frozen W, trainable A, B = 0; exact at step 0)"
    inference_only = False
    changes_weights = True

    def __init__(self, targets=DEFAULT_TARGETS, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 rslora: bool = False, seed: int = 0, target_locs=None, r_loc=None):
        if r < 1:
            raise SpecError(f"LoRA rank r must be at least 1, got {r}", r_loc, hint="typical ranks are 4 to 64")
        if not 0 <= dropout < 1:
            raise SpecError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.targets = list(targets)
        self.target_locs = list(target_locs or [None] * len(self.targets))
        self.r, self.alpha, self.dropout, self.rslora, self.seed = r, alpha, dropout, rslora, seed
        self.adapted: list[str] = []

    @property
    def scale(self) -> float:
        return lora_scale(self.r, self.alpha, self.rslora)

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        from lbdlc.weights import init_param

        from .decompose_attention import PROJECTIONS, decompose_attention

        # attention layers whose projections a target names are written out as linear layers first
        split = [n.name for n in graph.nodes if n.op == "attention"
                 and any(fnmatch.fnmatchcase(f"{n.name}.{proj}", p) for proj in PROJECTIONS for p in self.targets)]
        if split:
            graph = decompose_attention(graph, split)
            ctx.note("attention decomposed for its projections", len(split))
        candidates = {id(n) for n in adaptable(graph)}
        names = sorted(n.name for n in graph.nodes if id(n) in candidates)
        for pattern, loc in zip(self.targets, self.target_locs):
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                inside = [f"{n.name}.{k.rsplit('.', 1)[0]}" for n in graph.nodes if n.op != "linear" for k in n.params
                          if fnmatch.fnmatchcase(f"{n.name}.{k.rsplit('.', 1)[0]}", pattern)]
                hint = (f"'{inside[0]}' is part of a {next(n.op for n in graph.nodes if inside[0].startswith(n.name + '.'))} "
                        "layer, not a linear layer; LoRA wraps linear layers") if inside else \
                    f"linear layers: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
                raise SpecError(f"LoRA target '{pattern}' matches no linear layer", loc, hint=hint)
        self.adapted = []
        nodes = []
        for n in graph.nodes:
            if id(n) not in candidates or not any(fnmatch.fnmatchcase(n.name, p) for p in self.targets):
                nodes.append(n)
                continue
            a = n.attrs
            attrs = ops.get("lora_linear").Attrs(out_features=a.out_features, in_features=a.in_features, bias=a.bias,
                                                 r=self.r, scale=self.scale, dropout=self.dropout)
            decl = ops.get("lora_linear").params(attrs, [v.type for v in n.inputs])
            params = dict(n.params)
            for local in ("lora_A.weight", "lora_B.weight"):
                full = f"{n.name}.{local}"
                params[local] = full
                graph.params[full] = Param.named(full, decl[local])
                if ctx.weights is not None:
                    ctx.weights[full] = init_param(graph.params[full], self.seed)
            nodes.append(Node("lora_linear", n.name, list(n.inputs), list(n.outputs), attrs, params, n.origin))
            self.adapted.append(n.name)
            ctx.note("linear wrapped in a LoRA adapter")
        graph.nodes = nodes
        return graph


class LoRAMerge(Pass):
    name = "lora_merge"
    description = "fold LoRA adapters into their linear layers: W ← W + scale·B·A (the base model's shape and ops)"
    inference_only = True
    changes_weights = True

    def __init__(self, requantize: bool = True):
        self.requantize = requantize  # QLoRA (lora_linear_q): requantize W̄ + scale·BA, or keep it fp32
        self.report: list[dict] = []

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        nodes = []
        self.report = []
        for n in graph.nodes:
            if n.op == "lora_linear_q":
                nodes.append(self._merge_quantized(graph, n, ctx))
                continue
            if n.op != "lora_linear":
                nodes.append(n)
                continue
            a = n.attrs
            attrs = ops.get("linear").Attrs(out_features=a.out_features, in_features=a.in_features, bias=a.bias)
            A, B = n.params["lora_A.weight"], n.params["lora_B.weight"]
            if ctx.weights is not None:
                w = ctx.weights[n.params["weight"]]
                delta = ctx.weights.pop(B).double() @ ctx.weights.pop(A).double()
                ctx.weights[n.params["weight"]] = (w.double() + a.scale * delta).to(w.dtype)
            del graph.params[A], graph.params[B]
            params = {k: v for k, v in n.params.items() if k in ("weight", "bias")}
            nodes.append(Node("linear", n.name, list(n.inputs), list(n.outputs), attrs, params, n.origin))
            ctx.note("LoRA adapter merged into linear")
        graph.nodes = nodes
        from .decompose_attention import compose_attention  # attention the lora pass wrote out: one node again

        before = sum(n.op == "attention" for n in graph.nodes)
        graph = compose_attention(graph)
        if sum(n.op == "attention" for n in graph.nodes) > before:
            ctx.note("attention recomposed", sum(n.op == "attention" for n in graph.nodes) - before)
        return graph

    def _merge_quantized(self, graph: Graph, n: Node, ctx: PassContext) -> Node:
        """QLoRA: W = dequantize(base) + scale·B·A (float64), then requantized in the base's
        format (a linear_q: the quantized base model's shape) or kept fp32 (a linear)."""
        from .quantize import dequantize, to_graph_layout

        a = n.attrs
        fmt = a.format
        quant_locals = [k for k in n.params if k not in ("bias", "lora_A.weight", "lora_B.weight")]
        params = {"bias": n.params["bias"]} if "bias" in n.params else {}
        entry = {"layer": n.name, "format": fmt, "merged_to": fmt if self.requantize else "float32"}
        if self.requantize:
            attrs = ops.get("linear_q").Attrs(out_features=a.out_features, in_features=a.in_features, bias=a.bias, format=fmt)
            params.update({k: n.params[k] for k in quant_locals})
        else:
            attrs = ops.get("linear").Attrs(out_features=a.out_features, in_features=a.in_features, bias=a.bias)
            w_name = f"{n.name}.weight"
            params["weight"] = w_name
            graph.params[w_name] = Param.named(w_name, ops.get("linear").params(attrs, [v.type for v in n.inputs])["weight"])
        if ctx.weights is not None:
            import numpy as np

            buffers = {k: ctx.weights[n.params[k]].numpy() for k in quant_locals}
            delta = ctx.weights.pop(n.params["lora_B.weight"]).double() @ ctx.weights.pop(n.params["lora_A.weight"]).double()
            w = torch.from_numpy(dequantize(buffers, fmt)).double() + a.scale * delta
            if self.requantize:
                import lbdlc.quant_formats as qf

                packed = to_graph_layout(qf.pack(w.float().numpy(), fmt), fmt)
                for k in quant_locals:
                    ctx.weights[n.params[k]] = torch.from_numpy(np.ascontiguousarray(packed[k]))
                err = dequantize(packed, fmt) - w.float().numpy()
                entry["requantization_max_abs_error"] = float(np.abs(err).max())
            else:
                for k in quant_locals:
                    ctx.weights.pop(n.params[k])
                ctx.weights[params["weight"]] = w.float()
        del graph.params[n.params["lora_A.weight"]], graph.params[n.params["lora_B.weight"]]
        if not self.requantize:
            for k in quant_locals:
                del graph.params[n.params[k]]
        self.report.append(entry)
        ctx.note(f"QLoRA adapter merged, {'requantized to ' + fmt if self.requantize else 'kept float32'}")
        return Node(attrs_op(attrs), n.name, list(n.inputs), list(n.outputs), attrs, params, n.origin)


def attrs_op(attrs) -> str:
    return "linear_q" if isinstance(attrs, ops.get("linear_q").Attrs) else "linear"


class QLoRA(Pass):
    name = "qlora"
    description = "QLoRA: quantize the frozen base of each lora_linear (Q4_0/Q4_1/Q8_0, blocks of 32) -> lora_linear_q; adapters stay fp32"
    inference_only = False
    changes_weights = True

    def __init__(self, format: str = "q4_1", loc=None):
        from .quantize import BITS

        if format not in BITS:
            raise SpecError(f"unsupported QLoRA base format '{format}'", loc, hint=f"weight-only formats: {', '.join(BITS)}")
        self.format = format
        self.report: list[dict] = []

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        import numpy as np

        import lbdlc.quant_formats as qf

        from .quantize import dequantize, to_graph_layout

        nodes = []
        self.report = []
        for n in graph.nodes:
            a = n.attrs
            if n.op != "lora_linear" or a.in_features % qf.BLOCK:
                if n.op == "lora_linear":
                    self.report.append({"layer": n.name, "format": None, "why": f"in_features {a.in_features} is not a multiple of {qf.BLOCK}"})
                nodes.append(n)
                continue
            op = ops.get("lora_linear_q")
            attrs = op.Attrs(out_features=a.out_features, in_features=a.in_features, bias=a.bias, format=self.format,
                             r=a.r, scale=a.scale, dropout=a.dropout)
            decl = op.params(attrs, [v.type for v in n.inputs])
            params = {k: v for k, v in n.params.items() if k != "weight"}
            for local in decl:
                if local not in params:
                    params[local] = f"{n.name}.{local}"
                    graph.params[params[local]] = Param.named(params[local], decl[local])
            entry = {"layer": n.name, "format": self.format}
            if ctx.weights is not None:
                w = ctx.weights.pop(n.params["weight"]).detach().float().numpy()
                buffers = to_graph_layout(qf.pack(w, self.format), self.format)
                for local, arr in buffers.items():
                    ctx.weights[params[local]] = torch.from_numpy(np.ascontiguousarray(arr))
                entry["max_abs_error"] = float(np.abs(dequantize(buffers, self.format) - w).max())
            del graph.params[n.params["weight"]]
            nodes.append(Node("lora_linear_q", n.name, list(n.inputs), list(n.outputs), attrs, params, n.origin))
            self.report.append(entry)
            ctx.note(f"LoRA base quantized to {self.format}")
        graph.nodes = nodes
        return graph


def merge_adapter_weights(weights: dict[str, torch.Tensor], scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """Weights-only merge (no graph): for each `<layer>` in scales, fold `<layer>.lora_A/B.weight`
    into `<layer>.weight`; returns a new dict without the adapter tensors."""
    out = dict(weights)
    for layer, s in scales.items():
        A, B = out.pop(f"{layer}.lora_A.weight"), out.pop(f"{layer}.lora_B.weight")
        w = out[f"{layer}.weight"]
        out[f"{layer}.weight"] = (w.double() + s * (B.double() @ A.double())).to(w.dtype)
    return out


register(LoRA)
register(LoRAMerge)
register(QLoRA)
