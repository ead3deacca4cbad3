"""The build's quantization step after the artifacts are written (lbdlc/driver.py calls it):
int8 quantization of model.onnx by ONNX Runtime (lbdlc/quant_int8.py), and the whole-model
error report of any quantized build (lbdlc/quant_report.py). Returns manifest entries:

- `quantization_int8`: method, options, CPU, ONNX bytes before/after, per-output error
  against fp32, per-weight error of the int8 weights, what each backend computes;
- `quantization_outputs`: for weight-only block formats, per-output error against fp32;
- `quantized_backends`: the artifacts that compute the quantized function (what `--verify`
  holds to the quantization bound instead of to fp32 equality).
"""
from __future__ import annotations

from pathlib import Path

from .errors import SpecError


def after_artifacts(loaded, graph, weights, optimized, tmp: Path, artifacts: list[Path], options, quantized) -> tuple[list[Path], dict]:
    from .passes.quantize import effective_spec
    from .quant_int8 import apply, plan_for

    out: dict = {}
    plan = plan_for(loaded, graph, effective_spec(loaded, options.quantize))
    if plan is None and quantized is None:
        return artifacts, out
    backends = set(options.backends)
    if plan is not None and backends == {"pytorch"} and getattr(loaded.spec, "train", None) is not None:
        plan = None  # `lbdlc train`'s build: model.py and train.py are fp32 (`qat:` simulates int8 in train.py)
    from .quant_qat import with_ranges  # qat: the activation ranges train.py learned, beside --weights

    plan = with_ranges(loaded, plan, options.weights)
    if plan is not None:
        if "onnx" not in backends:
            raise SpecError("int8 quantization (dynamic or static) quantizes the ONNX artifact, and this build has no ONNX backend",
                            plan.loc, hint="add `-b onnx`, or use a weight-only block format (-q q8_0, q4_0, q4_1) for TVM alone")
        artifacts, out["quantization_int8"] = apply(loaded, graph, optimized, tmp, artifacts, plan, backends)
    elif "onnx" in backends:
        measured = _weight_only_outputs(loaded, graph, weights, tmp, options)
        if measured is not None:
            out["quantization_outputs"] = {"samples": measured[1], "outputs": measured[0]}
    # model.py computes the quantized function only for block formats without int8 on top
    pytorch_quantized = plan is None and "pytorch" in backends and any(n.op in ("linear_q", "embedding_q")
                                                                       for n in optimized.pytorch_graph.nodes)
    out["quantized_backends"] = sorted((backends & {"onnx", "tvm"}) | ({"pytorch"} if pytorch_quantized else set()))
    return artifacts, out


def _weight_only_outputs(loaded, graph, weights, tmp: Path, options):
    from .quant_report import weight_only_outputs

    try:
        return weight_only_outputs(loaded, graph, weights, tmp / "model.onnx", options.opset)
    except SpecError:
        return None  # no samples to measure on (e.g. a data split without the model's inputs): no report
