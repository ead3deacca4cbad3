"""Batch-norm folding: an inference-time batch norm after a convolution or linear layer is an
affine map per output channel, so it folds into that layer's weight and bias.

    s  = gamma / sqrt(running_var + eps)
    W' = W · s (per output channel)          b' = (b - running_mean) · s + beta

computed in float64 and rounded once. The layer keeps its name (and so its parameter names);
a layer without a bias gets one (`<layer>.bias`). The batch norm's parameters and buffers are
gone from the inference artifacts, whose folded weights the build writes beside them.
"""
from __future__ import annotations

from collections import Counter

from lbdlc import ops
from lbdlc.ir import Node, Param

from .manager import Pass, register
from .pattern import P, Rewrite, fuse, rewrite

FOLDABLE = ("conv2d", "conv1d", "linear", "fused_conv2d", "fused_linear")


def _foldable(n: Node) -> bool:
    if getattr(n.attrs, "activation", "none") != "none" or len(n.inputs) != 1:
        return False  # a fused activation or residual sits between the layer and the batch norm
    if n.op in ("linear", "fused_linear"):
        return n.outputs[0].type.rank == 2  # BatchNorm1d on [N, C]: C is the layer's output features
    return True


@register
class FoldBatchNorm(Pass):
    name = "fold_batch_norm"
    description = "Inference: fold batch norm into the convolution or linear layer before it (weights rewritten)."
    inference_only = True
    changes_weights = True

    def run(self, graph, ctx):
        uses = Counter(p for n in graph.nodes for p in n.params.values())

        def fold(m):
            layer, bn = m["layer"], m.root
            if any(uses[p] != 1 for n in (layer, bn) for p in n.params.values()):
                return None  # a shared (tied) parameter would change elsewhere too
            new = fuse(layer, layer.op, bn, bias=True)
            bias = f"{layer.name}.bias"
            new.params["bias"] = bias
            declared = ops.get(new.op).params(new.attrs, [v.type for v in new.inputs])
            graph.params[bias] = graph.params.get(bias) or Param.named(bias, declared["bias"])
            if ctx.weights is not None:
                w = ctx.weights
                gamma, beta, mean, var = (w[bn.params[k]].double() for k in ("weight", "bias", "running_mean", "running_var"))
                s = gamma / (var + bn.attrs.eps).sqrt()
                weight = w[layer.params["weight"]]
                b = w[layer.params["bias"]].double() if "bias" in layer.params else mean.new_zeros(mean.shape)
                w[layer.params["weight"]] = (weight.double() * s.view(-1, *[1] * (weight.dim() - 1))).to(weight.dtype)
                w[bias] = ((b - mean) * s + beta).to(weight.dtype)
            return [new]

        rule = Rewrite(P("batch_norm", P(FOLDABLE, "x", name="layer", where=_foldable), name="bn"), fold,
                       "batch_norm folded into the layer before it")
        return rewrite(graph, [rule], ctx)
