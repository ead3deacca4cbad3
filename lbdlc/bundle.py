"""Deployment bundles: one self-contained directory per target, in <build>/deploy/<target>/.

A bundle holds what a device needs to run the model and nothing of lbdlc:

    model.tvm.so         the TVM library for the target (a .so for this machine's architecture,
                         or for another one when its cross compiler is installed)
    model.tvm.tar        for another CPU architecture: the library's object files, which TVM
                         links on the device (always there for cross targets: no toolchain needed)
    model.onnx           the ONNX model (fp16 for fp16 targets), for ONNX Runtime
    weights.safetensors  the TVM library's parameters, in `parameter_order`
    manifest.json        signature, target, files and their hashes ("format": "lbdlc-bundle/1")
    README.md            the input/output signature and how to run it
    run.py               a runner that needs only numpy and tvm.runtime or onnxruntime

Bundles are built inside the build's temporary directory, so they appear (or not) together
with the rest of the build. The code is compiled per target from the build's inference graph:
the same passes, the same weights as model.onnx and model.tvm.so.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import time
from pathlib import Path

from .errors import SpecError
from .source import loc_of
from .targets import DeployTarget, cross_compiler, parse_cli, resolve_all

FORMAT = "lbdlc-bundle/1"
DEPLOY_DIR = "deploy"
LIBRARY, OBJECTS = "model.tvm.so", "model.tvm.tar"
WEIGHTS = "weights.safetensors"
RUNNER = "run.py"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chosen_targets(loaded, options) -> list[DeployTarget]:
    """--target (replaces the spec's list), else the spec's `deploy.targets`, else none."""
    if options.targets:
        entries = [parse_cli(t) if isinstance(t, str) else t for t in options.targets]
        return resolve_all(entries)
    deploy = getattr(loaded.spec, "deploy", None)
    if deploy is None:
        return []
    locs = [loc_of(loaded.raw, ("deploy", "targets", k)) for k in range(len(deploy.targets))]
    return resolve_all(list(deploy.targets), locs)


def static_dims(graph, options) -> dict[str, int]:
    """Symbolic dimensions fixed in the deploy libraries: --static NAME=N; with --tune every
    symbolic dimension (1 unless given)."""
    symbols = list(graph.symbols())
    fixed: dict[str, int] = {}
    for item in options.static or ():
        name, _, value = item.partition("=")
        if name not in symbols:
            raise SpecError(f"--static {item}: the model has no symbolic dimension '{name}'",
                            hint=f"its symbolic dimensions: {', '.join(symbols)}" if symbols else "its shapes are all fixed")
        if not value.isdigit() or int(value) < 1:
            raise SpecError(f"--static {item}: expected NAME=SIZE with a positive size, e.g. --static {name}=8")
        fixed[name] = int(value)
    if options.tune:
        for s in symbols:
            fixed.setdefault(s, 1)
    return fixed


def _shape(shape: list, dims: dict[str, int]) -> list:
    import sympy

    out = []
    for d in shape:
        if isinstance(d, int) or not dims:
            out.append(d)
            continue
        value = sympy.sympify(d).subs({sympy.Symbol(k): v for k, v in dims.items()})
        out.append(int(value) if value.is_Integer else str(value))
    return out


def write_bundles(loaded, optimized, build: Path, options, previous: Path | None = None, log=None) -> dict:
    """Bundles for the chosen targets into `build`/deploy; the manifest entries for them
    (`deploy`, and `tuning` with --tune). Nothing (an empty dict) when no target is chosen."""
    from .tune import carry_over

    targets = chosen_targets(loaded, options)
    carry_over(previous, build)  # tuning databases outlive builds without --tune
    if not targets:
        if options.tune:
            raise SpecError("--tune tunes a deploy target's library: name one", hint="e.g. --target cpu --tune 64")
        return {}
    runtimes = [b for b in ("tvm", "onnx") if b in options.backends]
    if not runtimes:
        raise SpecError("deploy bundles need the tvm or onnx backend", hint="add -b tvm and/or -b onnx")
    if options.tune and "tvm" not in runtimes:
        raise SpecError("--tune tunes the TVM library: the build needs the tvm backend", hint="add -b tvm")
    dims = static_dims(optimized.graph, options)
    if options.tune:
        from .targets import gpu_present
        from .tune import require_meta_schedule

        for t in targets:  # MetaSchedule measures candidates here, on this machine's CPU or GPU
            if t.cross:
                raise SpecError(f"--tune measures schedules on the target, and target '{t.name}' is {t.arch} code this machine cannot run",
                                hint=f"tune on this machine's CPU (--target cpu --tune N), or build '{t.name}' without --tune")
            if t.gpu and not gpu_present():
                raise SpecError(f"--tune measures schedules on the target, and target '{t.name}' needs an NVIDIA GPU, which this machine lacks",
                                hint=f"build '{t.name}' without --tune (dlight's default GPU schedules), or tune on the GPU machine")
        require_meta_schedule()
    deploy, tuning = {}, {}
    for target in targets:
        start = time.perf_counter()
        info, tuned = write_bundle(loaded, optimized, target, build / DEPLOY_DIR / target.name, runtimes, dims, options, build, log)
        deploy[target.name] = info
        if tuned is not None:  # no timings in the manifest (it is reproducible): they are in the database's meta.json
            tuning[target.name] = tuned.to_json()
        if log:
            log(f"bundle {target.name}: {DEPLOY_DIR}/{target.name} ({time.perf_counter() - start:.1f} s)")
    return {"deploy": deploy, **({"tuning": tuning} if options.tune else {})}


def write_bundle(loaded, optimized, target: DeployTarget, out: Path, runtimes: list[str], dims: dict[str, int],
                 options, build: Path, log=None):
    from . import __version__
    from .analysis import summarize
    from .driver import tool_versions

    out.mkdir(parents=True)
    graph = optimized.graph
    summary = summarize(graph)
    order = graph.inference_params()
    files: dict[str, str] = {}  # name -> role
    tuned = None
    weights = {n: optimized.weights[n] for n in order}
    if target.precision == "fp16":
        import torch

        weights = {n: (w.to(torch.float16) if w.dtype == torch.float32 else w) for n, w in weights.items()}
    if "tvm" in runtimes:
        from safetensors.torch import save_file

        save_file({n: w.contiguous() for n, w in weights.items()}, str(out / WEIGHTS), metadata={"format": "pt"})
        files[WEIGHTS] = "weights"
        files.update(_write_tvm(graph, target, out, dims, options, build, log, holder := {}))
        tuned = holder.get("tuned")
    if "onnx" in runtimes:
        files.update(_write_onnx(build, out, target))
    inputs = [{**s, "shape": _shape(s["shape"], dims)} for s in summary.inputs]
    outputs = [{**s, "shape": _shape(s["shape"], dims)} for s in summary.outputs]
    model = {"name": graph.name, "inputs": inputs, "outputs": outputs, "params": summary.params,
             "flops_per_sample": summary.flops, "parameter_order": order, "static_dims": dims}
    run_tvm = {"library": LIBRARY if (out / LIBRARY).exists() else None, "objects": OBJECTS if (out / OBJECTS).exists() else None}
    manifest = {
        "format": FORMAT,
        "model": model,
        "target": target.describe(),
        "runtimes": {
            **({"tvm": {**run_tvm, "tuning": tuned.to_json() if tuned else None}} if "tvm" in runtimes else {}),
            **({"onnx": {"model": "model.onnx", "providers": target.ort_providers()}} if "onnx" in runtimes else {}),
        },
        "weights": WEIGHTS if "tvm" in runtimes else None,
        "spec": {"path": loaded.path.as_posix(), "sha256": sha256_bytes(loaded.text.encode("utf-8"))},
        "versions": tool_versions(),
        "lbdlc": __version__,
    }
    (out / RUNNER).write_text(runner_source(), encoding="utf-8")
    files[RUNNER] = "runner"

    def listing() -> dict:
        return {name: {"sha256": sha256_bytes((out / name).read_bytes()), "bytes": (out / name).stat().st_size, "role": role}
                for name, role in sorted(files.items())}

    manifest["files"] = listing()
    (out / "README.md").write_text(readme(manifest), encoding="utf-8")
    files["README.md"] = "readme"
    manifest["files"] = listing()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    entry = {"dir": f"{DEPLOY_DIR}/{target.name}", "target": manifest["target"], "runtimes": sorted(manifest["runtimes"]),
             "files": {n: {k: v for k, v in f.items() if k != "role"} for n, f in manifest["files"].items()},
             "manifest_sha256": sha256_bytes((out / "manifest.json").read_bytes())}
    return entry, tuned


def runner_source() -> str:
    from . import bundle_runtime

    return Path(bundle_runtime.__file__).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------
# TVM


def relax_module(graph, target: DeployTarget, dims: dict[str, int]):
    """The graph as Relax for `target`: symbolic dims fixed, fp16 parameters for fp16 targets."""
    from tvm import relax

    from .backends.tvm import to_relax

    mod = to_relax(graph)
    if dims:
        mod = relax.transform.BindSymbolicVars(dict(dims))(mod)
    if target.precision == "fp16":
        mod = relax.transform.ToMixedPrecision(out_dtype="float32")(mod)
        mod = fp16_parameters(mod, {n for n in graph.inference_params() if graph.params[n].dtype == "float32"})
    return mod


def fp16_parameters(mod, names: set[str]):
    """`main` takes the named fp32 parameters as fp16 (half the bytes in weights.safetensors and
    in memory). TVM 0.27's ToMixedPrecision(fp16_input_names=...) fails ("no block is being
    built"), so this is done here: each parameter becomes fp16 with a cast to fp32 at the top of
    the dataflow block, and the casts back to fp16 that ToMixedPrecision put before conv2d and
    matmul cancel out (fp16 -> fp32 -> fp16 is exact)."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    func = mod["main"]
    n_inputs = int(func.attrs["num_input"])
    params, prologue = [], []
    for i, p in enumerate(func.params):
        if i >= n_inputs and p.name in names and p.ty.dtype == "float32":
            half = relax.Var(p.name, relax.TensorType(p.ty.shape, "float16"))
            params.append(half)
            prologue.append(relax.VarBinding(p, relax.op.astype(half, "float32")))
        else:
            params.append(p)
    blocks = list(func.body.blocks)
    blocks[0] = relax.DataflowBlock(prologue + list(blocks[0].bindings))
    func = relax.Function(params, relax.SeqExpr(blocks, func.body.body), func.ret_ty, func.is_pure, func.attrs)
    source = wildcard()
    widened = is_op("relax.astype")(source)

    def cancel(expr, matches):
        same = matches[source].ty.dtype == expr.ty.dtype and matches[widened].ty.dtype == "float32"
        return matches[source] if same else expr

    return tvm.IRModule({"main": rewrite_call(is_op("relax.astype")(widened), cancel, func)})


def compile_for(graph, target: DeployTarget, dims: dict[str, int], tune: int | None = None, build: Path | None = None, log=None):
    """Relax -> zero pipeline (fusion) -> tuned schedules (--tune) -> GPU default schedules
    (dlight) -> the reproducible build pipeline -> executable. Returns (executable, Tuned|None)."""
    import tvm
    from tvm import relax

    from .backends.tvm import canonical_shape_funcs

    tvm_target = target.tvm_target()
    mod = relax_module(graph, target, dims)
    # lbdlc's default CPU schedules (backends/tvm_schedule.py); with --tune they are the first
    # candidates the tuner measures, and schedule what it leaves.
    cpu_default = not target.gpu
    if cpu_default:
        from .backends.tvm_schedule import cpu_legalize

        mod = cpu_legalize(mod)
    with tvm_target:
        mod = relax.get_pipeline("zero")(mod)
    tuned = None
    if tune:
        from .tune import tune as run_tuning

        mod, tuned = run_tuning(mod, tvm_target, target.name, tune, build, log)
    if cpu_default:
        from .backends.tvm_schedule import schedule_cpu

        mod = schedule_cpu(mod, tvm_target)  # the functions not already scheduled
    if target.gpu:
        from tvm.s_tir import dlight as dl

        # TVM's default GPU schedules. In TVM 0.27 the Matmul rule takes minutes (lenet: 100 s for
        # one 256x120 matmul) or fails (mobilenet_v2) on mixed-precision matmuls and convolutions
        # (fp16 inputs, fp32 accumulation, casts fused around them): fp16 builds schedule those
        # with the GEMV, reduction and fallback rules.
        rules = [dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
        if target.precision != "fp16":
            rules.insert(0, dl.gpu.Matmul())
        with tvm_target:
            mod = dl.ApplyDefaultSchedule(*rules)(mod)
    reproducible = tvm.transform.module_pass(canonical_shape_funcs, opt_level=0, name="CanonicalShapeFuncs")
    build_pipeline = tvm.transform.Sequential([relax.get_pipeline("default_build"), reproducible])
    return tvm.compile(mod, target=tvm_target, relax_pipeline=build_pipeline), tuned


def reproducible_tar(output: str, files: list[str]) -> None:
    """TVM's tar fcompile, byte-reproducible: sorted names, no timestamps or owners."""
    with tarfile.open(output, "w", format=tarfile.USTAR_FORMAT) as tar:
        for path in sorted(files, key=lambda p: Path(p).name):
            data = Path(path).read_bytes()
            info = tarfile.TarInfo(Path(path).name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
            tar.addfile(info, io.BytesIO(data))


reproducible_tar.output_format = "tar"


def _write_tvm(graph, target: DeployTarget, out: Path, dims, options, build: Path, log, holder: dict) -> dict[str, str]:
    try:
        executable, tuned = compile_for(graph, target, dims, options.tune, build, log)
    except SpecError:
        raise
    except Exception as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"TVM could not compile {graph.name} for target '{target.name}': {message}") from exc
    holder["tuned"] = tuned
    files = {}
    if not target.cross:
        executable.export_library(str(out / LIBRARY))
        files[LIBRARY] = "library"
        return files
    executable.export_library(str(out / OBJECTS), fcompile=reproducible_tar)
    files[OBJECTS] = "objects"
    compiler = cross_compiler(target)
    if compiler:
        from tvm.support import cc

        executable.export_library(str(out / LIBRARY), fcompile=cc.cross_compiler(compiler))
        files[LIBRARY] = "library"
    return files


def object_machines(tar_path: Path) -> dict[str, int]:
    """ELF e_machine of each object in a .tar (183 = aarch64, 62 = x86-64)."""
    out = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            data = tar.extractfile(member).read(20)
            if data[:4] != b"\x7fELF":
                out[member.name] = -1
                continue
            out[member.name] = int.from_bytes(data[18:20], "little" if data[5] == 1 else "big")
    return out


def elf_machine(path: Path) -> int:
    data = Path(path).read_bytes()[:20]
    return int.from_bytes(data[18:20], "little" if data[5] == 1 else "big") if data[:4] == b"\x7fELF" else -1


# ----------------------------------------------------------------------------------------
# ONNX


def _write_onnx(build: Path, out: Path, target: DeployTarget) -> dict[str, str]:
    source = build / "model.onnx"
    if not source.exists():
        raise SpecError("the onnx backend wrote no model.onnx to bundle")
    if target.precision == "fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = onnx.load(str(source))
        half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
        onnx.save_model(half, str(out / "model.onnx"))
        return {"model.onnx": "onnx"}
    shutil.copyfile(source, out / "model.onnx")
    files = {"model.onnx": "onnx"}
    if (build / "model.onnx.data").exists():
        shutil.copyfile(build / "model.onnx.data", out / "model.onnx.data")
        files["model.onnx.data"] = "onnx weights"
    return files


# ----------------------------------------------------------------------------------------
# README


def _sig(values: list[dict]) -> str:
    return "\n".join(f"| `{v['name']}` | [{', '.join(map(str, v['shape']))}] | {v['dtype']} |" for v in values)


def readme(manifest: dict) -> str:
    m, t, r = manifest["model"], manifest["target"], manifest["runtimes"]
    symbolic = sorted({d for v in m["inputs"] for d in v["shape"] if isinstance(d, str)})
    lines = [
        f"# {m['name']} for {t['name']}",
        "",
        f"Built by lbdlc {manifest['lbdlc']} from `{manifest['spec']['path']}` for target `{t['name']}`"
        f" ({t['device']}, {t['arch']}, {t['precision']}). {m['params']:,} parameters, {m['flops_per_sample']:,} FLOPs per sample.",
        "",
        "## Signature",
        "",
        "| input | shape | dtype |",
        "|---|---|---|",
        _sig(m["inputs"]),
        "",
        "| output | shape | dtype |",
        "|---|---|---|",
        _sig(m["outputs"]),
        "",
    ]
    if symbolic:
        lines += [f"Symbolic dimensions ({', '.join(symbolic)}) take any size at run time.", ""]
    if m["static_dims"]:
        lines += ["The TVM library is built for fixed sizes: " + ", ".join(f"{k} = {v}" for k, v in m["static_dims"].items())
                  + " (model.onnx keeps them symbolic).", ""]
    lines += ["## Files", "", "| file | bytes | what |", "|---|---:|---|"]
    what = {"library": "TVM library", "objects": "TVM object files (linked by TVM when loaded)", "weights": "TVM library parameters",
            "onnx": "ONNX model", "onnx weights": "ONNX external weights", "runner": "runner", "readme": "this file"}
    for name, f in manifest["files"].items():
        lines.append(f"| `{name}` | {f['bytes']:,} | {what.get(f['role'], f['role'])} |")
    lines += ["| `README.md` | | this file |", "| `manifest.json` | | signature, target, files and their hashes |", "", "## Run", ""]
    lines += ["`run.py` needs numpy and one runtime, nothing from lbdlc:", "", "```sh"]
    if "tvm" in r:
        lines.append("pip install numpy apache-tvm      # TVM runtime")
    if "onnx" in r:
        lines.append(f"pip install numpy {'onnxruntime-gpu' if t['device'] == 'cuda' else 'onnxruntime'}   # or ONNX Runtime")
    lines += [
        "python run.py --input x.npy                    # prints the outputs",
        "python run.py --input x.npy --output y.npz     # saves them by output name",
        "python run.py --bench                          # latency: median, p90, throughput",
        "```", "",
    ]
    notes = []
    if "tvm" in r and t["cross"]:
        if r["tvm"].get("library"):
            notes.append(f"`model.tvm.so` is {t['arch']} code, linked with the cross compiler; `model.tvm.tar` holds the same objects.")
        else:
            notes.append(f"`model.tvm.tar` holds {t['arch']} object files: TVM links them when loading, with the device's "
                         "C++ compiler (`apt-get install g++` there).")
    if t["device"] == "cuda":
        notes.append("The TVM library carries its CUDA kernels as CUDA C, compiled when loaded: the GPU machine needs "
                     "`pip install cuda-bindings` (NVRTC), or the CUDA toolkit and `TVM_CUDA_COMPILE_MODE=nvcc`.")
        if "onnx" in r:
            notes.append("ONNX Runtime runs with CUDAExecutionProvider; run.py stops with an error if it did not load "
                         "(ONNX Runtime would otherwise fall back to the CPU silently).")
    if "tvm" in r and t["device"] != "cuda":
        notes.append("Calling the TVM library without run.py: `packed = vm[\"main_transform_params\"](weights)` once, with the "
                     "weights in the manifest's `parameter_order` (it packs them for the CPU kernels), then "
                     "`vm[\"main\"](*inputs, *packed)` for each run.")
    if t["precision"] == "fp16":
        notes.append("fp16: weights and compute in half precision, inputs and outputs in fp32, accumulation in fp32.")
    if "tvm" in r and r["tvm"].get("tuning"):
        tu = r["tvm"]["tuning"]
        notes.append(f"The TVM library is tuned with MetaSchedule ({tu['trials']} trials over {tu['tasks']} tasks).")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)
