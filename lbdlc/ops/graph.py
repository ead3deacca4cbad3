"""Graph layers: message passing over an adjacency matrix given as a model input.

`graph_conv` is the graph convolution of Kipf & Welling (2017), "each vertex becomes a linear
combination of its neighbours' activations" (book, graph layers):

    H' = Â (H Wᵀ) + b

with H the node features [nodes, in] (or [batch, nodes, in]) and Â the adjacency
[nodes, nodes] (or [batch, nodes, nodes]) as a second input. The features are projected
first (cheaper when out < in, as in GCNs) and the bias is added after the aggregation, as
in torch_geometric's GCNConv. With `normalize: true` the layer takes the raw adjacency A
(non-negative, self-loops not included) and uses Â = D^-1/2 (A + I) D^-1/2, D the row sums
of A + I, computed without forming I:

    Â Y = d ⊙ (A (d ⊙ Y) + d ⊙ Y),   d = (rowsum(A) + 1)^-1/2 as a column.
"""
from __future__ import annotations

from pydantic import PositiveInt

from ..ir import ParamDef, TensorType, dim_eq, numel
from . import Op, OpAttrs, ShapeError, register
from .linear import uniform_fan_in
from .rules import check_declared


def graph_conv_batch(x: TensorType, adj: TensorType) -> tuple:
    """The batch dims of a graph_conv output: () or (batch,), checked between both inputs."""
    if x.rank not in (2, 3):
        raise ShapeError(f"graph_conv takes node features [nodes, features] or [batch, nodes, features], got {x} (rank {x.rank})")
    if adj.rank not in (2, 3):
        raise ShapeError(f"graph_conv takes an adjacency [nodes, nodes] or [batch, nodes, nodes], got {adj} (rank {adj.rank})",
                         hint="the second input is the adjacency matrix: `in: [features, adjacency]`")
    if not dim_eq(adj.shape[-1], adj.shape[-2]):
        raise ShapeError(f"the adjacency {adj} is not square", hint="the second input is the adjacency matrix: `in: [features, adjacency]`")
    if not dim_eq(adj.shape[-1], x.shape[-2]):
        raise ShapeError(f"the adjacency {adj} is over {adj.shape[-1]} nodes, but the features {x} have {x.shape[-2]}",
                         hint="the inputs are `in: [features, adjacency]`, features [nodes, F] and adjacency [nodes, nodes]")
    if x.rank == 3 and adj.rank == 3 and not dim_eq(x.shape[0], adj.shape[0]):
        raise ShapeError(f"the features {x} and the adjacency {adj} have different batch sizes ({x.shape[0]} vs {adj.shape[0]})")
    return x.shape[:1] if x.rank == 3 else adj.shape[:1] if adj.rank == 3 else ()


@register
class GraphConv(Op):
    """Graph convolution (Kipf & Welling): adjacency @ (features Wᵀ) + b; inputs [features, adjacency]."""

    name = "graph_conv"
    arity = 2

    class Attrs(OpAttrs):
        out_features: PositiveInt
        in_features: PositiveInt | None = None  # inferred from the features when left out
        bias: bool = True
        normalize: bool = False  # true: the input is the raw A, and D^-1/2 (A + I) D^-1/2 is used

    def resolve(self, a, ins):
        x, adj = ins
        graph_conv_batch(x, adj)
        n = check_declared(a.in_features, x, -1, "in_features")
        return a.model_copy(update={"in_features": n})

    def infer(self, a, ins):
        x, adj = ins
        batch = graph_conv_batch(x, adj)
        return [TensorType(batch + (x.shape[-2], a.out_features), x.dtype)]

    def params(self, a, ins):
        init = uniform_fan_in(a.in_features)  # nn.Linear's default
        p = {"weight": ParamDef((a.out_features, a.in_features), init)}
        if a.bias:
            p["bias"] = ParamDef((a.out_features,), init)
        return p

    def flops(self, a, ins, outs):
        x, adj = ins
        out = outs[0]
        nodes = out.shape[-2]
        graphs = numel(out.shape[:-2])
        project = numel(x.shape[:-1]) * 2 * a.in_features * a.out_features  # H Wᵀ
        aggregate = graphs * 2 * nodes * nodes * a.out_features  # Â (H Wᵀ)
        total = project + aggregate + (numel(out.shape) if a.bias else 0)
        if a.normalize:  # row sums and d, then d ⊙ Y twice, + d ⊙ Y
            total += numel(adj.shape) + 2 * numel(adj.shape[:-1]) + 3 * numel(out.shape)
        return total
