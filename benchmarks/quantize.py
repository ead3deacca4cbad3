"""Quantized builds side by side: size, CPU latency and accuracy, lbdlc against the path users
take today (docs/quantization.md).

Models:
- lenet, trained on the digits data by its own train.py (or `--lenet-weights`): accuracy on
  the 359-image test split;
- a GPT-2 at small width (random weights, `--gpt2-set` overrides): the logits' relative RMS
  error against fp32, at batch 1 × `--seq` tokens;
- on request, full-size `gpt2-full` and `resnet50` (random weights; minutes and GBs a build):
  the same error measure, with `--variants` to pick the builds.

Variants, all from the same weights:
- lbdlc: `lbdlc build` fp32, `-q int8-dynamic`, `-q int8-static` (calibrated on the spec's
  train split; synthetic inputs for GPT-2, which has no data), `-q q8_0`, `-q q4_0`, `-q q4_1`,
  each run by ONNX Runtime (and, with `--tvm`, by the untuned TVM library);
- the tools a user would otherwise pick: the generated model.py exported with
  `torch.onnx.export(dynamo=True)`, then onnxruntime.quantization applied with its defaults:
  `quantize_dynamic` (per-tensor, no reduce_range: the AVX2-without-VNNI trap), `quantize_static`
  (QDQ, MinMax, the same calibration inputs as lbdlc's) and the 4-bit
  `MatMulNBitsQuantizer` (block 32, symmetric: Q4_0's format).

Latency: median of `--reps` timed runs after two untimed ones, the variants taking turns (the
order rotating each round), ONNX Runtime sessions with thread spinning off (see `session`).
Sizes: model.onnx (+ external data). Each line also says which ops carry the weights.

    python benchmarks/quantize.py                      # both models, 20 repetitions
    python benchmarks/quantize.py --models lenet --tvm
    python benchmarks/quantize.py --models resnet50 gpt2-full --seq 128 --variants "int8 dynamic" "int8 static" --no-tools
    python benchmarks/quantize.py --write-readme       # also replace the section in benchmarks/README.md
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import export_torch, load_module  # benchmarks/inference.py

from lbdlc import calibration
from lbdlc.driver import BuildOptions, build
from lbdlc.lower import load, lower
from lbdlc.quant_int8 import cpu_int8
from lbdlc.quant_report import rel_rms

ROOT = Path(__file__).resolve().parent.parent
LBDLC = {"fp32": None, "int8 dynamic": "int8-dynamic", "int8 static": "int8-static", "Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}
TOOLS = ["torch export + ORT fp32", "torch export + ORT quantize_dynamic", "torch export + ORT quantize_static",
         "torch export + ORT MatMulNBits 4-bit"]
GPT2_SMALL = ["n_layer=4", "d_model=256", "n_head=4", "vocab=4096", "ctx=256"]
MARK_BEGIN, MARK_END = "<!-- quantize.py: begin -->", "<!-- quantize.py: end -->"
STATIC_SYNTHETIC = "quantize={default: int8, method: static, calibration: {split: synthetic, samples: 32, sizes: {seq: SEQ}}}"


def session(path):
    """ONNX Runtime with default graph optimizations on CPU, but with thread spinning off: with
    spinning, the thread pool of the session that ran last keeps two cores busy for a while and
    slows whichever variant runs next in the round robin (measured: the same TVM library timed
    at 310 ms after one session and 111 ms after another)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def train_lenet(work: Path) -> Path:
    from lbdlc.training.run import TrainOptions, prepare, run

    prepare(ROOT / "specs" / "lenet.yaml", work / "lenet_train", (), False)
    if run(work / "lenet_train", TrainOptions(device="cpu")) != 0:
        raise SystemExit("training lenet failed")
    return work / "lenet_train" / "run" / "weights.safetensors"


def tool_variants(fp32_dir: Path, inputs: dict, graph, calib: list[dict], work: Path) -> dict[str, Path]:
    """torch.onnx.export of the fp32 model.py, then onnxruntime.quantization with its defaults."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    exported = work / "torch_export.onnx"
    export_torch(load_module(fp32_dir), inputs, graph, exported)
    # ORT's quantizer re-runs ONNX shape inference, which rejects the value_info torch's
    # exporter writes for some transposed weights ("Inferred shape and existing shape
    # differ"); dropping the value_info is the usual workaround.
    model = onnx.load(str(exported))
    del model.graph.value_info[:]
    onnx.save_model(model, str(exported))
    out = {"torch export + ORT fp32": exported}
    quantize_dynamic(str(exported), str(work / "torch_dynamic.onnx"))
    out["torch export + ORT quantize_dynamic"] = work / "torch_dynamic.onnx"

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(exported), str(work / "torch_static.onnx"), Reader(), quant_format=QuantFormat.QDQ)
    out["torch export + ORT quantize_static"] = work / "torch_static.onnx"
    q = MatMulNBitsQuantizer(onnx.load(str(exported)), block_size=32, is_symmetric=True)
    q.process()
    q.model.save_model_to_file(str(work / "torch_q4.onnx"), False)
    out["torch export + ORT MatMulNBits 4-bit"] = work / "torch_q4.onnx"
    return out


def weight_ops(path: Path) -> str:
    import onnx

    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    keys = ["MatMulNBits", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QuantizeLinear", "Gemm", "MatMul", "Conv"]
    return ", ".join(k for k in keys if k in ops)


def bench(name: str, args, work: Path) -> list[dict]:
    if name == "lenet":
        spec, overrides = ROOT / "specs" / "lenet.yaml", []
        weights = Path(args.lenet_weights) if args.lenet_weights else train_lenet(work)
    elif name == "gpt2":
        spec, overrides, weights = ROOT / "specs" / "gpt2.yaml", GPT2_SMALL + list(args.gpt2_set), None
    else:  # full size, random weights: gpt2-full, resnet50
        spec, overrides, weights = ROOT / "specs" / f"{name.removesuffix('-full')}.yaml", [], None
    loaded = load(spec, overrides)
    graph = lower(loaded)
    dirs = {}
    variants = {label: q for label, q in LBDLC.items() if not args.variants or label in args.variants or label == "fp32"}
    for label, q in variants.items():
        extra = [STATIC_SYNTHETIC.replace("SEQ", str(args.seq))] if (q == "int8-static" and name != "lenet") else []
        backends = ("pytorch", "onnx", "tvm") if args.tvm else ("pytorch", "onnx")
        dirs[label] = build(spec, work / f"{name}_{label.replace(' ', '_')}",
                            BuildOptions(weights=weights, quantize=q, overrides=tuple(overrides + extra), backends=backends)).out_dir
    if name == "lenet":
        test = calibration.data_splits(loaded, graph)["test"]
        eval_inputs = {"image": test["image"].astype(np.float32)}
        labels = next(v for k, v in test.items() if k != "image")
        bench_inputs = {"image": eval_inputs["image"][:1]}
        calib_inputs, _ = calibration.samples(loaded, graph, "train", 64)
    else:
        sizes = {"seq": args.seq}
        eval_inputs, _ = calibration.samples(loaded, graph, "synthetic", 4 if name == "gpt2" else 2, seed=1, sizes=sizes)
        labels = None
        bench_inputs = {k: v[:1] for k, v in eval_inputs.items()}
        calib_inputs, _ = calibration.samples(loaded, graph, "synthetic", 32 if name == "gpt2" else 16, sizes=sizes)
    calib = calibration.batches(calib_inputs)
    paths = {label: d / "model.onnx" for label, d in dirs.items()}
    paths.update(tool_variants(dirs["fp32"], bench_inputs, graph, calib, work / name) if not args.no_tools else {})
    sessions = {label: session(p) for label, p in paths.items()}
    tvm_runs = {}
    if args.tvm:
        from inference import run_tvm_factory

        tvm_runs = {label: run_tvm_factory(dirs[label], bench_inputs) for label in variants}
    # quality: accuracy (lenet) or logits' relative RMS error against lbdlc fp32 (GPT-2)
    reference = sessions["fp32"].run(None, eval_inputs)[0]
    quality = {}
    outputs = {}
    for label, s in sessions.items():
        outputs[label] = s.run(None, {s.get_inputs()[0].name: next(iter(eval_inputs.values()))})[0]
    if args.tvm:
        from inference import run_tvm_factory

        outputs.update({f"TVM {label}": run_tvm_factory(dirs[label], eval_inputs)()[0] for label in variants})
    for label, got in outputs.items():
        quality[label] = 100 * float((got.argmax(-1) == labels).mean()) if labels is not None else rel_rms(got, reference)
    # latency: round robin, the order rotating, medians
    times: dict[str, list[float]] = {label: [] for label in list(sessions) + [f"TVM {k}" for k in tvm_runs]}
    runners = {label: (lambda s=s: s.run(None, {s.get_inputs()[0].name: next(iter(bench_inputs.values()))})) for label, s in sessions.items()}
    runners.update({f"TVM {k}": f for k, f in tvm_runs.items()})
    for fn in runners.values():
        fn(), fn()
    order = list(runners)
    for r in range(args.reps):
        for label in order[r % len(order):] + order[:r % len(order)]:
            start = time.perf_counter()
            runners[label]()
            times[label].append(1000 * (time.perf_counter() - start))
    rows = []
    for label in runners:
        if label.startswith("TVM "):  # the weights file the library reads (int8: dequantized, fp32)
            d = dirs[label.removeprefix("TVM ")]
            size = (d / json.loads((d / "manifest.json").read_text())["model"]["inference_weights"]).stat().st_size
        else:
            size = onnx_bytes(paths[label])
        rows.append({"model": name, "variant": label, "mb": size / 1e6, "ms": float(np.median(times[label])),
                     "quality": quality[label],
                     "ops": "TVM (untuned), weights file" if label.startswith("TVM ") else weight_ops(paths[label])})
    return rows


def table(rows: list[dict]) -> str:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        base = next(r for r in mine if r["variant"] == "fp32")
        metric = "test accuracy %" if model == "lenet" else "logits rel. RMS error vs fp32"
        header = f"| variant | size (MB) | size vs fp32 | latency (ms) | vs fp32 | {metric} | weight ops |"
        out += [f"\n**{model}** ({metric})\n", header, "|---|---:|---:|---:|---:|---:|---|"]
        for r in mine:
            q = f"{r['quality']:.2f}" if model == "lenet" else f"{r['quality']:.4f}"
            out.append(f"| {r['variant']} | {r['mb']:.3f} | {r['mb'] / base['mb']:.1%} | {r['ms']:.3f} | "
                       f"{base['ms'] / r['ms']:.2f}× | {q} | {r['ops']} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["lenet", "gpt2"], choices=["lenet", "gpt2", "gpt2-full", "resnet50"],
                   help="gpt2-full and resnet50: the full-size specs with random weights (minutes and GBs per build)")
    p.add_argument("--variants", nargs="*", default=[], help=f"only these lbdlc builds (fp32 always): {', '.join(LBDLC)}")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--seq", type=int, default=64, help="GPT-2 tokens per run (batch 1)")
    p.add_argument("--gpt2-set", nargs="*", default=[], help="more --set overrides for the small GPT-2")
    p.add_argument("--lenet-weights", help="trained lenet weights (default: train now, ~20 s to minutes)")
    p.add_argument("--tvm", action="store_true", help="also time the (untuned) TVM libraries of lbdlc's builds")
    p.add_argument("--no-tools", action="store_true", help="leave out torch.onnx.export + onnxruntime.quantization")
    p.add_argument("--write-readme", action="store_true")
    args = p.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    import onnxruntime

    rows = []
    with tempfile.TemporaryDirectory(prefix="lbdlc-qbench-") as tmp:
        for name in args.models:
            (Path(tmp) / name).mkdir()
            rows += bench(name, args, Path(tmp))
    cpu = cpu_int8()
    head = (f"{platform.processor() or platform.machine()}, AVX2 {cpu['avx2']}, VNNI {cpu['vnni']}; onnxruntime "
            f"{onnxruntime.__version__}; median of {args.reps} runs at batch 1"
            + (f"; GPT-2: {args.seq} tokens" if any(m.startswith("gpt2") for m in args.models) else "")
            + (f"; small GPT-2: {' '.join(GPT2_SMALL + list(args.gpt2_set))}" if "gpt2" in args.models else ""))
    text = head + "\n" + table(rows)
    print(text)
    if args.write_readme:
        readme = ROOT / "benchmarks" / "README.md"
        body = readme.read_text()
        section = f"{MARK_BEGIN}\n{text}\n{MARK_END}"
        if MARK_BEGIN in body:
            body = body[:body.index(MARK_BEGIN)] + section + body[body.index(MARK_END) + len(MARK_END):]
        else:
            body = body.rstrip("\n") + "\n\n" + section + "\n"
        readme.write_text(body)


if __name__ == "__main__":
    main()
