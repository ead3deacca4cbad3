"""Compile time: `lbdlc build` (ONNX only) against `torch.onnx.export(dynamo=True)`.

Both start from the same model and weights and write an ONNX file with a dynamic batch
dimension, in one process after a warm-up run, so imports are not counted. lbdlc's time
covers the whole build: parse and validate the spec, lower it, load the weights, emit ONNX,
write weights and manifest. torch's time covers export and saving.

    python benchmarks/compile_time.py                # lenet and mlp, 7 repetitions
    python benchmarks/compile_time.py --specs specs/lenet.yaml --reps 11
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from lbdlc.driver import BuildOptions, build
from lbdlc.verify import random_inputs, run_pytorch

ROOT = Path(__file__).resolve().parent.parent


def load_generated(out_dir: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    namespace: dict = {}
    exec((out_dir / "model.py").read_text(), namespace)
    model = namespace["Model"]()
    model.load_state_dict(load_file(str(out_dir / "weights.safetensors")))
    return model.eval()


def time_lbdlc(spec: Path, weights: Path, work: Path, reps: int) -> list[float]:
    times = []
    for i in range(reps + 1):  # the first run warms caches and is dropped
        start = time.perf_counter()
        build(spec, work / f"lbdlc_{i}", BuildOptions(weights=weights, backends=("onnx",)))
        times.append(time.perf_counter() - start)
    return times[1:]


def time_torch(model: torch.nn.Module, inputs: dict[str, np.ndarray], work: Path, reps: int) -> list[float]:
    args = tuple(torch.from_numpy(v) for v in inputs.values())
    batch = torch.export.Dim("batch", min=1)
    dynamic = {name: {0: batch} for name in inputs}
    times = []
    for i in range(reps + 1):
        start = time.perf_counter()
        torch.onnx.export(model, args, str(work / f"torch_{i}.onnx"), dynamo=True, dynamic_shapes=dynamic, verbose=False)
        times.append(time.perf_counter() - start)
    return times[1:]


def max_diff(a: Path, b: Path, inputs) -> float:
    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, inputs) for p in (a, b)]
    return max(float(np.abs(x - y).max()) for x, y in zip(*outs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", nargs="+", type=Path, default=[ROOT / "specs/lenet.yaml", ROOT / "specs/mlp.yaml"])
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    rows = []
    for spec in args.specs:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            reference = build(spec, work / "reference", BuildOptions(backends=("pytorch",)))
            weights = reference.out_dir / "weights.safetensors"
            model = load_generated(reference.out_dir)
            inputs = random_inputs(work / "reference", {"batch": 4})
            ours = time_lbdlc(spec, weights, work, args.reps)
            theirs = time_torch(model, inputs, work, args.reps)
            diff = max_diff(work / "lbdlc_0" / "model.onnx", work / "torch_0.onnx", inputs)
            assert np.allclose(run_pytorch(reference.out_dir, inputs)[0], ort.InferenceSession(str(work / "lbdlc_0" / "model.onnx")).run(None, inputs)[0], atol=1e-4)
            rows.append((spec.stem, statistics.median(ours), statistics.median(theirs), diff))

    print(f"{'model':<8} {'lbdlc build (ms)':>17} {'torch.onnx.export (ms)':>23} {'speed-up':>9} {'max |diff|':>11}")
    for name, ours, theirs, diff in rows:
        print(f"{name:<8} {ours * 1e3:>17.1f} {theirs * 1e3:>23.1f} {theirs / ours:>8.1f}x {diff:>11.2e}")
    print(f"medians of {args.reps} runs each after one warm-up; torch {torch.__version__}")


if __name__ == "__main__":
    main()
