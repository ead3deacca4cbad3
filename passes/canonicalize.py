"""Canonicalisation: dead code, duplicates, identities, dropout at inference, constant folding."""
from __future__ import annotations

from lbdlc import ops
from lbdlc.ir import Graph, Node, Param, Value, dim_eq

from .manager import Pass, PassContext, register
from .pattern import P, Rewrite, prune_params, rewrite

# Ops whose result is random while training: never merged as duplicates there.
RANDOM_IN_TRAINING = {"dropout", "reparameterize"}


def same_type(a: Value, b: Value) -> bool:
    return a.type.dtype == b.type.dtype and a.type.rank == b.type.rank and all(
        dim_eq(x, y) for x, y in zip(a.type.shape, b.type.shape))


def bypass(graph: Graph, node: Node, value: Value) -> bool:
    """Remove a one-output node whose output equals `value`: its readers read `value`. A node
    producing a graph output stays (the output keeps its name); returns whether it went."""
    old = node.outputs[0]
    if any(v is old for v in graph.outputs):
        return False
    for n in graph.nodes:
        if any(v is old for v in n.inputs):
            n.inputs = [value if v is old else v for v in n.inputs]
    graph.nodes = [n for n in graph.nodes if n is not node]
    return True


@register
class EliminateDeadCode(Pass):
    name = "eliminate_dead_code"
    description = "Remove layers whose outputs reach no graph output, and their parameters."

    def run(self, graph, ctx):
        live = {id(v) for v in graph.outputs}
        kept = []
        for n in reversed(graph.nodes):
            if any(id(v) in live for v in n.outputs):
                kept.append(n)
                live.update(id(v) for v in n.inputs)
            else:
                ctx.note(f"dead {n.op} removed")
        graph.nodes = kept[::-1]
        prune_params(graph, ctx)
        return graph


@register
class EliminateCommonSubexpressions(Pass):
    name = "eliminate_common_subexpressions"
    description = "Compute once what several layers compute alike (same op, attributes, inputs and parameters)."

    def run(self, graph, ctx):
        seen: dict[tuple, Node] = {}
        for n in list(graph.nodes):
            if ctx.mode == "training" and (n.op in RANDOM_IN_TRAINING or getattr(n.attrs, "dropout", 0)):
                continue
            key = (n.op, type(n.attrs).__name__, n.attrs.model_dump_json(), tuple(id(v) for v in n.inputs),
                   tuple(sorted(n.params.items())))
            first = seen.get(key)
            if first is None:
                seen[key] = n
                continue
            if any(v is o for v in n.outputs for o in graph.outputs):
                continue  # a graph output keeps its own name
            for old, new in zip(n.outputs, first.outputs):
                for m in graph.nodes:
                    if any(v is old for v in m.inputs):
                        m.inputs = [new if v is old else v for v in m.inputs]
            graph.nodes = [m for m in graph.nodes if m is not n]
            ctx.note(f"duplicate {n.op} merged")
        prune_params(graph, ctx)
        return graph


def _perm(node: Node) -> list[int]:
    rank = node.inputs[0].type.rank
    if node.op == "transpose":
        from lbdlc.ops.sequence import permutation

        return permutation(node.attrs, rank)
    return [d % rank for d in node.attrs.dims]


def _is_identity(node: Node) -> bool:
    """A layer that passes its input through unchanged, whatever the weights."""
    if node.op in ("transpose", "permute"):
        return _perm(node) == list(range(node.inputs[0].type.rank))
    if node.op in ("reshape", "flatten"):
        return same_type(node.inputs[0], node.outputs[0])
    if node.op == "slice":
        a = node.attrs
        return a.step == 1 and (a.start or 0) == 0 and a.end is None
    if node.op == "mean":  # over dims of size 1, kept
        shape = node.inputs[0].type.shape
        return node.attrs.keepdim and all(shape[d % len(shape)] == 1 for d in node.attrs.dims)
    if node.op == "dropout":
        return node.attrs.p == 0.0
    return False


def _permute_node(second: Node, x: Value, perm: list[int]) -> Node:
    attrs = ops.get("permute").Attrs(dims=perm)
    return Node("permute", second.name, [x], list(second.outputs), attrs, {}, second.origin)


def _reshape_node(second: Node, x: Value) -> Node:
    return Node("reshape", second.name, [x], list(second.outputs), second.attrs, {}, second.origin)


PERMUTES = ("transpose", "permute")
RESHAPES = ("reshape", "flatten")

# x -> permute/transpose -> permute/transpose: one permute (or nothing, when they cancel,
# which the identity sweep then removes); reshape/flatten -> reshape: one reshape.
_CHAINS = [
    Rewrite(P(PERMUTES, P(PERMUTES, "x", name="first"), name="second"),
            lambda m: [_permute_node(m.root, m.value("x"), [_perm(m["first"])[i] for i in _perm(m.root)])],
            "transpose/permute pair merged"),
    Rewrite(P("reshape", P(RESHAPES, "x", name="first"), name="second"),
            lambda m: [_reshape_node(m.root, m.value("x"))],
            "reshape chain merged"),
]


@register
class RemoveIdentities(Pass):
    name = "remove_identities"
    description = ("Remove layers that change nothing (reshape/flatten to the same shape, identity or cancelling "
                   "transposes and permutes, full slices, dropout with p=0) and merge reshape and permute chains.")

    def run(self, graph, ctx):
        graph = rewrite(graph, _CHAINS, ctx)
        for n in list(graph.nodes):
            if _is_identity(n) and bypass(graph, n, n.inputs[0]):
                ctx.note(f"identity {n.op} removed")
        return graph


@register
class RemoveDropout(Pass):
    name = "remove_dropout"
    description = "Inference: remove dropout (the identity there) and take the VAE latent's mean (reparameterize -> mu)."
    inference_only = True

    def run(self, graph, ctx):
        for n in list(graph.nodes):
            if n.op in ("dropout", "reparameterize") and bypass(graph, n, n.inputs[0]):
                ctx.note(f"{n.op} removed")
        # What read only the VAE's log-variance is dead now.
        return EliminateDeadCode().run(graph, ctx)


@register
class FoldConstants(Pass):
    name = "fold_constants"
    description = ("Inference: compute at build time what depends on weights alone "
                   "(a learned scale stored as its logarithm becomes the scale itself).")
    inference_only = True
    changes_weights = True

    def run(self, graph, ctx):
        uses: dict[str, int] = {}
        for n in graph.nodes:
            for full in n.params.values():
                uses[full] = uses.get(full, 0) + 1
        for n in graph.nodes:
            if n.op == "learned_scale" and n.attrs.log and uses[n.params["weight"]] == 1:
                full = n.params["weight"]
                n.attrs = n.attrs.model_copy(update={"log": False})
                decl = ops.get(n.op).params(n.attrs, [v.type for v in n.inputs])["weight"]
                graph.params[full] = Param.named(full, decl)
                if ctx.weights is not None:
                    ctx.weights[full] = ctx.weights[full].double().exp().to(ctx.weights[full].dtype)
                ctx.note("exp(log-scale) folded")
        return graph
