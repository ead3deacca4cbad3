"""Helpers of the pass tests: run a graph (before or after passes) in ONNX Runtime, in the
generated PyTorch module, or in TVM, straight from memory, and compare."""
from __future__ import annotations

import numpy as np
import torch

from lbdlc.ir import Graph
from lbdlc.lower import load, lower
from lbdlc.passes import PassManager

TOLERANCE = 1e-5  # fp32, max abs diff: a pass preserves meaning up to rounding (issue [5/10])


def spec_graph(path, overrides=()) -> Graph:
    return lower(load(path, list(overrides)))


def inputs_for(graph: Graph, sizes: dict[str, int] | None = None, seed: int = 0, int_high: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = sizes or {}
    out = {}
    for v in graph.inputs:
        shape = [d if isinstance(d, int) else int(d.subs({s: sizes.get(str(s), 2) for s in d.free_symbols})) for d in v.type.shape]
        if v.type.dtype.startswith("float"):
            out[v.name] = rng.standard_normal(shape).astype(np.float32)
        else:
            out[v.name] = rng.integers(0, int_high, shape).astype(np.int64)
    return out


def run_onnx(graph: Graph, weights: dict, inputs: dict, opset: int = 20) -> list[np.ndarray]:
    import onnxruntime as ort

    from lbdlc.backends.onnx import to_onnx

    model = to_onnx(graph, weights, opset)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def run_pytorch(graph: Graph, weights: dict, inputs: dict) -> list[np.ndarray]:
    from lbdlc.backends.pytorch import generate

    namespace: dict = {}
    exec(compile(generate(graph, "spec.yaml", None, "test"), "model.py", "exec"), namespace)
    model = namespace["Model"]()
    model.load_state_dict({n: weights[n] for n in model.state_dict()})
    model.eval()
    with torch.no_grad():
        result = model(*(torch.from_numpy(v) for v in inputs.values()))
    return [r.numpy() for r in (result if isinstance(result, tuple) else (result,))]


def run_tvm(graph: Graph, weights: dict, inputs: dict, schedule: bool = True) -> list[np.ndarray]:
    """The graph's TVM library (`schedule=False`: TVM's naive loops) on these weights and inputs."""
    import tvm
    from tvm import relax

    from lbdlc.backends.tvm import compile_library
    from lbdlc.bundle_runtime import tvm_parameters

    device = tvm.cpu()
    vm = relax.VirtualMachine(compile_library(graph, schedule=schedule), device)
    params = tvm_parameters(vm, [tvm.runtime.tensor(weights[n].numpy(), device) for n in graph.inference_params()])
    result = vm["main"](*[tvm.runtime.tensor(v, device) for v in inputs.values()], *params)
    return [r.numpy() for r in ([result] if isinstance(result, tvm.runtime.Tensor) else list(result))]


RUNNERS = {"onnx": run_onnx, "pytorch": run_pytorch, "tvm": run_tvm}


def write_artifacts(graph: Graph, weights: dict, out, spec, backends=()):
    """The build directory lbdlc.verify runs (model.py, weights, and the ONNX/TVM artifacts
    in `backends`), written straight from a pass manager's graph and weights."""
    import json

    from safetensors.torch import save_file

    from lbdlc.backends import onnx as onnx_backend
    from lbdlc.backends import pytorch as pytorch_backend
    from lbdlc.backends import tvm as tvm_backend

    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "weights.safetensors"))
    pytorch_backend.write(graph, out, str(spec), None, "test")
    if "onnx" in backends:
        onnx_backend.write(graph, weights, out)
    if "tvm" in backends:
        tvm_backend.write(graph, out)
    (out / "manifest.json").write_text(json.dumps({"model": {"parameter_order": graph.inference_params()}}))
    return out


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert len(a) == len(b)
    worst = 0.0
    for x, y in zip(a, b):
        assert x.shape == y.shape, (x.shape, y.shape)
        if x.size:
            worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))))
    return worst


def before_after(graph: Graph, weights: dict, passes: list[str], inputs: dict, backend: str = "onnx", mode: str = "inference"):
    """Run `passes`; return (result, max abs diff of the outputs before and after)."""
    result = PassManager(passes, mode).run(graph, weights)
    run = RUNNERS[backend]
    return result, max_diff(run(graph, weights, inputs), run(result.graph, result.weights, inputs))
