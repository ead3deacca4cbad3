"""Static analysis on the IR alone: parameter counts and FLOPs, without allocating weights."""
from __future__ import annotations

from dataclasses import dataclass

from . import ops
from .ir import Graph, Value, dim_str, per_sample


@dataclass
class LayerStats:
    name: str
    op: str
    output_shape: list[str]
    params: int
    flops: int
    line: int | None


@dataclass
class Summary:
    name: str
    inputs: list[dict]
    outputs: list[dict]
    params: int  # trainable parameters; buffers (BatchNorm statistics) are counted apart
    buffers: int
    flops: int  # per sample: every symbolic dimension taken as 1
    layers: list[LayerStats]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "params": self.params,
            "buffers": self.buffers,
            "flops": self.flops,
            "layers": [vars(layer) for layer in self.layers],
        }


def _signature(v: Value) -> dict:
    return {"name": v.name, "shape": [d if isinstance(d, int) else dim_str(d) for d in v.type.shape], "dtype": v.type.dtype}


def summarize(graph: Graph) -> Summary:
    layers = []
    for node in graph.nodes:
        op = ops.get(node.op)
        ins, outs = [v.type for v in node.inputs], [v.type for v in node.outputs]
        n_params = sum(graph.params[p].numel for p in node.params.values() if not graph.params[p].buffer)
        layers.append(
            LayerStats(
                name=node.name,
                op=node.op,
                output_shape=[d if isinstance(d, int) else dim_str(d) for d in node.outputs[0].type.shape],
                params=n_params,
                flops=per_sample(op.flops(node.attrs, ins, outs)),
                line=node.origin.line if node.origin else None,
            )
        )
    return Summary(
        name=graph.name,
        inputs=[_signature(v) for v in graph.inputs],
        outputs=[_signature(v) for v in graph.outputs],
        params=sum(p.numel for p in graph.params.values() if not p.buffer),
        buffers=sum(p.numel for p in graph.params.values() if p.buffer),
        flops=sum(layer.flops for layer in layers),
        layers=layers,
    )
