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

Method. This process builds every artifact first (the -O0 and -O2 builds, the
torch.onnx.export file, the TVM libraries), and saves the inputs and eager PyTorch's outputs.
Then each variant is timed in a fresh process (`inference.py --worker VARIANT --work DIR`)
that imports only its own runtime (torch, onnxruntime or tvm), warms up, times `--reps` runs
and checks its outputs against eager PyTorch's (max |difference|). Why: PyTorch, ONNX Runtime
and TVM each keep a thread pool whose threads spin for a while after a run, so in one process
on a 2-core machine they slow each other (ONNX Runtime's ResNet-50 took 108 ms next to the
others and 50 ms alone). The variants run in rounds (`--rounds`, default 3), the order
rotating every round, a fresh process per variant per round, so that a shared machine's
changing load reaches all of them alike; a latency is the median over all rounds' timed runs,
and the spread of the round medians shows the noise. The TVM process calls
`lbdlc.bundle_runtime.use_all_cores()` before importing tvm (TVM would take half the logical
CPUs on x86) and passes the weights through the library's `main_transform_params`, if it has
one, once at load (`lbdlc.bundle_runtime.tvm_parameters`, as a bundle's run.py does). Every
process reports the threads its runtime used. The naive TVM library runs in one round only
(`--tvm-reps` runs).

The script also measures the machine's matmul rate (a large fp32 MatMul through ONNX Runtime,
in its own process, at the start and the end) and each model's FLOPs, so each latency can be
read against that roofline: "of peak" is FLOPs / latency / matmul rate.

    python benchmarks/inference.py                         # all models, 3 rounds of 10 runs
    python benchmarks/inference.py --models gpt2 --reps 5 --no-tvm
    python benchmarks/inference.py --write-readme          # also replace the section in benchmarks/README.md
    python benchmarks/inference.py --models mlp lenet resnet50_64 gpt2_256 --naive-tvm   # small sizes, naive TVM too
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

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
BASELINE = "torch.onnx.export + ORT"
NAIVE = "lbdlc TVM naive"
RUNTIME = {"PyTorch eager": "torch", BASELINE: "onnxruntime", "lbdlc -O0 ONNX": "onnxruntime", "lbdlc -O2 ONNX": "onnxruntime",
           "lbdlc TVM": "tvm", "lbdlc TVM host": "tvm", NAIVE: "tvm"}
VARIANTS = list(RUNTIME)
SHORT = {"PyTorch eager": "eager", BASELINE: "export + ORT", "lbdlc -O0 ONNX": "-O0", "lbdlc -O2 ONNX": "-O2", "lbdlc TVM": "TVM",
         "lbdlc TVM host": "TVM host", NAIVE: "TVM naive"}
MATMUL = "matmul"  # the worker that measures the matmul rate
MARK_BEGIN, MARK_END = "<!-- inference.py: begin -->", "<!-- inference.py: end -->"
RESULT = "RESULT "  # prefix of the worker's JSON line on stdout


# ---------------------------------------------------------------- worker: one runtime per process

def live_threads() -> int:
    """Threads of this process now (Linux; 0 elsewhere)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def as_list(outputs) -> list[np.ndarray]:
    return [np.asarray(o) for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]


def load_module(build: Path):
    """The generated model.py with the build's weights, in eval mode."""
    from safetensors.torch import load_file

    namespace: dict = {}
    exec(compile((build / "model.py").read_text(), str(build / "model.py"), "exec"), namespace)  # noqa: S102 - lbdlc's own output
    model = namespace["Model"]()
    model.load_state_dict(load_file(str(build / "weights.safetensors")))
    return model.eval()


def forward(model, args: tuple) -> list[np.ndarray]:
    import torch

    with torch.inference_mode():
        out = model(*args)
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def torch_runner(artifact: dict, inputs: dict[str, np.ndarray]):
    import torch

    model = load_module(Path(artifact["build"]))
    args = tuple(torch.from_numpy(v) for v in inputs.values())
    return (lambda: forward(model, args)), torch.get_num_threads


def session(path_or_bytes):
    """ONNX Runtime as a user gets it: default options (all graph optimizations), CPU, and the
    number of threads in its intra-op pool (the caller's thread and the ones the session starts)."""
    import onnxruntime as ort

    before = live_threads()
    s = ort.InferenceSession(path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes),
                             providers=["CPUExecutionProvider"])
    return s, live_threads() - before + 1


def ort_runner(artifact: dict, inputs: dict[str, np.ndarray]):
    s, threads = session(artifact["onnx"])
    feeds = dict(zip([i.name for i in s.get_inputs()], inputs.values()))
    return (lambda: s.run(None, feeds)), (lambda: threads)


def tvm_runner(artifact: dict, inputs: dict[str, np.ndarray]):
    """A TVM library with the -O2 build's weights (packed into its kernels' layouts once, here, as
    a deployment does), on every physical core. tvm_ffi imports torch if it can; blocking that
    keeps torch's thread pool out of this process."""
    sys.modules.setdefault("torch", None)  # `import torch` now raises ImportError
    from lbdlc.verify import tvm_model

    fn, params = tvm_model(Path(artifact["build"]), Path(artifact["library"]))
    import tvm
    import tvm_ffi

    args = [tvm.runtime.tensor(v, tvm.cpu()) for v in inputs.values()] + params

    def run():
        r = fn(*args)
        return [r.numpy()] if isinstance(r, tvm.runtime.Tensor) else [t.numpy() for t in r]

    return run, tvm_ffi.get_global_func("runtime.NumThreads")


RUNNERS = {"torch": torch_runner, "onnxruntime": ort_runner, "tvm": tvm_runner}


def timed_ms(run, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - start))
    return times


def max_diff(got: list[np.ndarray], reference: list[np.ndarray]) -> float:
    return max(float(np.abs(np.asarray(g, np.float64) - r).max()) for g, r in zip(as_list(got), reference))


def time_variant(variant: str, work: Path, reps: int, warmup: int) -> dict:
    """In a fresh process: load one variant, check its outputs (the first warm-up run), time it."""
    job = json.loads((work / "job.json").read_text())
    with np.load(work / "inputs.npz") as f:
        inputs = {name: f[name] for name in job["inputs"]}
    with np.load(work / "reference.npz") as f:
        reference = [f[f"out{k}"] for k in range(len(f.files))]
    run, threads = RUNNERS[RUNTIME[variant]](job["variants"][variant], inputs)
    diff = max_diff(run(), reference)
    for _ in range(warmup - 1):
        run()
    ms = timed_ms(run, reps)
    loaded = [m for m in ("torch", "onnxruntime", "tvm") if sys.modules.get(m) is not None]
    return {"ms": ms, "diff": diff, "threads": int(threads()), "runtimes_loaded": loaded}


def matmul_rate(m: int = 1024, k: int = 1024, n: int = 4096, reps: int = 10) -> dict:
    """GFLOP/s of one large fp32 MatMul in ONNX Runtime: the roofline the latencies are read against."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k]), helper.make_tensor_value_info("b", TensorProto.FLOAT, [k, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    s, threads = session(model.SerializeToString())
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((m, k), dtype=np.float32), "b": rng.standard_normal((k, n), dtype=np.float32)}
    s.run(None, feeds)
    ms = statistics.median(timed_ms(lambda: s.run(None, feeds), reps))
    return {"gflops": 2 * m * k * n / (ms / 1000) / 1e9, "threads": threads}


def worker_main(args) -> None:
    result = matmul_rate(reps=args.reps) if args.worker == MATMUL else time_variant(args.worker, Path(args.work), args.reps, args.warmup)
    print(RESULT + json.dumps(result), flush=True)


# ---------------------------------------------------------------- parent: build once, spawn workers

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


def export_torch(model, inputs: dict[str, np.ndarray], graph, path: Path) -> str:
    """torch.onnx.export(dynamo=True) with the spec's symbolic dims dynamic; static if that fails."""
    import torch

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


def build_lbdlc(spec: Path, work: Path, overrides: tuple, use_tvm: bool, row: dict) -> tuple[Path, Path]:
    """The -O0 (pytorch + onnx) and -O2 (onnx, and tvm's default library) builds, timed."""
    from lbdlc.driver import BuildOptions, build

    start = time.perf_counter()
    o0 = build(spec, work / "o0", BuildOptions(level=0, backends=("pytorch", "onnx"), overrides=overrides)).out_dir
    row["build_o0_s"] = time.perf_counter() - start
    start = time.perf_counter()
    backends = ("onnx", "tvm") if use_tvm else ("onnx",)
    o2 = build(spec, work / "o2", BuildOptions(level=2, backends=backends, weights=o0 / "weights.safetensors", overrides=overrides)).out_dir
    row["build_o2_s"] = time.perf_counter() - start
    return o0, o2


def tvm_libraries(spec: Path, overrides: tuple, o2: Path, work: Path, naive: bool) -> dict[str, dict]:
    """The build's default model.tvm.so, plus the -O2 graph compiled for this CPU (and naively)."""
    from lbdlc.backends.tvm import compile_library
    from lbdlc.passes import PassManager
    from lbdlc.passes.pipeline import LEVELS

    from lbdlc.lower import load, lower
    from lbdlc.targets import host_target

    optimized = PassManager(LEVELS[2]).run(lower(load(spec, list(overrides)))).graph  # the -O2 graph (weights from the build)
    libraries = {"lbdlc TVM": o2 / "model.tvm.so", "lbdlc TVM host": work / "host.tvm.so"}
    compile_library(optimized, host_target()).export_library(str(libraries["lbdlc TVM host"]))
    if naive:
        libraries[NAIVE] = work / "naive.tvm.so"
        compile_library(optimized, schedule=False).export_library(str(libraries[NAIVE]))
    return {v: {"library": str(path), "build": str(o2)} for v, path in libraries.items()}


def prepare(name: str, work: Path, use_tvm: bool, naive: bool) -> dict:
    """Build every artifact of one model into `work` and describe them in work/job.json; the
    row (FLOPs, build times, notes) gets the measurements later."""
    import torch

    from lbdlc.lower import load, lower

    cfg = MODELS[name]
    spec, sizes, overrides = ROOT / cfg["spec"], cfg["sizes"], tuple(cfg.get("overrides", ()))
    graph = lower(load(spec, list(overrides)))
    inputs = inputs_for(graph, sizes)
    row = {"model": name, "what": cfg["what"], "flops": flops(graph, sizes), "notes": []}
    o0, o2 = build_lbdlc(spec, work, overrides, use_tvm, row)
    model = load_module(o0)
    reference = forward(model, tuple(torch.from_numpy(v) for v in inputs.values()))
    exported = work / "torch.onnx"
    row["notes"].append(f"torch.onnx.export: {export_torch(model, inputs, graph, exported)}")
    variants = {"PyTorch eager": {"build": str(o0)}, BASELINE: {"onnx": str(exported)},
                "lbdlc -O0 ONNX": {"onnx": str(o0 / "model.onnx")}, "lbdlc -O2 ONNX": {"onnx": str(o2 / "model.onnx")}}
    if use_tvm:
        start = time.perf_counter()
        variants.update(tvm_libraries(spec, overrides, o2, work, naive))
        row["build_tvm_libs_s"] = time.perf_counter() - start
    np.savez(work / "inputs.npz", **inputs)
    np.savez(work / "reference.npz", **{f"out{k}": r for k, r in enumerate(reference)})
    (work / "job.json").write_text(json.dumps({"inputs": list(inputs), "variants": variants}, indent=1))
    row["variants"] = list(variants)
    return row


def spawn(worker: str, work: Path | None, reps: int, warmup: int) -> dict:
    """One worker in a fresh Python process: its JSON result, or {"error": ...}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--reps", str(reps), "--warmup", str(warmup)]
    if work is not None:
        cmd += ["--work", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail}"}


def schedule(variants: list[str], rounds: int) -> list[list[str]]:
    """The variants of each round, the order rotating by one every round; the naive TVM
    library (minutes per run at full size) in the first round only."""
    fast = [v for v in variants if v != NAIVE]
    order = [fast[r % len(fast):] + fast[:r % len(fast)] for r in range(rounds)]
    if NAIVE in variants:
        order[0].append(NAIVE)
    return order


def measure(row: dict, work: Path, args, threads: dict[str, set]) -> None:
    """Time every variant of one model, a fresh process per variant per round, into `row`."""
    runs: dict[str, list[list[float]]] = {v: [] for v in row["variants"]}
    row.update(diff={}, errors={}, runtimes_loaded={})
    for r, order in enumerate(schedule(row["variants"], args.rounds)):
        for v in order:
            result = spawn(v, work, args.tvm_reps if v == NAIVE else args.reps, 1 if v == NAIVE else args.warmup)
            if "error" in result:
                row["errors"][v] = result["error"]
                print(f"  {row['model']:11} round {r + 1}  {v:24} failed: {result['error']}", flush=True)
                continue
            runs[v].append(result["ms"])
            row["diff"][v] = max(row["diff"].get(v, 0.0), result["diff"])
            row["runtimes_loaded"][v] = result["runtimes_loaded"]
            threads.setdefault(RUNTIME[v], set()).add(result["threads"])
            print(f"  {row['model']:11} round {r + 1}  {v:24} {fmt_ms(statistics.median(result['ms'])):>9} ms   "
                  f"max |diff| vs eager {result['diff']:.1e}   {RUNTIME[v]} threads {result['threads']}", flush=True)
    row["ms"] = {v: statistics.median([t for ms in rounds for t in ms]) for v, rounds in runs.items() if rounds}
    row["round_ms"] = {v: [statistics.median(ms) for ms in rounds] for v, rounds in runs.items() if rounds}


def matmul(label: str) -> dict:
    result = spawn(MATMUL, None, reps=10, warmup=1)
    if "error" in result:
        raise SystemExit(f"matmul rate: {result['error']}")
    print(f"matmul rate {label} (ONNX Runtime, fp32 1024x1024x4096, {result['threads']} threads): {result['gflops']:.1f} GFLOP/s", flush=True)
    return result


# ---------------------------------------------------------------- report

def fmt_ms(ms: float) -> str:
    return f"{ms:,.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def fmt_flops(flops: int) -> str:
    return f"{flops / 1e9:.2f} G" if flops >= 1e8 else f"{flops / 1e6:.3g} M"


def table(rows: list[dict], rate: float) -> str:
    lines = ["| model | FLOPs | " + " | ".join(VARIANTS) + " |", "|---|---:|" + "---:|" * len(VARIANTS)]
    for r in rows:
        cells = []
        base = r["ms"].get(BASELINE)
        for v in VARIANTS:
            ms = r["ms"].get(v)
            if ms is None:
                cells.append("failed" if v in r["errors"] else "n/a")
                continue
            ratio = f" ({ms / base:.2f}×)" if base else ""
            peak = r["flops"] / (ms / 1000) / 1e9 / rate
            cells.append(f"{fmt_ms(ms)} ms{ratio}, {100 * peak:.0f}%")
        lines.append(f"| {r['model']} ({r['what']}) | {fmt_flops(r['flops'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spread(rows: list[dict]) -> str:
    """The lowest and highest round median of every variant: how far the rounds disagree."""
    parts = []
    for r in rows:
        cells = ", ".join(f"{SHORT[v]} {fmt_ms(min(m))}–{fmt_ms(max(m))}" for v, m in r["round_ms"].items() if len(m) > 1)
        if cells:
            parts.append(f"{r['model']}: {cells}")
    return "; ".join(parts)


THREAD_NOTES = {"torch": ("PyTorch", "torch.get_num_threads()"), "onnxruntime": ("ONNX Runtime", "intra-op pool, default options"),
                "tvm": ("TVM", "runtime.NumThreads after a run, one per physical core")}


def thread_counts(threads: dict[str, set]) -> str:
    return ", ".join(f"{THREAD_NOTES[rt][0]} {'/'.join(map(str, sorted(threads[rt])))} ({THREAD_NOTES[rt][1]})"
                     for rt in THREAD_NOTES if rt in threads)


def package_version(*names: str) -> str:
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            return version(name)
    return "?"


def readme_section(rows: list[dict], rates: tuple[float, float], threads: dict[str, set], args) -> str:
    rate = statistics.mean(rates)
    diffs = "; ".join(f"{r['model']} " + ", ".join(f"{SHORT[v]} {d:.0e}" for v, d in r["diff"].items() if v != "PyTorch eager") for r in rows)
    builds = "; ".join(f"{r['model']} {r['build_o0_s']:.1f} s / {r['build_o2_s']:.1f} s"
                       + (f" / {r['build_tvm_libs_s']:.1f} s" if "build_tvm_libs_s" in r else "") for r in rows)
    exports = ", ".join(f"{r['model']} {r['notes'][0].split(': ', 1)[1]}" for r in rows)
    noise = spread(rows)
    naive = f"; TVM naive: {args.tvm_reps} runs, in the first round only" if args.naive_tvm else ""
    flags = " --naive-tvm" if args.naive_tvm else " --no-tvm" if args.no_tvm else ""
    return f"""{MARK_BEGIN}
Measured {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()}, {os.cpu_count()} logical CPUs (torch {package_version("torch")},
onnxruntime {package_version("onnxruntime", "onnxruntime-gpu")}, tvm {package_version("apache-tvm")};
`python benchmarks/inference.py --models {" ".join(r["model"] for r in rows)} --rounds {args.rounds} --reps {args.reps}{flags}`).
Every artifact is built first; then each variant runs in a fresh process that imports only its
own runtime (in one process the runtimes' thread pools slow each other on 2 cores), one process
per runtime per round: {args.rounds} rounds, the order rotating, each {args.warmup} warm-up runs and
{args.reps} timed runs; a cell is the median of all {args.rounds * args.reps} timed runs{naive}.
Threads: {thread_counts(threads)}.
Matmul rate: **{rate:.1f} GFLOP/s** (fp32 1024×1024×4096 MatMul in ONNX Runtime, in its own process;
mean of {rates[0]:.1f} at the start and {rates[1]:.1f} at the end). Each cell: median latency (ratio to
torch.onnx.export + ORT), and the share of the matmul rate it reaches (FLOPs / latency / matmul
rate). "lbdlc TVM" is the build's default `model.tvm.so` (generic x86-64); "TVM host" the same
graph compiled for this CPU (`--target cpu`); both untuned, with lbdlc's default CPU schedules.

{table(rows, rate)}

{f"Round medians, lowest–highest (ms): {noise}." if noise else ""}
Max |difference| to eager PyTorch: {diffs}. Build time (-O0 pytorch + onnx / -O2 onnx{" + tvm / TVM host (and naive) libraries" if any("build_tvm_libs_s" in r for r in rows) else ""}):
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


def as_json(rows: list[dict], rates: tuple[float, float], threads: dict[str, set]) -> str:
    return json.dumps({"matmul_gflops": rates, "threads": {rt: sorted(n) for rt, n in threads.items()}, "rows": rows}, indent=1)


# ---------------------------------------------------------------- main

def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the variants, a fresh process per variant per round")
    parser.add_argument("--reps", type=int, default=10, help="timed runs per variant per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before them (the first checks the outputs)")
    parser.add_argument("--tvm-reps", type=int, default=2, help="runs of the naive TVM library (--naive-tvm), slow on CPU")
    parser.add_argument("--naive-tvm", action="store_true", help="also time TVM's naive loops (no lbdlc schedules): minutes per model")
    parser.add_argument("--no-tvm", action="store_true", help="skip the TVM library (its build and runs take minutes)")
    parser.add_argument("--write-readme", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the measurements to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: time one variant (or 'matmul') in this process
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1 or args.reps < 1 or args.warmup < 1:
        parser.error("--rounds, --reps and --warmup must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if args.worker:
        return worker_main(args)
    threads: dict[str, set] = {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for name in args.models:
            print(f"building {name}", flush=True)
            (work := Path(tmp) / name).mkdir()
            jobs.append((prepare(name, work, not args.no_tvm, args.naive_tvm), work))
        start = matmul("at the start")
        for row, work in jobs:
            measure(row, work, args, threads)
        end = matmul("at the end")
    rows = [row for row, _ in jobs]
    rates = (start["gflops"], end["gflops"])
    threads.setdefault("onnxruntime", set()).update({start["threads"], end["threads"]})
    print(f"\nthreads: {thread_counts(threads)}; median of {args.rounds} rounds × {args.reps} runs, a fresh process per variant per round\n")
    print(table(rows, statistics.mean(rates)))
    if noise := spread(rows):
        print(f"\nround medians, lowest–highest (ms): {noise}")
    if args.json:
        args.json.write_text(as_json(rows, rates, threads))
    if args.write_readme:
        write_readme(readme_section(rows, rates, threads, args))
        print("\nwrote benchmarks/README.md")


if __name__ == "__main__":
    main()
