"""int8 post-training quantization of the ONNX artifact (docs/quantization.md).

`-q int8` (or `quantize: {default: int8, method: dynamic|static}`) hands the finished ONNX
model to ONNX Runtime's own quantizer, `onnxruntime.quantization`:

- dynamic: `quantize_dynamic`: int8 weights (per output channel), activations quantized at
  run time (DynamicQuantizeLinear + MatMulInteger / ConvInteger);
- static: `quantize_static` in QDQ format (QuantizeLinear/DequantizeLinear pairs any runtime
  can execute), activation ranges calibrated on samples of the spec's own data
  (lbdlc/calibration.py) with a MinMax, Entropy or Percentile observer.

Before quantizing, linear layers' weights are laid out as ONNX Runtime's quantizer needs
them: a Transpose of an initializer (rank-3 linear layers), and for dynamic quantization
Gemm(transB=1), become a MatMul on a pre-transposed initializer `<weight>__transposed`, so
every projection's weight is an
initializer the quantizer can see (a Transpose node in front of it would make ORT quantize it
at run time as an activation, and leave the fp32 weight in the file).

With `qat: true` (static only), train.py learned the activation ranges
(backends/train_qat_int8.py) and saved them beside its weights: `quantize_model` hands them to
ORT as TensorQuantOverrides instead of the calibrated ones (lbdlc/quant_qat.py with_ranges).

The other backends: model.py stays fp32 (train.py trains it). The TVM library has no int8
kernels here; it runs the same graph on the int8 weights ORT stores, dequantized to fp32
(weights.inference.safetensors), with fp32 activations: its outputs carry the weight
rounding, not the activation rounding. The build report says so.

The known trap (DESIGN.md): on x86 CPUs with AVX2 but no VNNI, ORT's u8·s8 kernels sum pairs
of products into int16 (vpmaddubsw) and saturate when weights use the full int8 range.
`reduce_range: true` (the default: 7-bit weights) or `weights: uint8` avoids it; with
`reduce_range: false` and int8 weights on such a CPU the build warns at the spec line.
"""
from __future__ import annotations

import fnmatch
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import SpecError
from .source import loc_of

OBSERVERS = ("minmax", "entropy", "percentile")
# Static (QDQ) quantizes the ops that carry weights, and the activations feeding them. Not
# elementwise ops: the causal mask lbdlc's attention adds is -inf above the diagonal, and a
# calibrated range over -inf would flatten every attention score (GPT-2 logits' relative RMS
# error 0.6 with ORT's default op list, 0.05 with this one).
STATIC_OPS = ["Conv", "MatMul", "Gemm", "Gather"]
SUFFIX_T = "__transposed"


@dataclass
class Int8Plan:
    method: str  # dynamic | static
    per_channel: bool = True
    reduce_range: bool = True
    weights: str = "int8"  # int8 | uint8
    split: str = "train"
    samples: int = 64
    observer: str = "minmax"
    seed: int = 0
    sizes: dict = field(default_factory=dict)  # synthetic calibration: symbolic dims
    exclude: list[str] = field(default_factory=list)  # layer names kept fp32 (rules: none, or block formats)
    loc: object = None  # the spec's quantize: section, for warnings
    qat_ranges: dict | None = None  # qat: the activation ranges train.py learned (lbdlc/quant_qat.py with_ranges)
    qat_from: str | None = None  # the qat_ranges.json they came from
    qat_applied: dict | None = None  # ONNX tensor -> range key, filled by quantize_model

    def to_json(self) -> dict:
        out = {"method": self.method, "per_channel": self.per_channel, "reduce_range": self.reduce_range,
               "weights": self.weights, "excluded_layers": list(self.exclude)}
        if self.method == "static":
            out["calibration"] = {"split": self.split, "samples": self.samples, "observer": self.observer, "seed": self.seed}
            if self.sizes:
                out["calibration"]["sizes"] = dict(self.sizes)
        return out


def plan_for(loaded, graph, spec) -> Int8Plan | None:
    """The int8 quantization a (choice-adjusted) QuantizeSpec asks for, checked against the
    graph: rules must match a layer with weights, static needs calibration data."""
    method = spec.int8_method if spec is not None else None
    if method is None:
        return None
    raw = loaded.raw
    cal = spec.calibration
    split = cal.split if cal is not None else "train"
    if method == "static" and split != "synthetic" and getattr(loaded.spec, "train", None) is None:
        where = ("quantize", "calibration") if cal is not None else ("quantize", "method")
        loc = loc_of(raw, where) if raw is not None and "quantize" in raw else None
        raise SpecError("static int8 quantization needs calibration data, and this spec has no `train:` data section", loc,
                        hint="add `calibration: {split: synthetic, samples: 64}` to calibrate on random inputs of the model's "
                             "signature, or use method: dynamic (no calibration)")
    from .passes.decompose_attention import PROJECTIONS

    layers = [n.name for n in graph.nodes if n.params]  # and attention's projections: passes/quantize.py writes
    layers += [f"{n.name}.{p}" for n in graph.nodes if n.op == "attention" for p in PROJECTIONS]  # named ones out
    exclude = []
    for k, rule in enumerate(spec.rules):
        hits = [name for name in layers if fnmatch.fnmatchcase(name, rule.match)]
        if not hits:
            raise SpecError(f"quantization rule '{rule.match}' matches no layer with weights",
                            loc_of(raw, ("quantize", "rules", k, "match")) if raw is not None else None,
                            hint=f"layers: {', '.join(layers[:8])}{' ...' if len(layers) > 8 else ''}")
    for name in layers:  # first match wins; int8 (bits 8) is the default
        for rule in spec.rules:
            if fnmatch.fnmatchcase(name, rule.match):
                if not (rule.bits == 8 or rule.format is None and rule.bits is None):
                    exclude.append(name)  # none, 4 bits or a block format: not ORT's int8
                break
    return Int8Plan(method, spec.per_channel, spec.reduce_range, spec.weights, split,
                    cal.samples if cal is not None else 64, cal.observer if cal is not None else "minmax",
                    cal.seed if cal is not None else 0, dict(cal.sizes) if cal is not None else {}, exclude,
                    loc_of(raw, ("quantize",)) if raw is not None and "quantize" in raw else None)


# --- the CPU ---------------------------------------------------------------------------------

def cpu_int8() -> dict:
    """What this CPU's int8 kernels can do: x86 flags from /proc/cpuinfo (None elsewhere)."""
    import platform

    info = {"machine": platform.machine(), "avx2": None, "vnni": None}
    try:
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return info
    if flags:
        info["avx2"] = "avx2" in flags
        info["vnni"] = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return info


def saturation_risk(plan: Int8Plan, cpu: dict) -> bool:
    """u8·s8 products summed pairwise in int16 overflow on AVX2 without VNNI for full-range weights."""
    return plan.weights == "int8" and not plan.reduce_range and cpu.get("avx2") is True and cpu.get("vnni") is False


# --- preparing and quantizing the ONNX model -------------------------------------------------

def prepare(model, gemm: bool = True) -> None:
    """Put linear weights where the quantizer sees them (in place): MatMul on `<w>__transposed`
    for Transpose(initializer), and with `gemm` for Gemm(transB=1) with an initializer B (for
    dynamic quantization, which turns Gemm into MatMulInteger on a transposed copy anyway; static
    QDQ keeps Gemm, which ONNX Runtime fuses into a quantized Gemm, its weight in our layout)."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    added: dict[str, str] = {}

    def transposed(name: str) -> str:
        if name not in added:
            arr = numpy_helper.to_array(inits[name])
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr.T), name + SUFFIX_T))
            added[name] = name + SUFFIX_T
        return added[name]

    rename: dict[str, str] = {}
    nodes = []
    for n in g.node:
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = rename[i]
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if (n.op_type == "Transpose" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2
                and list(attrs.get("perm", [1, 0])) == [1, 0]):
            rename[n.output[0]] = transposed(n.input[0])
            continue
        if (gemm and n.op_type == "Gemm" and len(n.input) >= 2 and n.input[1] in inits and attrs.get("transB") == 1
                and not attrs.get("transA") and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0):
            wt = transposed(n.input[1])
            if len(n.input) == 3 and n.input[2]:
                mid = n.output[0] + "__matmul"
                nodes.append(helper.make_node("MatMul", [n.input[0], wt], [mid], name=n.name + "_MatMul"))
                nodes.append(helper.make_node("Add", [mid, n.input[2]], [n.output[0]], name=n.name + "_Add"))
            else:
                nodes.append(helper.make_node("MatMul", [n.input[0], wt], [n.output[0]], name=n.name + "_MatMul"))
            continue
        nodes.append(n)
    for out in g.output:
        if out.name in rename:  # a graph output that was a transposed weight: keep the Transpose
            raise SpecError("int8 quantization cannot prepare a model whose output is a weight")
    used = {i for n in nodes for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(keep)


def share_tied_tables(model) -> list[str]:
    """After int8 quantization (in place): a token table tied to an LM head is stored twice,
    int8 for the Gather and transposed int8 for the head's matmul. Make the Gather read
    the head's copy (`Gather(axis=1)` on [dim, vocab], transposed back, dequantized with the
    gathered per-row scales and zero points), so the table is stored once. Returns the tables."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in g.input}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    shared = []
    def axis0(n) -> bool:
        return {a.name: helper.get_attribute_value(a) for a in n.attribute}.get("axis", 0) == 0

    for n in list(g.node):
        users = consumers.get(n.output[0], []) if n.output else []
        if (n.op_type == "Gather" and n.input[0].endswith("_quantized") and n.input[0] in inits and axis0(n)
                and len(users) == 1 and users[0].op_type == "DequantizeLinear"):
            gather, deq, out = n, users[0], users[0].output[0]  # dynamic: Gather of int8 rows, then dequantize
        elif (n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized") and n.input[0] in inits
              and len(users) == 1 and users[0].op_type == "Gather" and users[0].input[0] == n.output[0] and axis0(users[0])):
            gather, deq, out = users[0], n, users[0].output[0]  # static QDQ: dequantize the table, then Gather
        else:
            continue
        if gather.input[1] not in ranks:
            continue
        table = inits[n.input[0]]
        base = n.input[0][: -len("_quantized")]
        t_q, t_s, t_z = base + SUFFIX_T + "_quantized", base + SUFFIX_T + "_scale", base + SUFFIX_T + "_zero_point"
        if t_q not in inits or t_s not in inits or len(inits[t_s].dims) != 1 or inits[t_s].dims[0] != table.dims[0]:
            continue  # the head's copy must carry one scale per table row
        ids, rank = gather.input[1], ranks[gather.input[1]]
        s = gather.name or base

        def node(op, inputs, name, s=s, **attrs):
            g.node.append(helper.make_node(op, inputs, [f"{s}/shared_{name}"], name=f"{s}/shared_{name}", **attrs))
            return f"{s}/shared_{name}"

        rows = node("Transpose", [node("Gather", [t_q, ids], "gather", axis=1)], "rows", perm=list(range(1, rank + 1)) + [0])
        axes = helper.make_tensor(f"{s}/shared_axes", TensorProto.INT64, [1], [-1])
        g.initializer.append(axes)
        scale = node("Unsqueeze", [node("Gather", [t_s, ids], "scale_rows", axis=0), axes.name], "scale")
        value = node("Cast", [rows], "float", to=TensorProto.FLOAT)
        if t_z in inits and numpy_helper.to_array(inits[t_z]).any():
            zero = node("Cast", [node("Gather", [t_z, ids], "zero_rows", axis=0)], "zero_f", to=TensorProto.FLOAT)
            value = node("Sub", [value, node("Unsqueeze", [zero, axes.name], "zero")], "centered")
        g.node.append(helper.make_node("Mul", [value, scale], [out], name=f"{s}/shared_dequantize"))
        g.node.remove(gather)
        g.node.remove(deq)
        shared.append(base)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    if shared:  # the appended nodes must follow what they read: restore a topological order
        _toposort(g)
    return shared


def _toposort(g) -> None:
    ready = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending, ordered = list(g.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise SpecError("internal error: the quantized ONNX graph has a cycle")
        pending = rest
    del g.node[:]
    g.node.extend(ordered)


def _reader_class():
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self, feeds):
            self.feeds = feeds
            self.rewind()

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(self.feeds)

    return Reader


def quantize_model(fp32_path: Path, out_path: Path, plan: Int8Plan, calibration: list[dict] | None = None) -> None:
    """ONNX Runtime's quantizer on a prepared fp32 model."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    model = onnx.load(str(fp32_path))
    exclude = [n.name for n in model.graph.node if any(n.name.startswith(layer + "/") for layer in plan.exclude)]
    extra = {}
    if plan.qat_ranges is not None:  # qat: the ranges training learned replace the calibrated ones
        from .quant_qat import range_overrides

        plan.qat_applied = range_overrides(model, plan.qat_ranges)
        ranges = plan.qat_ranges["tensors"]
        extra["TensorQuantOverrides"] = {t: [{"rmin": np.array(ranges[k]["rmin"], np.float32),
                                              "rmax": np.array(ranges[k]["rmax"], np.float32)}]
                                         for t, k in plan.qat_applied.items()}
    wtype = QuantType.QInt8 if plan.weights == "int8" else QuantType.QUInt8
    import logging

    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer logs "consider pre-processing" at WARNING
    try:
        if plan.method == "dynamic":
            quantize_dynamic(str(fp32_path), str(out_path), per_channel=plan.per_channel, reduce_range=plan.reduce_range,
                             weight_type=wtype, nodes_to_exclude=exclude)
        else:
            method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                      "percentile": CalibrationMethod.Percentile}[plan.observer]
            with tempfile.TemporaryDirectory(prefix="lbdlc-calib-") as cache:
                import os

                cwd = os.getcwd()  # ORT writes its augmented model and histograms to the working directory
                os.chdir(cache)
                import contextlib
                import io

                try:
                    with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their settings
                        quantize_static(str(fp32_path), str(out_path), _reader_class()(calibration), quant_format=QuantFormat.QDQ,
                                        per_channel=plan.per_channel, reduce_range=plan.reduce_range,
                                        activation_type=QuantType.QUInt8, weight_type=wtype, nodes_to_exclude=exclude,
                                        op_types_to_quantize=STATIC_OPS,
                                        calibrate_method=method, calibration_providers=["CPUExecutionProvider"],
                                        extra_options=extra)
                finally:
                    os.chdir(cwd)
    finally:
        logging.getLogger().setLevel(quiet)


def dequantized_initializers(model, method: str) -> dict[str, np.ndarray]:
    """{fp32 name: the fp32 values its int8 replacement stands for} from a quantized model:
    `X_quantized` with `X_scale` and `X_zero_point`, laid out as the fp32 `X` was."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    axes = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            axes[n.input[0]] = {a.name: helper.get_attribute_value(a) for a in n.attribute}.get("axis", 1)
    out = {}
    for name in inits:
        if not name.endswith("_quantized"):
            continue
        base = name[: -len("_quantized")]
        scale_name = base + "_scale" if base + "_scale" in inits else name + "_scale"
        zero_name = base + "_zero_point" if base + "_zero_point" in inits else name + "_zero_point"
        if scale_name not in inits:
            continue
        q = numpy_helper.to_array(inits[name]).astype(np.float64)
        scale = numpy_helper.to_array(inits[scale_name]).astype(np.float64)
        zero = numpy_helper.to_array(inits[zero_name]).astype(np.float64) if zero_name in inits else np.zeros_like(scale)
        if scale.size > 1:
            axis = axes.get(name, 1 if (method == "dynamic" and q.ndim == 2) else 0)
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        out[base] = ((q - zero) * scale).astype(np.float32)
    return out


def to_ir_names(deq: dict[str, np.ndarray], params: dict) -> dict[str, np.ndarray]:
    """Dequantized initializers under the IR's parameter names and shapes."""
    out = {}
    for name, arr in deq.items():
        ir = name.removesuffix(SUFFIX_T)
        if ir not in params:
            continue
        want = tuple(params[ir].shape)
        if name.endswith(SUFFIX_T) or arr.shape != want:
            arr = arr.T if arr.ndim == 2 else arr
        if tuple(arr.shape) != want:
            continue
        out.setdefault(ir, np.ascontiguousarray(arr))
    return out


# --- the build step --------------------------------------------------------------------------

def apply(loaded, graph, optimized, tmp: Path, artifacts: list[Path], plan: Int8Plan, backends) -> tuple[list[Path], dict]:
    """Quantize tmp/model.onnx in place; give TVM the dequantized int8 weights; measure the
    error against fp32. Returns the artifacts and the manifest's `quantization_int8` entry."""
    import onnx
    import torch

    from . import calibration as cal
    from .quant_report import output_error, weight_errors

    path = tmp / "model.onnx"
    if (tmp / "model.onnx.data").exists():
        raise SpecError("int8 quantization of ONNX models over 2 GB (external data) is not supported yet",
                        plan.loc, hint="quantize with a weight-only block format (-q q4_0, q4_1, q8_0) instead")
    cpu = cpu_int8()
    if saturation_risk(plan, cpu):
        loaded.warnings.append(SpecError(
            "this CPU has AVX2 but no VNNI: ONNX Runtime's int8 kernels can saturate (int16 pair sums) with full-range "
            "int8 weights", plan.loc, hint="keep `reduce_range: true` (the default) or use `weights: uint8`",
            severity="warning"))
    samples_split = plan.split if plan.method == "static" else ("train" if cal.has_data(loaded) else "synthetic")
    samples_count = plan.samples if plan.method == "static" else 16
    inputs, source = cal.samples(loaded, graph, samples_split, samples_count, plan.seed, plan.loc, plan.sizes)
    feeds = cal.batches(inputs)
    with tempfile.TemporaryDirectory(prefix="lbdlc-int8-") as work:
        fp32 = Path(work) / "fp32.onnx"
        model = onnx.load(str(path))
        prepare(model, gemm=plan.method == "dynamic")
        onnx.save_model(model, str(fp32))
        bytes_before = path.stat().st_size
        quantize_model(fp32, path, plan, feeds if plan.method == "static" else None)
        quantized = onnx.load(str(path))
        shared = share_tied_tables(quantized)
        if shared:
            onnx.save_model(quantized, str(path))
        eval_inputs = {k: v[: cal.BATCH] for k, v in inputs.items()}
        errors = output_error(fp32, path, eval_inputs)
    params = optimized.graph.params
    deq = to_ir_names(dequantized_initializers(quantized, plan.method), params)
    fp32_weights = {k: optimized.weights[k].detach().float().numpy() for k in deq}
    report = plan.to_json()
    report.update({
        "cpu": cpu,
        "saturation_risk": saturation_risk(plan, cpu),
        "samples": source,
        "onnx_bytes_before": bytes_before,
        "onnx_bytes_after": path.stat().st_size,
        "ops": sorted({n.op_type for n in quantized.graph.node}),
        "shared_tables": shared,  # token tables stored once for the Gather and the tied head
        "outputs": errors,
        "layers": weight_errors(deq, fp32_weights),
        "backends": {
            "onnx": f"int8 {plan.method} (onnxruntime.quantization{', QDQ' if plan.method == 'static' else ''})",
            "tvm": "fp32 compute on the int8 weights ONNX Runtime stores, dequantized (activations not quantized)",
            "pytorch": "fp32 (model.py and train.py are not quantized)",
        },
    })
    if "tvm" in backends:
        from safetensors.torch import save_file

        from .driver import INFERENCE_WEIGHTS

        names = optimized.graph.inference_params()
        tensors = {n: torch.from_numpy(deq[n]) if n in deq else optimized.weights[n].contiguous() for n in names}
        out = tmp / INFERENCE_WEIGHTS
        save_file(tensors, str(out), metadata={"format": "pt"})
        if out not in artifacts:
            artifacts = artifacts + [out]
    if getattr(getattr(loaded.spec, "quantize", None), "qat", False) and plan.method == "static":
        report["backends"]["pytorch"] = "fp32 model.py; train.py trains it with int8 fake quantization (qat)"
    if plan.qat_ranges is not None:  # qat: which activations use the trained ranges
        from .quant_qat import QAT_RANGES

        quantized_acts = {n.input[1][: -len("_scale")] for n in quantized.graph.node
                          if n.op_type == "QuantizeLinear" and n.input[1].endswith("_scale")}
        calibrated = sorted(quantized_acts - set(plan.qat_applied or {}))
        report["qat"] = {"ranges_from": plan.qat_from, "trained": sorted(plan.qat_applied or {}), "calibrated": calibrated}
        if calibrated:
            loaded.warnings.append(SpecError(
                f"qat: {len(calibrated)} activation(s) ONNX Runtime quantizes have no range from training "
                f"({', '.join(calibrated[:4])}{' ...' if len(calibrated) > 4 else ''}): calibrated instead", plan.loc,
                hint=f"the {QAT_RANGES} beside the weights comes from another model, or passes renamed these layers",
                severity="warning"))
    for b in ("tvm", "pytorch"):
        if b not in backends:
            report["backends"].pop(b)
    return artifacts, report
