"""Which layers quantization-aware training simulates: `quantize: {qat: true}`.

QAT trains the model the build will deploy, so it simulates exactly what the build does:
- weight-only block formats: what the `quantize:` section's pass (passes/quantize.py) would
  do to the graph: the same layers, the same block formats (`qat_layers`; backends/train_qat.py
  writes that into train.py);
- int8 static (`default: int8, method: static`): what ONNX Runtime's quantize_static does in
  lbdlc/quant_int8.py: int8 weights, int32 biases and uint8 activations around the linear and
  convolution layers the int8 plan quantizes (`qat_int8_layers`; backends/train_qat_int8.py).
  train.py saves the activation ranges it learned (qat_ranges.json beside the weights), and
  `lbdlc build --weights` gives them to ORT's quantizer instead of calibrating (`with_ranges`).
- int8 dynamic quantizes activations at run time from each input's own range: nothing to
  learn, and `qat` is an error there.
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
    if spec.int8_method == "dynamic":
        raise SpecError("qat has nothing to learn for int8 dynamic quantization: ONNX Runtime quantizes activations at "
                        "run time from each input's own range, and rounds the weights after training", loc,
                        hint="use `method: static` to train with int8 activations (qat learns their ranges), "
                             "a block format (`default: q4_1`, q4_0, q8_0) to train with low-bit weights, or drop qat")
    if spec.int8_method == "static":
        return {}, loc.line if loc else None  # qat_int8_layers
    from .passes.quantize import for_build

    quantized = for_build(loaded, copy.deepcopy(graph), None)
    layers = {} if quantized is None else {e["layer"]: e["format"] for e in quantized[3]}
    if not layers:
        raise SpecError("qat: the quantize section quantizes no layer of this model", loc,
                        hint="block formats need linear layers whose input width is a multiple of 32")
    return layers, loc.line if loc else None


# Ops with weights that ONNX Runtime's static int8 leaves alone (lbdlc/quant_int8.py
# STATIC_OPS: Conv, MatMul, Gemm, Gather): their layers train in fp32 as they deploy.
NOT_INT8 = {"batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm", "affine", "learned_scale",
            "conv_transpose1d", "conv_transpose2d"}
SIMULATED = {"linear": "linear", "conv1d": "conv", "conv2d": "conv"}


def qat_int8_layers(loaded, graph: Graph) -> dict | None:
    """For `quantize: {default: int8, method: static, qat: true}`: what train.py simulates
    (backends/train_qat_int8.py): {"layers": {layer: {kind, input, output, int32_bias}},
    "per_channel", "reduce_range", "weights", "line"}; None for other specs.

    `input` and `output` name the activations ORT quantizes around the layer: the IR value
    feeding it, and its output (for a linear layer on rank-3 inputs with a bias, the
    MatMul's output before the bias Add, `<layer>#matmul`). Layers sharing an activation
    share its range."""
    spec = getattr(loaded.spec, "quantize", None)
    if spec is None or not spec.qat or spec.int8_method != "static":
        return None
    from .quant_int8 import plan_for

    loc = loc_of(loaded.raw, ("quantize", "qat"))
    distributed = getattr(getattr(loaded.spec, "train", None), "distributed", None)
    if distributed is not None and distributed.strategy == "fsdp":  # its forward reads whole weights
        raise SpecError("train.distributed: fsdp is not supported with int8 quantization-aware training yet",
                        loc_of(loaded.raw, ("train", "distributed")),
                        hint="use `strategy: ddp` (the default): every process then fake-quantizes whole weights")
    plan = plan_for(loaded, graph, spec)
    excluded = set(plan.exclude)
    if spec.resolve(spec.default) is not None:  # `default: q4_1, method: static`: block formats first
        raise SpecError(f"qat with int8 static quantization cannot also train the block format of `default: {spec.default}`",
                        loc_of(loaded.raw, ("quantize", "default")) or loc, hint="use `default: int8` with `method: static`")
    for k, rule in enumerate(spec.rules):  # a block format under int8: not what qat simulates
        if spec.rule_format(rule) is not None:
            raise SpecError(f"qat with int8 static quantization cannot also train the block format of rule '{rule.match}'",
                            loc_of(loaded.raw, ("quantize", "rules", k)) or loc,
                            hint="qat simulates one scheme: give the rule `bits: 8` or `bits: none`, or drop qat")
    layers = {}
    for n in graph.nodes:
        if not n.params or n.name in excluded or n.op in NOT_INT8:
            continue
        if n.op not in SIMULATED:
            raise SpecError(f"qat with int8 static quantization simulates linear and convolution layers; ONNX Runtime "
                            f"would also quantize layer '{n.name}' ({n.op}), which training cannot see", loc,
                            hint=f"keep it fp32 with a rule `{{match: \"{n.name}\", bits: none}}`, or drop qat")
        tied = [p for k, p in n.params.items() if p != f"{n.name}.{k}"]
        if tied:  # model.py has no module of its own for it (F.linear on the owner's table)
            raise SpecError(f"qat with int8 static quantization cannot simulate layer '{n.name}': its weight is "
                            f"{tied[0]}, tied to another layer", loc,
                            hint=f"keep it fp32 with a rule `{{match: \"{n.name}\", bits: none}}`, or drop qat")
        rank3_bias = n.op == "linear" and n.inputs[0].type.rank != 2 and "bias" in n.params
        layers[n.name] = {"kind": SIMULATED[n.op], "input": n.inputs[0].name,
                          "output": f"{n.name}#matmul" if rank3_bias else n.outputs[0].name,
                          "int32_bias": not rank3_bias and "bias" in n.params}
    if not layers:
        raise SpecError("qat: the quantize section quantizes no layer of this model", loc,
                        hint="int8 static quantizes linear and convolution layers; rules with `bits: none` keep them fp32")
    return {"layers": layers, "per_channel": plan.per_channel, "reduce_range": plan.reduce_range, "weights": plan.weights,
            "line": loc.line if loc else None}


QAT_RANGES = "qat_ranges.json"  # train.py's learned activation ranges, beside weights.safetensors


def with_ranges(loaded, plan, weights_path):
    """The int8 plan of a static-int8 QAT spec, with the activation ranges train.py learned
    (qat_ranges.json beside `--weights`) for ORT's quantizer; without the file the build
    calibrates, with a warning at `qat:`."""
    spec = getattr(loaded.spec, "quantize", None)
    if plan is None or plan.method != "static" or spec is None or not spec.qat:
        return plan
    import json
    import math
    from pathlib import Path

    loc = loc_of(loaded.raw, ("quantize", "qat"))
    path = Path(weights_path).parent / QAT_RANGES if weights_path else None
    if path is None or not path.is_file():
        why = "this build has no --weights" if path is None else f"there is no {QAT_RANGES} beside {weights_path}"
        loaded.warnings.append(SpecError(
            f"qat: {why}, so int8 activation ranges are calibrated, not the ones training learned", loc,
            hint=f"build with `--weights run/weights.safetensors` of the QAT run (train.py writes run/{QAT_RANGES} beside it)",
            severity="warning"))
        return plan
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data.get("tensors"), dict) or not isinstance(data.get("layers"), dict):
            raise ValueError("no `tensors` and `layers` tables")
        for key, r in data["tensors"].items():
            if not (isinstance(r, dict) and all(isinstance(r.get(b), (int, float)) and math.isfinite(r[b]) for b in ("rmin", "rmax"))
                    and r["rmin"] <= r["rmax"]):
                raise ValueError(f"tensor '{key}' has no finite range rmin <= rmax")
    except (OSError, ValueError, AttributeError) as e:
        raise SpecError(f"{path} is not a QAT ranges file written by train.py: {e}", loc,
                        hint="train the spec again (`lbdlc train`), or remove the file to calibrate instead") from None
    trained = data.get("weights") or {}
    now = {"dtype": plan.weights, "per_channel": plan.per_channel, "reduce_range": plan.reduce_range}
    if trained and trained != now:
        loaded.warnings.append(SpecError(
            f"qat: training simulated int8 weights {trained}, this build quantizes them {now}", loc,
            hint="train again after changing per_channel, reduce_range or weights", severity="warning"))
    plan.qat_ranges, plan.qat_from = data, path.as_posix()
    return plan


def range_overrides(model, ranges: dict) -> dict[str, str]:
    """{ONNX tensor: range key} for the activations around each QAT layer's Conv, Gemm or
    MatMul in a prepared fp32 model (its nodes are named `<layer>/<Op>_<k>`): the node's
    first input takes the layer's input range, its output the layer's output range."""
    tensors, layers = ranges["tensors"], ranges["layers"]
    out: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in ("Gemm", "MatMul", "Conv") or "/" not in node.name:
            continue
        entry = layers.get(node.name.rsplit("/", 1)[0])
        if not isinstance(entry, dict):
            continue
        for tensor, key in ((node.input[0], entry.get("input")), (node.output[0], entry.get("output"))):
            if key in tensors:
                out.setdefault(tensor, key)
    return out
