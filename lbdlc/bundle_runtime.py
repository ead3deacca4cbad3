#!/usr/bin/env python3
"""Run an lbdlc deployment bundle with numpy and one runtime: TVM (`tvm.runtime`) or ONNX Runtime.

This file is copied into every bundle as run.py and imports nothing from lbdlc, so a board
with only numpy and the runtime installed can run the model:

    python run.py --input x.npy                  # print the outputs
    python run.py --input x.npy --output y.npz   # save them (.npz by output name, or .npy)
    python run.py --input image=x.npy ...        # name the input (models with several inputs)
    python run.py --bench --runs 50              # latency: median, p90, throughput
    python run.py --runtime onnx ...             # pick the runtime (default: TVM when its library runs here)

The bundle's manifest.json says what is in it: the model's signature, the target, the TVM
library and its parameter order, the ONNX model and its execution providers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FORMAT = "lbdlc-bundle/1"
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                      "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_,
                "uint8": np.uint8, "int8": np.int8}
ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64"}


class BundleError(Exception):
    """Something the user can fix: a wrong input, a missing runtime, the wrong machine."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint


def read_manifest(bundle: Path) -> dict:
    path = Path(bundle) / "manifest.json"
    if not path.is_file():
        raise BundleError(f"{bundle} is not an lbdlc bundle (no manifest.json)", "bundles are in <build>/deploy/<target>; build one with `lbdlc build SPEC --target cpu`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{bundle} is not an lbdlc bundle ({path.name} is not a bundle manifest)",
                          "bundles are in <build>/deploy/<target>; build one with `lbdlc build SPEC --target cpu`")
    return manifest


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file as numpy arrays, without the safetensors package (the format is an
    8-byte little-endian header length, a JSON header, then the raw tensors)."""
    data = Path(path).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    base = 8 + length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise BundleError(f"{path}: tensor {name} has dtype {info['dtype']}, which numpy cannot hold")
        dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
        start, end = info["data_offsets"]
        count = (end - start) // dtype.itemsize
        tensors[name] = np.frombuffer(data, dtype=dtype, count=count, offset=base + start).reshape(info["shape"])
    return tensors


def machine_arch() -> str:
    arch = platform.machine().lower()
    return ARCH_ALIASES.get(arch, arch)


def physical_cores(cpuinfo: str | None = None, allowed: set[int] | None = None) -> int:
    """Physical cores this process may run on: distinct (package, core) pairs of its allowed
    CPUs in /proc/cpuinfo (Linux), else the number of allowed logical CPUs."""
    if allowed is None:
        try:
            allowed = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            return os.cpu_count() or 1
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return len(allowed)
    cores = set()
    for block in cpuinfo.split("\n\n"):
        fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in block.splitlines() if ":" in line)}
        if fields.get("processor", "").isdigit() and int(fields["processor"]) in allowed:
            cores.add((fields.get("physical id"), fields.get("core id", fields["processor"])))
    return len(cores) or len(allowed)


def use_all_cores() -> None:
    """TVM's CPU thread pool: one worker per physical core, as ONNX Runtime's default. Left to
    itself TVM takes half the logical CPUs on x86 (it assumes two hyper-threads per core), so
    on a 2-vCPU VM or a container without hyper-threading it ran on 1 core of 2. Read when the
    pool starts (the first parallel kernel); TVM_NUM_THREADS or OMP_NUM_THREADS, if set, win."""
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())


TRANSFORM_PARAMS = "main_transform_params"


def tvm_parameters(vm, params: list) -> list:
    """The weights as the library's `main` reads them. A CPU library packs its weights into
    its kernels' layouts in `main_transform_params` (TVM's LiftTransformParams), run once here
    when the weights are loaded instead of on every call; a library without it (GPU targets)
    reads them as stored."""
    try:
        transform = vm[TRANSFORM_PARAMS]
    except AttributeError:
        return params
    return list(transform(params))


def cuda_devices() -> int:
    """NVIDIA GPUs the driver sees here (0 without a driver), asked of libcuda directly so that
    neither runtime gets to try, fail and fall back first."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


NO_GPU = BundleError("this bundle runs on an NVIDIA GPU, and this machine has none (no CUDA driver or device)",
                     "run it on the GPU machine: `python run.py` there, with apache-tvm (plus `pip install cuda-bindings`, "
                     "which TVM uses to compile the kernels when loading) or onnxruntime-gpu")


class TVMSession:
    """The bundle's TVM library on the Relax VM: main(inputs..., parameters...)."""

    runtime = "tvm"

    def __init__(self, bundle: Path, manifest: dict):
        use_all_cores()
        try:
            import tvm
            from tvm.runtime import vm as tvm_vm
        except ImportError:
            raise BundleError("the TVM runtime is not installed", "pip install apache-tvm (or use --runtime onnx)") from None
        bundle = Path(bundle)
        target, lib = manifest["target"], manifest["runtimes"]["tvm"]
        if target["arch"] != machine_arch():
            raise BundleError(
                f"this bundle's TVM library is {target['arch']} machine code, and this machine is {machine_arch()}",
                f"copy the bundle to the {target['arch']} device and run `python run.py` there"
                + ("; model.onnx runs here: --runtime onnx" if "onnx" in manifest["runtimes"] else ""))
        if target["device"] == "cuda":
            if not cuda_devices():
                raise NO_GPU
            if not tvm.runtime.enabled("cuda"):
                raise BundleError("this TVM has no CUDA runtime", "pip install apache-tvm (the PyPI wheel has it)")
            self.device = tvm.cuda(0)
        else:
            self.device = tvm.cpu(0)
        path = bundle / lib["library"] if lib.get("library") and (bundle / lib["library"]).is_file() else None
        if path is None:  # objects only (a cross build without the cross compiler): link them here
            path = bundle / lib["objects"]
        try:
            self.module = tvm.runtime.load_module(str(path))
        except Exception as exc:  # noqa: BLE001
            hint = ("linking the .tar of objects needs a C++ compiler on this machine: apt-get install g++"
                    if str(path).endswith(".tar") else None)
            raise BundleError(f"TVM could not load {path.name}: {str(exc).strip().splitlines()[-1]}", hint) from None
        self.tvm = tvm
        self.vm = tvm_vm.VirtualMachine(self.module, self.device)
        weights = read_safetensors(bundle / manifest["weights"])
        stored = [tvm.runtime.tensor(np.ascontiguousarray(weights[n]), self.device) for n in manifest["model"]["parameter_order"]]
        self.params = tvm_parameters(self.vm, stored)
        self.inputs = manifest["model"]["inputs"]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        tvm = self.tvm
        args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[s["name"]]), self.device) for s in self.inputs]
        result = self.vm["main"](*args, *self.params)
        results = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        return [r.numpy() for r in results]


class ONNXSession:
    """model.onnx in ONNX Runtime with the target's execution providers."""

    runtime = "onnx"

    def __init__(self, bundle: Path, manifest: dict):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BundleError("ONNX Runtime is not installed",
                              "pip install onnxruntime (onnxruntime-gpu for GPU bundles), or use --runtime tvm") from None
        providers = manifest["runtimes"]["onnx"]["providers"]
        if "CUDAExecutionProvider" in providers and not cuda_devices():
            raise NO_GPU
        available = ort.get_available_providers()
        if providers[0] not in available:
            raise BundleError(f"this bundle runs ONNX Runtime with {providers[0]}, which this onnxruntime lacks (it has {', '.join(available)})",
                              "pip install onnxruntime-gpu (in place of onnxruntime) and run it on the GPU machine")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # no provider fallback chatter: it is checked below
        self.session = ort.InferenceSession(str(Path(bundle) / manifest["runtimes"]["onnx"]["model"]), options, providers=providers)
        # ONNX Runtime falls back to the CPU silently when a provider fails to load.
        if providers[0] not in self.session.get_providers():
            raise BundleError(f"ONNX Runtime did not load {providers[0]} (it runs with {', '.join(self.session.get_providers())})",
                              "check the NVIDIA driver, CUDA and cuDNN versions that this onnxruntime-gpu needs")
        self.inputs = manifest["model"]["inputs"]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, {s["name"]: inputs[s["name"]] for s in self.inputs})


SESSIONS = {"tvm": TVMSession, "onnx": ONNXSession}


def runtimes(manifest: dict) -> list[str]:
    return [r for r in ("tvm", "onnx") if r in manifest["runtimes"]]


def open_session(bundle: Path, runtime: str | None = None, manifest: dict | None = None):
    """A session on `runtime`, or on the first of the bundle's runtimes that works here."""
    manifest = manifest or read_manifest(bundle)
    have = runtimes(manifest)
    if runtime is not None:
        if runtime not in have:
            raise BundleError(f"this bundle has no {runtime} model (it has: {', '.join(have) or 'none'})",
                              "build with that backend: lbdlc build SPEC --target ... (-b tvm -b onnx)")
        return SESSIONS[runtime](bundle, manifest)
    errors = []
    for r in have:
        try:
            return SESSIONS[r](bundle, manifest)
        except BundleError as exc:
            errors.append(exc)
    if not errors:
        raise BundleError("this bundle holds no model")
    if len(errors) == 1 or all(e is errors[0] for e in errors):
        raise errors[0]
    raise BundleError("; ".join(e.message for e in errors), " / ".join(e.hint for e in errors if e.hint) or None)


def resolve_shape(spec: dict, dims: dict[str, int]) -> list[int]:
    return [d if isinstance(d, int) else int(dims.get(d, 1)) for d in spec["shape"]]


def check_inputs(manifest: dict, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inputs by name, checked against the signature (names, ranks, fixed sizes, dtypes)."""
    specs = manifest["model"]["inputs"]
    names = [s["name"] for s in specs]
    unknown = [n for n in inputs if n not in names]
    if unknown:
        raise BundleError(f"the model has no input '{unknown[0]}'", f"its inputs: {', '.join(names)}")
    missing = [n for n in names if n not in inputs]
    if missing:
        raise BundleError(f"input '{missing[0]}' is missing", f"give each input: {' '.join(f'--input {n}=FILE.npy' for n in names)}")
    dims: dict[str, int] = {}
    checked = {}
    for s in specs:
        x = np.asarray(inputs[s["name"]])
        want = NUMPY_DTYPES[s["dtype"]]
        if x.dtype != want:
            if np.issubdtype(x.dtype, np.floating) != np.issubdtype(want, np.floating):
                raise BundleError(f"input '{s['name']}' is {x.dtype}, the model takes {s['dtype']}")
            x = x.astype(want)
        shape = s["shape"]
        if x.ndim != len(shape):
            raise BundleError(f"input '{s['name']}' has shape {list(x.shape)}, the model takes [{', '.join(map(str, shape))}]")
        for got, d in zip(x.shape, shape):
            if isinstance(d, int) and got != d or isinstance(d, str) and dims.setdefault(d, got) != got:
                raise BundleError(f"input '{s['name']}' has shape {list(x.shape)}, the model takes [{', '.join(map(str, shape))}]"
                                  + (f" with {d} = {dims[d]}" if isinstance(d, str) else ""))
        checked[s["name"]] = x
    return checked


def random_inputs(manifest: dict, dims: dict[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for s in manifest["model"]["inputs"]:
        shape = resolve_shape(s, dims or {})
        dtype = NUMPY_DTYPES[s["dtype"]]
        out[s["name"]] = rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating) else rng.integers(0, 2, shape).astype(dtype)
    return out


def load_inputs(manifest: dict, items: list[str]) -> dict[str, np.ndarray]:
    """--input values: FILE.npy (the only input), NAME=FILE.npy, or FILE.npz (arrays by input name)."""
    names = [s["name"] for s in manifest["model"]["inputs"]]
    inputs: dict[str, np.ndarray] = {}
    for item in items:
        name, _, path = item.rpartition("=")
        if not Path(path).is_file():
            raise BundleError(f"no such input file: {path}")
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            inputs.update({k: data[k] for k in data.files})
        elif name:
            inputs[name] = data
        elif len(names) == 1:
            inputs[names[0]] = data
        else:
            raise BundleError(f"the model has {len(names)} inputs: name each one", f"{' '.join(f'--input {n}=FILE.npy' for n in names)}")
    return check_inputs(manifest, inputs)


def save_outputs(manifest: dict, outputs: list[np.ndarray], path: str) -> None:
    names = [o["name"] for o in manifest["model"]["outputs"]]
    if path.endswith(".npy"):
        if len(outputs) != 1:
            raise BundleError(f"the model has {len(outputs)} outputs; a .npy file holds one", "save to a .npz file")
        np.save(path, outputs[0])
    else:
        np.savez(path, **dict(zip(names, outputs)))


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of sorted values (numpy's default method)."""
    return float(np.percentile(np.asarray(sorted_values), q))


def bench(session, inputs: dict[str, np.ndarray], runs: int = 50, warmup: int = 5, repeats: int = 3) -> dict:
    """Latency of one call (numpy in, numpy out) over `repeats` rounds of `runs` calls after
    `warmup` calls: median and p90 over all calls, the median of each round, throughput."""
    for _ in range(warmup):
        session.run(inputs)
    rounds = []
    for _ in range(repeats):
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(inputs)
            times.append(time.perf_counter() - start)
        rounds.append(times)
    every = sorted(t for r in rounds for t in r)
    batch = next((int(x.shape[0]) for x in inputs.values() if x.ndim), 1)
    median = percentile(every, 50)
    return {
        "runtime": session.runtime, "batch": batch, "runs": runs * repeats, "warmup": warmup,
        "median_ms": 1e3 * median, "p90_ms": 1e3 * percentile(every, 90), "min_ms": 1e3 * every[0],
        "mean_ms": 1e3 * float(np.mean(every)), "round_medians_ms": [1e3 * percentile(sorted(r), 50) for r in rounds],
        "throughput_per_s": batch / median if median > 0 else float("inf"),
    }


def parse_dims(items: list[str]) -> dict[str, int]:
    dims = {}
    for item in items:
        name, _, value = item.partition("=")
        if not value.isdigit():
            raise BundleError(f"--dim {item}: expected NAME=SIZE, e.g. --dim batch=8")
        dims[name] = int(value)
    return dims


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", default=[], help="FILE.npy, NAME=FILE.npy or FILE.npz (repeatable)")
    parser.add_argument("--output", help="save the outputs: FILE.npz (by output name) or FILE.npy (one output)")
    parser.add_argument("--runtime", choices=sorted(SESSIONS), help="tvm or onnx (default: the first that runs here)")
    parser.add_argument("--bench", action="store_true", help="measure latency on random inputs instead")
    parser.add_argument("--runs", type=int, default=50, help="timed calls per round (--bench)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (--bench)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (--bench)")
    parser.add_argument("--dim", action="append", default=[], help="size of a symbolic dimension, NAME=SIZE (--bench; default 1)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    try:
        manifest = read_manifest(HERE)
        session = open_session(HERE, args.runtime, manifest)
        if args.bench:
            result = bench(session, random_inputs(manifest, parse_dims(args.dim)), args.runs, args.warmup, args.repeats)
            if args.json:
                print(json.dumps(result, indent=2))
            else:
                print(f"{manifest['model']['name']} on {manifest['target']['name']} ({result['runtime']}), batch {result['batch']}: "
                      f"median {result['median_ms']:.3f} ms, p90 {result['p90_ms']:.3f} ms, "
                      f"{result['throughput_per_s']:.1f} samples/s over {result['runs']} runs")
            return 0
        if not args.input:
            raise BundleError("give an input: --input FILE.npy (or --bench)")
        outputs = session.run(load_inputs(manifest, args.input))
        if args.output:
            save_outputs(manifest, outputs, args.output)
        names = [o["name"] for o in manifest["model"]["outputs"]]
        if args.json:
            print(json.dumps({n: o.tolist() for n, o in zip(names, outputs)}))
        elif not args.output:
            for n, o in zip(names, outputs):
                print(f"{n}: {o.dtype} {list(o.shape)}")
                print(np.array2string(o, threshold=64, precision=6))
        return 0
    except BundleError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
