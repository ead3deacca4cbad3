"""The whole-model error of a quantized build (docs/quantization.md): each output of the
quantized ONNX model against the fp32 model on the same inputs, and each quantized weight
against its fp32 values. Also the bound `--verify` holds a quantized build to.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# What `--verify` allows between a quantized artifact and the fp32 model.py, as the relative
# RMS error of each output (sqrt(mean((q - f)^2) / mean(f^2))). Measured on these specs'
# builds (docs/quantization.md): int8 0.002-0.03, Q8_0 < 0.01, Q4_x 0.04-0.09 on random
# GPT-2 weights; the bounds leave room for other models and inputs.
REL_RMS_BOUND = {"int8": 0.1, "q8_0": 0.05, "q4_0": 0.2, "q4_1": 0.2}


def rel_rms(q: np.ndarray, f: np.ndarray) -> float:
    q, f = q.astype(np.float64), f.astype(np.float64)
    return float(np.sqrt(((q - f) ** 2).mean() / max((f ** 2).mean(), 1e-30))) if f.size else 0.0


def _session(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, (bytes, str)) else str(model), options,
                                providers=["CPUExecutionProvider"])


def output_error(fp32, quantized, inputs: dict[str, np.ndarray]) -> list[dict]:
    """Per output: max |q − f|, max |f| and relative RMS error; `fp32`/`quantized` are paths
    or serialized models."""
    f_sess, q_sess = _session(fp32), _session(quantized)
    names = [i.name for i in f_sess.get_inputs()]
    feed = {k: v for k, v in inputs.items() if k in names}
    f_out, q_out = f_sess.run(None, feed), q_sess.run(None, feed)
    rows = []
    for meta, f, q in zip(f_sess.get_outputs(), f_out, q_out):
        if not np.issubdtype(f.dtype, np.floating):
            continue
        rows.append({"output": meta.name, "max_abs_error": float(np.abs(q.astype(np.float64) - f).max()) if f.size else 0.0,
                     "max_abs_fp32": float(np.abs(f).max()) if f.size else 0.0, "rel_rms_error": rel_rms(q, f),
                     "samples": len(next(iter(feed.values())))})
    return rows


def weight_errors(dequantized: dict[str, np.ndarray], fp32: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    for name in sorted(dequantized):
        d, w = dequantized[name], fp32[name]
        err = d.astype(np.float64) - w
        rows.append({"param": name, "max_abs_error": float(np.abs(err).max()) if err.size else 0.0, "rel_rms_error": rel_rms(d, w)})
    return rows


def weight_only_outputs(loaded, graph, weights, quantized_onnx: Path, opset: int) -> tuple[list[dict], str] | None:
    """The whole-model error of a weight-only (block format) build: the fp32 graph emitted to
    ONNX in memory against the quantized model.onnx, on a batch of calibration inputs (the
    spec's training data when it has some). Skipped (None) for models over 1 GB of weights."""
    from . import calibration as cal
    from .backends.onnx import to_onnx

    if sum(p.numel for p in graph.params.values()) * 4 > 2**30:
        return None
    split = "train" if cal.has_data(loaded) else "synthetic"
    inputs, source = cal.samples(loaded, graph, split, 8)
    fp32 = to_onnx(graph, weights, opset).SerializeToString()
    return output_error(fp32, str(quantized_onnx), inputs), source


def bound_for(manifest: dict) -> tuple[float, list[str]] | None:
    """(relative RMS bound, the quantized backends) for `--verify`, or None for an fp32 build."""
    int8 = manifest.get("quantization_int8")
    blocks = manifest.get("quantization") or []
    if not int8 and not blocks:
        return None
    kinds = {r["format"] for r in blocks} | ({"int8"} if int8 else set())
    backends = set(manifest.get("quantized_backends") or ["onnx", "tvm"])
    return max(REL_RMS_BOUND[k] for k in kinds), sorted(backends)


def accuracy(out_dir: Path, backend: str, inputs: dict[str, np.ndarray], labels: np.ndarray, batch: int = 512) -> float:
    """Top-1 accuracy of a build's first output through one backend (lbdlc/verify.py's runners)."""
    from .verify import RUNNERS

    n, hits = len(labels), 0
    for i in range(0, n, batch):
        logits = RUNNERS[backend](out_dir, {k: v[i:i + batch] for k, v in inputs.items()})[0]
        hits += int((logits.argmax(-1) == labels[i:i + batch]).sum())
    return hits / n
