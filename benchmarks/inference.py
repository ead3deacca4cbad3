"""Inference latency on CPU at batch 1: lbdlc's artifacts against the path users take today.

For each model (ResNet-50 at 224×224, GPT-2 small at 128 tokens, ViT-B/16 at 224×224), from
one spec and one set of weights:

- PyTorch eager: the generated model.py, eval mode, `torch.inference_mode()`;
- torch.onnx.export + ORT: that module exported with `torch.onnx.export(dynamo=True)`
  (dynamic batch and sequence axes, as a deployment would), run by ONNX Runtime with its
  default graph optimizations;
- lbdlc -O0 ONNX: `lbdlc build -O0` (the spec op for op) in ONNX Runtime;
- lbdlc -O2 ONNX: `lbdlc build -O2` (batch norms folded, linear/conv + bias + residual +
  activation fused, dropout removed) in ONNX Runtime;
- lbdlc TVM: the -O2 build's TVM library, untuned, with lbdlc's default CPU schedules
  (backends/tvm_schedule.py: packed, register-tiled, vectorized and parallel matmul and
  conv2d kernels; TVM 0.27 itself schedules nothing for CPUs);
- lbdlc TVM host: the same, compiled for this machine's CPU (`--target cpu`: LLVM's host CPU
  name, so AVX2 and FMA here) instead of the default library's generic x86-64;
- lbdlc TVM naive (`--naive-tvm`): the same graph with TVM's naive loops, as before those
  schedules (slow: minutes per model at full size).

Every latency is a median over repetitions; the variants take turns (round robin, the order
rotating), and each timed run directly follows an untimed run of the same variant. The script also prints each
model's FLOPs and the machine's matmul rate measured in the same run (a large fp32 MatMul
through ONNX Runtime), so each latency can be read against that roofline: "of peak" is
FLOPs / latency / matmul rate. Outputs of every variant are checked against eager PyTorch.

    python benchmarks/inference.py                         # all models, 10 repetitions
    python benchmarks/inference.py --models gpt2 --reps 5 --no-tvm
    python benchmarks/inference.py --write-readme          # also replace the section in benchmarks/README.md
    python benchmarks/inference.py --models mlp lenet resnet50_64 gpt2_256 --naive-tvm   # small sizes, naive TVM too
"""
from __future__ import annotations

import argparse
import gc
import logging
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from lbdlc.driver import BuildOptions, build
from lbdlc.ir import per_sample  # noqa: F401  (documentation: FLOPs here are for the stated sizes)

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "resnet50": {"spec": "specs/resnet50.yaml", "sizes": {"batch": 1}, "what": "224×224 image"},
    "gpt2": {"spec": "specs/gpt2.yaml", "sizes": {"batch": 1, "seq": 128}, "what": "128 tokens"},
    "vit_b16": {"spec": "specs/vit_b16.yaml", "sizes": {"batch": 1}, "what": "224×224 image"},
    # smaller sizes, for quick comparisons (not in the default run)
    "mlp": {"spec": "specs/mlp.yaml", "sizes": {"batch": 1}, "what": "50 features", "small": True},
    "lenet": {"spec": "specs/lenet.yaml", "sizes": {"batch": 1}, "what": "28×28 image", "small": True},
    "resnet50_64": {"spec": "specs/resnet50.yaml", "sizes": {"batch": 1}, "what": "64×64 image, 10 classes", "small": True,
                    "overrides": ["inputs.image.shape=[batch, 3, 64, 64]", "classes=10"]},
    "gpt2_256": {"spec": "specs/gpt2.yaml", "sizes": {"batch": 1, "seq": 128}, "what": "2 layers of width 256, 128 tokens", "small": True,
                 "overrides": ["n_layer=2", "d_model=256", "n_head=4", "vocab=2000"]},
}
DEFAULT_MODELS = [m for m, cfg in MODELS.items() if not cfg.get("small")]
VARIANTS = ["PyTorch eager", "torch.onnx.export + ORT", "lbdlc -O0 ONNX", "lbdlc -O2 ONNX", "lbdlc TVM", "lbdlc TVM host", "lbdlc TVM naive"]
BASELINE = "torch.onnx.export + ORT"
MARK_BEGIN, MARK_END = "<!-- inference.py: begin -->", "<!-- inference.py: end -->"


def median_ms(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def session(path_or_bytes) -> ort.InferenceSession:
    """ONNX Runtime as a user gets it: default options (all graph optimizations), CPU."""
    return ort.InferenceSession(path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes),
                                providers=["CPUExecutionProvider"])


def matmul_rate(m: int = 1024, k: int = 1024, n: int = 4096, reps: int = 10) -> float:
    """GFLOP/s of one large fp32 MatMul in ONNX Runtime: the roofline the latencies are read against."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k]), helper.make_tensor_value_info("b", TensorProto.FLOAT, [k, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    s = session(model.SerializeToString())
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((m, k), dtype=np.float32), "b": rng.standard_normal((k, n), dtype=np.float32)}
    ms = median_ms(lambda: s.run(None, feeds), reps)
    return 2 * m * k * n / (ms / 1000) / 1e9


def flops(graph, sizes: dict[str, int]) -> int:
    """FLOPs of one forward pass at these sizes (the ops' cost rules, multiply-add = 2)."""
    from lbdlc import ops

    total = 0
    for n in graph.nodes:
        f = ops.get(n.op).flops(n.attrs, [v.type for v in n.inputs], [v.type for v in n.outputs])
        total += int(f) if isinstance(f, int) else int(f.subs({s: sizes.get(str(s), 1) for s in f.free_symbols}))
    return total


def inputs_for(graph, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for v in graph.inputs:
        shape = [d if isinstance(d, int) else int(d.subs({s: sizes[str(s)] for s in d.free_symbols})) for d in v.type.shape]
        out[v.name] = (rng.standard_normal(shape).astype(np.float32) if v.type.dtype.startswith("float")
                       else rng.integers(0, 1000, shape).astype(np.int64))
    return out


def load_module(out_dir: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    namespace: dict = {}
    exec(compile((out_dir / "model.py").read_text(), str(out_dir / "model.py"), "exec"), namespace)
    model = namespace["Model"]()
    model.load_state_dict(load_file(str(out_dir / "weights.safetensors")))
    return model.eval()


def export_torch(model: torch.nn.Module, inputs: dict[str, np.ndarray], graph, path: Path) -> str:
    """torch.onnx.export(dynamo=True) with the spec's symbolic dims dynamic; static if that fails."""
    args = tuple(torch.from_numpy(v) for v in inputs.values())
    dims = {}
    dynamic = {}
    for v in graph.inputs:
        axes = {}
        for k, d in enumerate(v.type.shape):
            if not isinstance(d, int) and d.is_Symbol:
                name = str(d)
                dims.setdefault(name, torch.export.Dim(name, min=1, max=1024 if name == "seq" else 4096))
                axes[k] = dims[name]
        dynamic[v.name] = axes
    try:
        torch.onnx.export(model, args, str(path), dynamo=True, dynamic_shapes=dynamic, verbose=False)
        return "dynamic axes"
    except Exception as exc:  # noqa: BLE001 - a failed dynamic export still gives a static one to time
        logging.getLogger(__name__).info("dynamic export failed (%s); exporting static shapes", exc)
        torch.onnx.export(model, args, str(path), dynamo=True, verbose=False)
        return "static shapes"


def run_tvm_factory(out_dir: Path, inputs: dict[str, np.ndarray], executable=None):
    """The build's TVM library (or `executable`, compiled here for the same parameter order)."""
    import json

    import tvm
    from safetensors.numpy import load_file
    from tvm import relax

    model = json.loads((out_dir / "manifest.json").read_text())["model"]
    weights = load_file(str(out_dir / model.get("inference_weights", "weights.safetensors")))
    device = tvm.cpu()
    vm = relax.VirtualMachine(executable or tvm.runtime.load_module(str(out_dir / "model.tvm.so")), device)
    args = [tvm.runtime.tensor(v, device) for v in inputs.values()] + [tvm.runtime.tensor(weights[n], device) for n in model["parameter_order"]]
    fn = vm["main"]

    def run():
        r = fn(*args)
        return [r.numpy()] if isinstance(r, tvm.runtime.Tensor) else [t.numpy() for t in r]

    return run


def bench_model(name: str, reps: int, tvm_reps: int, work: Path, use_tvm: bool, naive_tvm: bool = False) -> dict:
    from lbdlc.lower import load, lower

    cfg = MODELS[name]
    spec, sizes, overrides = ROOT / cfg["spec"], cfg["sizes"], tuple(cfg.get("overrides", ()))
    graph = lower(load(spec, list(overrides)))
    inputs = inputs_for(graph, sizes)
    row = {"model": name, "what": cfg["what"], "flops": flops(graph, sizes), "ms": {}, "diff": {}, "notes": []}

    start = time.perf_counter()
    o0 = build(spec, work / f"{name}_o0", BuildOptions(level=0, backends=("pytorch", "onnx"), overrides=overrides)).out_dir
    row["build_o0_s"] = time.perf_counter() - start
    backends = ("onnx", "tvm") if use_tvm else ("onnx",)
    start = time.perf_counter()
    o2 = build(spec, work / f"{name}_o2", BuildOptions(level=2, backends=backends, weights=o0 / "weights.safetensors", overrides=overrides)).out_dir
    row["build_o2_s"] = time.perf_counter() - start

    model = load_module(o0)
    targs = tuple(torch.from_numpy(v) for v in inputs.values())

    def eager():
        with torch.inference_mode():
            out = model(*targs)
        return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]

    reference = eager()
    runners = {"PyTorch eager": eager}
    exported = work / f"{name}_torch.onnx"
    row["notes"].append(f"torch.onnx.export: {export_torch(model, inputs, graph, exported)}")
    sessions = {BASELINE: session(exported), "lbdlc -O0 ONNX": session(o0 / "model.onnx"), "lbdlc -O2 ONNX": session(o2 / "model.onnx")}
    for label, s in sessions.items():
        feeds = dict(zip([i.name for i in s.get_inputs()], inputs.values()))
        runners[label] = (lambda s=s, feeds=feeds: s.run(None, feeds))
    if use_tvm:
        runners["lbdlc TVM"] = run_tvm_factory(o2, inputs)
    if use_tvm:
        from lbdlc.backends.tvm import compile_library
        from lbdlc.passes import PassManager
        from lbdlc.passes.pipeline import LEVELS

        from lbdlc.targets import host_target

        optimized = PassManager(LEVELS[2]).run(lower(load(spec, list(overrides)))).graph  # the -O2 graph (weights from the build)
        runners["lbdlc TVM host"] = run_tvm_factory(o2, inputs, compile_library(optimized, host_target()))
        if naive_tvm:
            runners["lbdlc TVM naive"] = run_tvm_factory(o2, inputs, compile_library(optimized, schedule=False))
    for label, run in runners.items():
        got = run()
        row["diff"][label] = max(float(np.abs(np.asarray(g, np.float64) - r).max()) for g, r in zip(got, reference))
    # Round robin over the variants, the order rotating every repetition, so that a shared
    # machine's changing load reaches all of them alike. Each timed run directly follows an
    # untimed run of the same variant: the runtime before it (ONNX Runtime's and PyTorch's
    # worker threads spin for a while after a run) must not slow it down.
    slow = ("lbdlc TVM naive",)
    fast = [label for label in runners if label not in slow]
    times = {label: [] for label in runners}
    for r in range(reps):
        for label in fast[r % len(fast):] + fast[:r % len(fast)]:
            runners[label]()
            start = time.perf_counter()
            runners[label]()
            times[label].append(time.perf_counter() - start)
    for label in [s for s in slow if s in runners]:
        for _ in range(tvm_reps):
            start = time.perf_counter()
            runners[label]()
            times[label].append(time.perf_counter() - start)
    for label in runners:
        row["ms"][label] = 1000 * statistics.median(times[label])
        print(f"  {name:9} {label:26} {row['ms'][label]:10.1f} ms   max |diff| vs eager {row['diff'][label]:.1e}", flush=True)
    del sessions, runners, model
    gc.collect()
    return row


def table(rows: list[dict], rate: float) -> str:
    lines = [
        "| model | FLOPs | " + " | ".join(VARIANTS) + " |",
        "|---|---:|" + "---:|" * len(VARIANTS),
    ]
    for r in rows:
        cells = []
        base = r["ms"].get(BASELINE)
        for v in VARIANTS:
            ms = r["ms"].get(v)
            if ms is None:
                cells.append("n/a")
                continue
            ratio = f" ({ms / base:.2f}×)" if base else ""
            peak = r["flops"] / (ms / 1000) / 1e9 / rate
            cells.append(f"{ms:,.1f} ms{ratio}, {100 * peak:.0f}%")
        lines.append(f"| {r['model']} ({r['what']}) | {r['flops'] / 1e9:.2f} G | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SHORT = {BASELINE: "export + ORT", "lbdlc -O0 ONNX": "-O0", "lbdlc -O2 ONNX": "-O2", "lbdlc TVM": "TVM", "lbdlc TVM host": "TVM host", "lbdlc TVM naive": "TVM naive"}


def readme_section(rows: list[dict], rate: float, reps: int, tvm_reps: int) -> str:
    diffs = "; ".join(f"{r['model']} " + ", ".join(f"{SHORT[v]} {d:.0e}" for v, d in r["diff"].items() if v in SHORT) for r in rows)
    builds = "; ".join(f"{r['model']} {r['build_o0_s']:.1f} s / {r['build_o2_s']:.1f} s" for r in rows)
    exports = ", ".join(f"{r['model']} {r['notes'][0].split(': ', 1)[1]}" for r in rows)
    return f"""{MARK_BEGIN}
Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} with {torch.get_num_threads()} threads (torch {torch.__version__},
onnxruntime {ort.__version__}); median of {reps} runs, each right after an untimed run of the same
variant, variants in rotating order ({tvm_reps} runs for TVM naive, if measured). Matmul rate in the same run:
**{rate:.1f} GFLOP/s** (fp32 1024×1024×4096 MatMul in ONNX Runtime, mean of the start and the
end of the run). Each cell: median latency (ratio to torch.onnx.export + ORT), and the share
of the matmul rate it reaches (FLOPs / latency / matmul rate).

{table(rows, rate)}

Max |difference| to eager PyTorch: {diffs}. Build time (-O0 pytorch + onnx / -O2 onnx{" + tvm" if any("lbdlc TVM" in r["ms"] for r in rows) else ""}):
{builds}. torch.onnx.export: {exports}.
{MARK_END}"""


def write_readme(section: str) -> None:
    path = ROOT / "benchmarks" / "README.md"
    text = path.read_text()
    if MARK_BEGIN in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + section + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## inference.py: latency at batch 1 on CPU\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--tvm-reps", type=int, default=2, help="runs of the naive TVM library (--naive-tvm), slow on CPU")
    parser.add_argument("--naive-tvm", action="store_true", help="also time TVM's naive loops (no lbdlc schedules): minutes per model")
    parser.add_argument("--no-tvm", action="store_true", help="skip the TVM library (its build and runs take minutes)")
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    rate = matmul_rate()
    print(f"matmul rate (ONNX Runtime, fp32 1024x1024x4096): {rate:.1f} GFLOP/s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows.append(bench_model(name, args.reps, args.tvm_reps, Path(tmp), not args.no_tvm, args.naive_tvm))
    rate_end = matmul_rate()
    print(f"matmul rate at the end: {rate_end:.1f} GFLOP/s", flush=True)
    rate = statistics.mean([rate, rate_end])
    print()
    print(table(rows, rate))
    if args.write_readme:
        write_readme(readme_section(rows, rate, args.reps, args.tvm_reps))
        print("\nwrote benchmarks/README.md")


if __name__ == "__main__":
    main()
