"""The `quantize` pass: weight-only block quantization of linear layers (BOOK.md §4).

Each targeted `linear` node becomes a `linear_q` node (lbdlc/ops/quant.py) whose weight is
stored in blocks of 32 along each row: Q8_0, Q4_0 or Q4_1 (lbdlc/quant_formats.py gives the
llama.cpp byte layout; the graph keeps codes, scales and minimums as separate buffers, the
codes in ONNX Runtime MatMulNBits' nibble order). Which matrices: per-matrix rules by name
pattern (fnmatch on the layer name, e.g. `h.*.mlp.c_fc`), first match wins, a rule with
format None keeps the layer fp32; layers no rule matches get the default format. Layers
that cannot be block-quantized stay fp32: a row length not a multiple of 32, a weight tied
to another layer, or a non-float32 input. Token embeddings become `embedding_q` (the same
blocks along each row, gathered then dequantized); a bias-free linear layer tied to the table
(GPT-2's lm_head shares wte.weight) becomes a linear_q on the same buffers, stored once
(in the table's format; a rule keeping the head fp32 keeps the table fp32 too).
Attention layers whose projections are to be quantized are first written out as linear
layers (passes/decompose_attention.py), so `*.attn.v_proj` rules reach them.

Gap worked around here: passes/manager.py's DTYPE_BYTES has no uint8 entry (it sizes the
pass log), so this module adds one.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import torch

from lbdlc import ops
from lbdlc import quant_formats as qf
from lbdlc.errors import SpecError
from lbdlc.ir import Graph, Node, Param
from lbdlc.ops.quant import ZERO_POINT

from .manager import DTYPE_BYTES, Pass, PassContext, register

DTYPE_BYTES.setdefault("uint8", 1)

BITS = {"q8_0": 8, "q4_0": 4, "q4_1": 4}
ALIASES = {"q8_0": "q8_0", "q4_0": "q4_0", "q4_1": "q4_1", "int4": "q4_1", "8": "q8_0", "4": "q4_1", "none": None}


@dataclass
class Rule:
    match: str
    format: str | None  # None: keep fp32
    loc: object = None  # where the rule was written, for errors


def to_graph_layout(packed: np.ndarray, fmt: str) -> dict[str, np.ndarray]:
    """llama.cpp blocks -> the linear_q buffers: qweight (uint8 codes, Q8_0 offset by 128,
    4-bit codes two a byte, weight 2k low nibble, 2k + 1 high), scale and min (fp16)."""
    q = qf.codes(packed, fmt)
    d, m = qf.scales(packed, fmt)
    if fmt == "q8_0":
        qw = (q + ZERO_POINT[fmt]).astype(np.uint8)
    else:
        qw = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    out = {"qweight": qw, "scale": d.astype(np.float16)}
    if m is not None:
        out["min"] = m.astype(np.float16)
    return out


def dequantize(buffers: dict[str, np.ndarray], fmt: str) -> np.ndarray:
    """The fp32 weight a linear_q node computes with (numpy, for reports and tests)."""
    q = buffers["qweight"].astype(np.int64)
    if fmt != "q8_0":
        q = np.stack([q & 15, q >> 4], -1).reshape(q.shape[0], q.shape[1], 32)
    w = (q.astype(np.float32) - ZERO_POINT[fmt]) * buffers["scale"].astype(np.float32)[..., None]
    if "min" in buffers:
        w = w + buffers["min"].astype(np.float32)[..., None]
    return w.reshape(w.shape[0], -1)


def _pack_weight(weights: dict, w_name: str, new_params: dict[str, str], fmt: str) -> dict[str, float]:
    """Replace weight `w_name` in `weights` by its packed buffers (named `new_params`); the
    dequantized weight's error for the report."""
    w = weights.pop(w_name).detach().float().numpy()
    buffers = to_graph_layout(qf.pack(w, fmt), fmt)
    for local, arr in buffers.items():
        weights[new_params[local]] = torch.from_numpy(np.ascontiguousarray(arr))
    err = dequantize(buffers, fmt) - w
    return {"max_abs_error": float(np.abs(err).max()),
            "rel_rms_error": float(np.sqrt((err ** 2).mean() / max((w ** 2).mean(), 1e-30)))}


class Quantize(Pass):
    name = "quantize"
    description = "weight-only block quantization (Q8_0/Q4_0/Q4_1, blocks of 32) of linear layers, rules by name"
    inference_only = True
    changes_weights = True

    def __init__(self, default: str | None = "q4_1", rules: list[Rule] | None = None):
        self.default = default
        self.rules = list(rules or [])
        for r in self.rules + [Rule("<default>", default)]:
            if r.format is not None and r.format not in BITS:
                raise SpecError(f"unsupported quantization format '{r.format}' for rule '{r.match}'", r.loc,
                                hint=f"weight-only formats: {', '.join(BITS)} (or none to keep fp32)")
        self.report: list[dict] = []

    def format_for(self, name: str) -> tuple[str | None, int | None]:
        for k, r in enumerate(self.rules):
            if fnmatch.fnmatchcase(name, r.match):
                return r.format, k
        return self.default, None

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        self._decompose_attention(graph, ctx)
        uses: dict[str, int] = {}
        users: dict[str, list[Node]] = {}
        for n in graph.nodes:
            for full in n.params.values():
                uses[full] = uses.get(full, 0) + 1
                users.setdefault(full, []).append(n)
        matched: set[int] = set()
        self.report = []
        nodes = []
        tied: dict[int, Node] = {}  # id(linear node) -> its linear_q on a quantized embedding's table
        for n in list(graph.nodes):  # embeddings first: an LM head tied to a table may come before it
            if n.op == "embedding":
                fmt, k = self.format_for(n.name)
                if k is not None:
                    matched.add(k)
                tied[id(n)] = self._quantize_embedding(graph, n, fmt, users, tied, ctx) if fmt is not None else n
        for n in graph.nodes:
            if id(n) in tied:
                if n.op == "linear":  # a head on a quantized table: its rule counts as used
                    k = self.format_for(n.name)[1]
                    if k is not None:
                        matched.add(k)
                nodes.append(tied[id(n)])
                continue
            if n.op != "linear":
                nodes.append(n)
                continue
            fmt, k = self.format_for(n.name)
            if k is not None:
                matched.add(k)
            w_name = n.params["weight"]
            ok = (fmt is not None and n.attrs.in_features % qf.BLOCK == 0 and uses[w_name] == 1
                  and w_name == f"{n.name}.weight" and n.inputs[0].type.dtype == "float32")
            if not ok:
                nodes.append(n)
                continue
            nodes.append(self._quantize(graph, n, fmt, ctx))
        unused = [r for k, r in enumerate(self.rules) if k not in matched]
        if unused:
            names = sorted(n.name for n in graph.nodes if n.op == "linear")
            raise SpecError(f"quantization rule '{unused[0].match}' matches no linear layer or embedding", unused[0].loc,
                            hint=f"linear layers: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
        graph.nodes = nodes
        return graph

    def _decompose_attention(self, graph: Graph, ctx: PassContext) -> None:
        """Attention layers hold their q/k/v/out projections inside one node: write out those
        whose projections some rule (or the default) quantizes (passes/decompose_attention.py),
        so the projections become linear layers this pass reaches."""
        try:
            from .decompose_attention import PROJECTIONS, decompose_attention
        except ImportError:  # pragma: no cover - the pass ships with lbdlc
            return
        names = [n.name for n in graph.nodes if n.op == "attention"
                 and any(self.format_for(f"{n.name}.{p}")[0] is not None for p in PROJECTIONS)]
        if names:
            decompose_attention(graph, names)
            ctx.note("attention decomposed for quantization", len(names))

    def _quantize_embedding(self, graph: Graph, n: Node, fmt: str, users: dict, tied: dict, ctx: PassContext) -> Node:
        """embedding -> embedding_q; bias-free linear layers tied to its table (an LM head)
        become linear_q nodes that read the same packed buffers."""
        w_name = n.params["weight"]
        rows, cols = n.attrs.num_embeddings, n.attrs.embedding_dim
        others = [u for u in users.get(w_name, []) if u is not n]
        if (cols % qf.BLOCK or w_name != f"{n.name}.weight"
                or not all(u.op == "linear" and not u.attrs.bias and u.attrs.in_features == cols
                           and u.attrs.out_features == rows and u.inputs[0].type.dtype == "float32" for u in others)
                or any(self.format_for(u.name)[0] is None for u in others)):  # a head kept fp32 keeps its table fp32
            return n
        attrs = ops.get("embedding_q").Attrs(num_embeddings=rows, embedding_dim=cols, format=fmt)
        decl = ops.get("embedding_q").params(attrs, [v.type for v in n.inputs])
        new_params = {local: f"{n.name}.{local}" for local in decl}
        for local, d in decl.items():
            graph.params[new_params[local]] = Param.named(new_params[local], d)
        entry = {"layer": n.name, "format": fmt, "bits": BITS[fmt], "bytes_before": rows * cols * 4,
                 "bytes_after": sum(graph.params[f].numel * DTYPE_BYTES[graph.params[f].dtype] for f in new_params.values())}
        if others:
            entry["tied"] = [u.name for u in others]
        if ctx.weights is not None:
            entry.update(_pack_weight(ctx.weights, w_name, new_params, fmt))
        del graph.params[w_name]
        for u in others:
            la = ops.get("linear_q").Attrs(out_features=rows, in_features=cols, bias=False, format=fmt)
            tied[id(u)] = Node("linear_q", u.name, list(u.inputs), list(u.outputs), la, dict(new_params), u.origin)
        self.report.append(entry)
        ctx.note(f"embedding quantized to {fmt}")
        return Node("embedding_q", n.name, list(n.inputs), list(n.outputs), attrs, new_params, n.origin)

    def _quantize(self, graph: Graph, n: Node, fmt: str, ctx: PassContext) -> Node:
        attrs = ops.get("linear_q").Attrs(out_features=n.attrs.out_features, in_features=n.attrs.in_features,
                                          bias=n.attrs.bias, format=fmt)
        decl = ops.get("linear_q").params(attrs, [v.type for v in n.inputs])
        w_name = n.params["weight"]
        new_params = {}
        for local, d in decl.items():
            full = n.params["bias"] if local == "bias" else f"{n.name}.{local}"
            new_params[local] = full
            if local != "bias":
                graph.params[full] = Param.named(full, d)
        rows, cols = n.attrs.out_features, n.attrs.in_features
        entry = {"layer": n.name, "format": fmt, "bits": BITS[fmt], "bytes_before": rows * cols * 4,
                 "bytes_after": sum(graph.params[new_params[k]].numel * DTYPE_BYTES[graph.params[new_params[k]].dtype]
                                    for k in decl if k != "bias")}
        if ctx.weights is not None:
            entry.update(_pack_weight(ctx.weights, w_name, new_params, fmt))
        del graph.params[w_name]
        self.report.append(entry)
        ctx.note(f"linear quantized to {fmt}")
        return Node("linear_q", n.name, list(n.inputs), list(n.outputs), attrs, new_params, n.origin)


register(Quantize)


def from_spec(spec, raw=None) -> Quantize:
    """The pass a spec's `quantize:` section asks for (rules located at their `match`)."""
    from lbdlc.source import loc_of

    rules = [Rule(r.match, spec.rule_format(r), loc_of(raw, ("quantize", "rules", k, "match")) if raw is not None else None)
             for k, r in enumerate(spec.rules)]
    return Quantize(spec.resolve(spec.default), rules)


CHOICES = ("int8", "int8-dynamic", "int8-static", "q8_0", "q4_0", "q4_1", "int4", "none")


def effective_spec(loaded, choice: str | None):
    """The spec's `quantize:` section with `-q` applied (None: no quantization asked for).
    `-q int8` is ONNX Runtime's int8 (the spec's method if it names dynamic or static, else
    dynamic); `-q q8_0` is the weight-only 8-bit block format."""
    from lbdlc.quant_spec import INT8_METHODS, QuantizeSpec

    spec = getattr(loaded.spec, "quantize", None)
    if choice is None:
        return spec
    if choice not in CHOICES:
        raise SpecError(f"unknown quantization '{choice}'", hint="-q takes int8 (int8-dynamic, int8-static), q8_0, q4_0, q4_1 "
                        "or none; weight-only 8-bit blocks (what -q int8 meant before) are q8_0")
    base = spec or QuantizeSpec()
    if choice.startswith("int8"):
        method = choice.split("-", 1)[1] if "-" in choice else (base.method if base.method in INT8_METHODS else "dynamic")
        return base.model_copy(update={"default": "int8", "method": method})
    return base.model_copy(update={"default": choice, "method": "weight_only"})


def for_build(loaded, graph: Graph, weights: dict, choice: str | None = None):
    """What `lbdlc build` quantizes: the spec's `quantize:` section, its default replaced by
    `-q` when given (`-q` alone quantizes every linear layer it can). Returns None when
    nothing asks for quantization, else (graph, weights, pass log, per-matrix report)."""
    spec = effective_spec(loaded, choice)
    if spec is None:
        return None
    q = from_spec(spec, loaded.raw)
    from .manager import PassManager

    if spec.int8_method:  # int8 is ONNX Runtime's quantizer on the ONNX file (lbdlc/quant_int8.py);
        # the IR pass runs only for rules asking for a block format (mixed precision), and
        # attention layers a rule names a projection of are written out, so that ONNX Runtime
        # can leave out (or int8-quantize) that projection alone
        from .decompose_attention import PROJECTIONS, DecomposeAttention

        named = [n.name for n in graph.nodes if n.op == "attention"
                 and any(fnmatch.fnmatchcase(f"{n.name}.{p}", r.match) for p in PROJECTIONS for r in q.rules)]
        q.rules = [r for r in q.rules if r.format is not None]
        passes = ([DecomposeAttention(named)] if named else []) + ([q] if q.rules else [])
        if not passes:
            return None
        result = PassManager(passes, "inference").run(graph, weights)
        return result.graph, result.weights, result.log, list(q.report)
    result = PassManager([q], "inference").run(graph, weights)
    return result.graph, result.weights, result.log, list(q.report)
