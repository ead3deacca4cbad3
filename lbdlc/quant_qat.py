"""Which layers quantization-aware training simulates: `quantize: {qat: true}`.

QAT trains with the weights the build will deploy, so it simulates exactly what the
`quantize:` section's weight-only pass (passes/quantize.py) would do to the graph: the same
layers, the same block formats. backends/train_qat.py writes that into train.py.
"""
from __future__ import annotations

import copy

from .errors import SpecError
from .ir import Graph
from .source import loc_of


def qat_layers(loaded, graph: Graph) -> tuple[dict[str, str], int | None]:
    """(layer -> block format, line of `qat:`) for a spec asking for QAT; ({}, None) otherwise."""
    spec = getattr(loaded.spec, "quantize", None)
    if spec is None or not spec.qat:
        return {}, None
    loc = loc_of(loaded.raw, ("quantize", "qat"))
    if spec.int8_method:
        raise SpecError(f"qat simulates the weight-only block formats; int8 {spec.int8_method} quantization is "
                        "ONNX Runtime's, applied after training", loc,
                        hint="use `default: q4_1` (or q4_0, q8_0) with qat, or drop qat for int8")
    from .passes.quantize import for_build

    quantized = for_build(loaded, copy.deepcopy(graph), None)
    layers = {} if quantized is None else {e["layer"]: e["format"] for e in quantized[3]}
    if not layers:
        raise SpecError("qat: the quantize section quantizes no layer of this model", loc,
                        hint="block formats need linear layers whose input width is a multiple of 32")
    return layers, loc.line if loc else None
