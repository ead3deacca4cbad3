"""Differential check of a build directory: the generated PyTorch module, ONNX Runtime and the
TVM library run on the same weights and inputs, and must agree.

Each runner uses only what a user of that artifact would have (model.py + safetensors,
model.onnx + onnxruntime, the TVM library + tvm.runtime), reading names and the parameter
order from manifest.json.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


def manifest(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "manifest.json").read_text())


def random_inputs(out_dir: Path, sizes: dict[str, int] | None = None, seed: int = 0, int_high: int = 2) -> dict[str, np.ndarray]:
    """Random inputs for the model's signature; symbolic dims take `sizes` (default 2).
    Integer inputs (token ids) are drawn from [0, int_high)."""
    rng = np.random.default_rng(seed)
    sizes = sizes or {}
    out = {}
    for spec in manifest(out_dir)["model"]["inputs"]:
        shape = [d if isinstance(d, int) else sizes.get(d, 2) for d in spec["shape"]]
        dtype = NUMPY_DTYPES[spec["dtype"]]
        if np.issubdtype(dtype, np.floating):
            out[spec["name"]] = rng.standard_normal(shape).astype(dtype)
        else:
            out[spec["name"]] = rng.integers(0, int_high, shape).astype(dtype)
    return out


def run_pytorch(out_dir: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    import torch
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    name = f"_lbdlc_generated_{abs(hash(out_dir.resolve()))}"
    spec = importlib.util.spec_from_file_location(name, out_dir / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    model = module.Model()
    model.load_state_dict(load_file(str(out_dir / "weights.safetensors")))
    model.eval()
    with torch.no_grad():
        result = model(*(torch.from_numpy(v) for v in inputs.values()))
    results = result if isinstance(result, tuple) else (result,)
    return [r.numpy() for r in results]


def run_onnx(out_dir: Path, inputs: dict[str, np.ndarray], providers=("CPUExecutionProvider",)) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(Path(out_dir) / "model.onnx"), providers=list(providers))
    return session.run(None, inputs)


def tvm_model(out_dir: Path, library: Path | None = None) -> tuple:
    """(main, its arguments after the inputs) of the build's TVM library, or of `library`
    (compiled from the build's graph, so with the same parameter order): the build's inference
    weights in `parameter_order`, packed once (bundle_runtime.tvm_parameters), TVM on every
    physical core."""
    from .bundle_runtime import tvm_parameters, use_all_cores

    use_all_cores()
    import tvm
    from safetensors.numpy import load_file
    from tvm import relax

    out_dir = Path(out_dir)
    model = manifest(out_dir)["model"]
    # weights.inference.safetensors when passes rewrote weights (batch-norm folding)
    weights = load_file(str(out_dir / model.get("inference_weights", "weights.safetensors")))
    device = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library or out_dir / "model.tvm.so")), device)
    params = tvm_parameters(vm, [tvm.runtime.tensor(weights[n], device) for n in model["parameter_order"]])
    return vm["main"], params


def run_tvm(out_dir: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    import tvm

    main, params = tvm_model(out_dir)
    result = main(*[tvm.runtime.tensor(v, tvm.cpu()) for v in inputs.values()], *params)
    results = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
    return [r.numpy() for r in results]


RUNNERS = {"pytorch": run_pytorch, "onnx": run_onnx, "tvm": run_tvm}


@dataclass
class Agreement:
    reference: str
    max_abs_diff: dict[str, float]  # backend -> worst difference to the reference over all outputs

    def ok(self, tolerance: float) -> bool:
        return all(d <= tolerance for d in self.max_abs_diff.values())


def compare(out_dir: Path, inputs: dict[str, np.ndarray], backends=("pytorch", "onnx", "tvm")) -> Agreement:
    """Run every backend on the same inputs; differences are measured against the first."""
    results = {b: RUNNERS[b](out_dir, inputs) for b in backends}
    reference, *others = backends
    diffs = {}
    for b in others:
        if len(results[b]) != len(results[reference]):
            raise AssertionError(f"{b} returned {len(results[b])} outputs, {reference} {len(results[reference])}")
        worst = 0.0
        for got, want in zip(results[b], results[reference]):
            if got.shape != want.shape:
                raise AssertionError(f"{b} output shape {got.shape} differs from {reference}'s {want.shape}")
            worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if got.size else 0.0)
        diffs[b] = worst
    return Agreement(reference, diffs)
