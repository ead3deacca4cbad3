"""Attention written out as its parts, so its projections are ordinary `linear` layers.

The `attention` op (lbdlc/ops/attention.py) holds its q/k/v/out projections inside one node,
so passes that work on linear layers (LoRA adapters, weight quantization) cannot reach them.
`decompose_attention(graph, names=None)` rewrites each `attention` node `<L>` (all of them,
or those named) into:

    <L>.q_proj   linear  query   -> [b, s, d]        (parameters <L>.q_proj.weight/.bias, as before)
    <L>.k_proj   linear  context -> [b, s_kv, d]     (query itself in self-attention)
    <L>.v_proj   linear  context -> [b, s_kv, d]
    <L>.q_heads  reshape [b, s, h, d/h], then <L>.q_heads_t permute (0, 2, 1, 3); k, v alike
    <L>.sdpa     scaled_dot_product_attention (scale 1/√(d/h), causal, dropout as the node's)
    <L>.merge_t  permute (0, 2, 1, 3), then <L>.merge flatten(2): [b, s, d]
    <L>.out_proj linear, whose output is the attention node's output value

Parameter names are unchanged (the linear nodes are named after the projections), so weights
files, `--weights`, adapters and quantization rules read the same names; the outputs equal the
undecomposed node's (the generated MultiHeadAttention computes exactly this sequence).
`compose_attention(graph)` recognizes that sequence and gives back `attention` nodes (the
`lora_merge` pass uses it so a merged model has the base model's ops).
"""
from __future__ import annotations

import sympy

from lbdlc import ops
from lbdlc.errors import SpecError
from lbdlc.ir import Graph, Node, TensorType, Value

from .manager import Pass, PassContext, register

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _reshape_shape(dims, node: Node) -> list:
    """reshape's `shape` attribute for leading dims that stay as they are: sizes, symbol
    names, and one -1 for a dim that is neither (an expression such as seq + 1)."""
    out = []
    for d in dims:
        if isinstance(d, int):
            out.append(d)
        elif isinstance(d, sympy.Symbol):
            out.append(str(d))
        else:
            out.append(-1)
    if out.count(-1) > 1:
        raise SpecError(f"attention layer '{node.name}' cannot be written out: its input's batch and sequence dims "
                        f"({', '.join(map(str, dims))}) are both expressions, and a head split can infer only one",
                        node.origin, hint="give one of them a plain name or size, or leave this layer out of the LoRA/quantization targets")
    return out


def _node(op: str, name: str, inputs: list[Value], origin, params=None, **attrs) -> Node:
    o = ops.get(op)
    a = o.Attrs(**attrs)
    out = o.infer(a, [v.type for v in inputs])[0]
    return Node(op, name, list(inputs), [Value(name, out)], a, params or {}, origin)


def decompose_node(n: Node) -> list[Node]:
    """The nodes that compute attention node `n`; the last one writes n's output value."""
    a, L = n.attrs, n.name
    query, context = n.inputs[0], n.inputs[-1]
    dim, heads = a.embed_dim, a.heads
    nodes: list[Node] = []

    def linear(proj: str, src: Value, bias: bool) -> Node:
        params = {"weight": n.params[f"{proj}.weight"]}
        if bias:
            params["bias"] = n.params[f"{proj}.bias"]
        node = _node("linear", f"{L}.{proj}", [src], n.origin, params, in_features=dim, out_features=dim, bias=bias)
        nodes.append(node)
        return node

    def heads_of(proj: Node, what: str) -> Value:
        b, s = proj.outputs[0].type.shape[:2]
        split = _node("reshape", f"{L}.{what}_heads", proj.outputs, n.origin, shape=_reshape_shape([b, s], n) + [heads, dim // heads])
        turn = _node("permute", f"{L}.{what}_heads_t", split.outputs, n.origin, dims=[0, 2, 1, 3])
        nodes.extend([split, turn])
        return turn.outputs[0]

    key_bias = a.bias if a.key_bias is None else a.key_bias
    q = heads_of(linear("q_proj", query, a.bias), "q")
    k = heads_of(linear("k_proj", context, key_bias), "k")
    v = heads_of(linear("v_proj", context, a.bias), "v")
    sdpa = _node("scaled_dot_product_attention", f"{L}.sdpa", [q, k, v], n.origin, causal=a.causal, dropout=a.dropout)
    back = _node("permute", f"{L}.merge_t", sdpa.outputs, n.origin, dims=[0, 2, 1, 3])
    merged = _node("flatten", f"{L}.merge", back.outputs, n.origin, start_dim=2, end_dim=-1)
    nodes += [sdpa, back, merged]
    out = linear("out_proj", merged.outputs[0], a.bias)
    out.outputs = list(n.outputs)  # readers of the attention node, and graph outputs, keep their value
    return nodes


def decompose_attention(graph: Graph, names=None) -> Graph:
    """Rewrite the `attention` nodes of `graph` (those in `names`, or all) in place into
    projections, head split, scaled_dot_product_attention, head merge and out_proj; returns
    the graph. Parameters (names, shapes, values) are untouched."""
    wanted = None if names is None else set(names)
    nodes = []
    for n in graph.nodes:
        if n.op == "attention" and (wanted is None or n.name in wanted):
            nodes += decompose_node(n)
        else:
            nodes.append(n)
    if wanted is not None:
        missing = wanted - {n.name for n in graph.nodes if n.op == "attention"}
        if missing:
            raise SpecError(f"'{sorted(missing)[0]}' is not an attention layer of {graph.name}")
    graph.nodes = nodes
    return graph


def _match(graph: Graph, L: str, by_name: dict[str, Node], users) -> tuple[list[Node], Node] | None:
    """The decomposed nodes of attention `L` and the attention node that replaces them, or None
    when the sequence under those names is not exactly what decompose_node writes."""
    want = [f"{L}.{x}" for x in ("q_proj", "q_heads", "q_heads_t", "k_proj", "k_heads", "k_heads_t",
                                 "v_proj", "v_heads", "v_heads_t", "sdpa", "merge_t", "merge", "out_proj")]
    parts = [by_name.get(x) for x in want]
    if any(p is None for p in parts):
        return None
    q, qh, qt, k, kh, kt, v, vh, vt, sdpa, mt, mg, out = parts
    if any(p.op != "linear" for p in (q, k, v, out)) or sdpa.op != "scaled_dot_product_attention":
        return None
    if k.inputs[0] is not v.inputs[0]:
        return None
    chain = [(q, qh, qt), (k, kh, kt), (v, vh, vt)]
    for proj, split, turn in chain:
        if split.op != "reshape" or split.inputs[0] is not proj.outputs[0] or turn.op != "permute" or turn.inputs[0] is not split.outputs[0]:
            return None
    if [x.outputs[0] for x in (qt, kt, vt)] != sdpa.inputs or mt.inputs[0] is not sdpa.outputs[0] or mg.inputs[0] is not mt.outputs[0] \
            or out.inputs[0] is not mg.outputs[0] or sdpa.attrs.scale is not None:
        return None
    inner = [q, qh, qt, k, kh, kt, v, vh, vt, sdpa, mt, mg]
    if any(len(users.get(id(x.outputs[0]), [])) != 1 or x.outputs[0] in graph.outputs for x in inner):
        return None
    dim, heads = q.attrs.out_features, qh.attrs.shape[2]
    if any(list(split.attrs.shape[2:]) != [heads, dim // heads] or list(turn.attrs.dims) != [0, 2, 1, 3] for _, split, turn in chain) \
            or mt.op != "permute" or list(mt.attrs.dims) != [0, 2, 1, 3] or mg.op != "flatten" or (mg.attrs.start_dim, mg.attrs.end_dim) != (2, -1):
        return None
    bias = q.attrs.bias
    if v.attrs.bias != bias or out.attrs.bias != bias or any(p.attrs.in_features != dim or p.attrs.out_features != dim for p in (q, k, v, out)):
        return None
    params = {f"{proj}.{local}": full for proj, node in zip(PROJECTIONS, (q, k, v, out)) for local, full in node.params.items()}
    inputs = [q.inputs[0]] if k.inputs[0] is q.inputs[0] else [q.inputs[0], k.inputs[0]]
    attrs = ops.get("attention").Attrs(heads=heads, embed_dim=dim, causal=sdpa.attrs.causal, bias=bias, dropout=sdpa.attrs.dropout,
                                       key_bias=None if k.attrs.bias == bias else k.attrs.bias)
    return inner + [out], Node("attention", L, inputs, list(out.outputs), attrs, params, out.origin)


def compose_attention(graph: Graph) -> Graph:
    """The inverse of decompose_attention: every sequence it wrote (still plain linear
    projections) becomes one `attention` node again; anything else stays as it is."""
    by_name = {n.name: n for n in graph.nodes}
    users = graph.users()
    replace: dict[int, Node | None] = {}
    for n in graph.nodes:
        if n.op == "scaled_dot_product_attention" and n.name.endswith(".sdpa"):
            found = _match(graph, n.name[: -len(".sdpa")], by_name, users)
            if found is not None:
                parts, node = found
                for p in parts[:-1]:
                    replace[id(p)] = None
                replace[id(parts[-1])] = node
    graph.nodes = [replace.get(id(n), n) for n in graph.nodes if replace.get(id(n), n) is not None]
    return graph


class DecomposeAttention(Pass):
    name = "decompose_attention"
    description = "attention -> q/k/v linear layers, head split, scaled_dot_product_attention, head merge, out_proj (same parameter names)"

    def __init__(self, names=None):
        self.names = names

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        before = sum(n.op == "attention" for n in graph.nodes)
        graph = decompose_attention(graph, self.names)
        done = before - sum(n.op == "attention" for n in graph.nodes)
        if done:
            ctx.note("attention decomposed", done)
        return graph


class ComposeAttention(Pass):
    name = "compose_attention"
    description = "decomposed attention (decompose_attention's sequence, plain linear projections) -> one attention node"

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        before = sum(n.op == "attention" for n in graph.nodes)
        graph = compose_attention(graph)
        done = sum(n.op == "attention" for n in graph.nodes) - before
        if done:
            ctx.note("attention recomposed", done)
        return graph


register(DecomposeAttention)
register(ComposeAttention)
