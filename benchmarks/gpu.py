"""GPU deployment: TVM CUDA (dlight default schedules) and ONNX Runtime's CUDA provider against
PyTorch on the same GPU, fp32 and fp16 bundles, for resnet50 and gpt2.

    python benchmarks/gpu.py                       # resnet50 and gpt2, fp32 and fp16
    python benchmarks/gpu.py --models resnet50 --reps 50 --json

Needs an NVIDIA GPU with its driver, onnxruntime-gpu (CUDA 12/13 and cuDNN 9 for its CUDA
provider), apache-tvm with `pip install cuda-bindings` (TVM 0.27 compiles the CUDA kernels of a
library when loading it) and a CUDA build of torch. Each model is built once with
`--target cuda --target cuda:fp16` (the `cuda` preset reads this GPU's compute capability);
every runtime gets the same random input; differences are to PyTorch fp32 on the GPU.
The ONNX Runtime session is checked to really run on CUDAExecutionProvider (it falls back to
the CPU silently otherwise). Latency: median and p90 of --reps calls after a warm-up, numpy
in to numpy out for TVM and ONNX Runtime, tensors already on the GPU for PyTorch.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "resnet50": {"spec": ROOT / "specs" / "resnet50.yaml", "dims": {"batch": 1}},
    "gpt2": {"spec": ROOT / "specs" / "gpt2.yaml", "dims": {"batch": 1, "seq": 128}},
}


def torch_gpu(build: Path, inputs: dict[str, np.ndarray], reps: int, warmup: int):
    import torch
    from safetensors.torch import load_file

    spec = importlib.util.spec_from_file_location("_bench_model", build / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.Model()
    model.load_state_dict(load_file(str(build / "weights.safetensors")))
    model = model.cuda().eval()
    args = [torch.from_numpy(v).cuda() for v in inputs.values()]
    with torch.no_grad():
        for _ in range(warmup):
            model(*args)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            out = model(*args)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    out = out if isinstance(out, tuple) else (out,)
    return [o.float().cpu().numpy() for o in out], times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="where to build (default: a temporary directory)")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from lbdlc import bundle_runtime as rt
    from lbdlc.driver import BuildOptions, build
    from lbdlc.targets import gpu_present

    if not gpu_present():
        print("error: no NVIDIA GPU here (TVM finds no CUDA device); run this on a GPU machine", file=sys.stderr)
        return 2
    work = args.out or Path(tempfile.mkdtemp(prefix="lbdlc-gpu-"))
    rows = []
    for name in args.models:
        cfg = MODELS[name]
        out = work / name
        start = time.perf_counter()
        build(cfg["spec"], out, BuildOptions(targets=("cuda", "cuda:fp16")))
        build_seconds = time.perf_counter() - start
        manifest = rt.read_manifest(out / "deploy" / "cuda")
        inputs = rt.random_inputs(manifest, cfg["dims"], seed=0)
        if name == "gpt2":  # token ids over the whole vocabulary
            inputs = {k: np.random.default_rng(0).integers(0, 50257, v.shape).astype(v.dtype) for k, v in inputs.items()}
        reference, times = torch_gpu(out, inputs, args.reps, args.warmup)
        rows.append({"model": name, "runtime": "pytorch", "precision": "fp32", "max_abs_diff": 0.0,
                     "median_ms": 1e3 * float(np.median(times)), "p90_ms": 1e3 * float(np.percentile(times, 90)), "build_s": None})
        for bundle in ("cuda", "cuda-fp16"):
            path = out / "deploy" / bundle
            m = rt.read_manifest(path)
            for runtime in ("tvm", "onnx"):
                session = rt.open_session(path, runtime, m)  # raises if CUDAExecutionProvider did not load
                if runtime == "onnx":
                    assert "CUDAExecutionProvider" in session.session.get_providers(), session.session.get_providers()
                got = session.run(rt.check_inputs(m, inputs))
                diff = max(float(np.abs(g.astype(np.float64) - r).max()) for g, r in zip(got, reference))
                result = rt.bench(session, rt.check_inputs(m, inputs), runs=args.reps, warmup=args.warmup, repeats=1)
                rows.append({"model": name, "runtime": runtime, "precision": m["target"]["precision"], "max_abs_diff": diff,
                             "median_ms": result["median_ms"], "p90_ms": result["p90_ms"], "build_s": round(build_seconds, 1)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<10} {'runtime':<8} {'precision':<9} {'max |diff| vs torch':>20} {'median ms':>10} {'p90 ms':>9}")
    for r in rows:
        print(f"{r['model']:<10} {r['runtime']:<8} {r['precision']:<9} {r['max_abs_diff']:>20.2e} {r['median_ms']:>10.3f} {r['p90_ms']:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
