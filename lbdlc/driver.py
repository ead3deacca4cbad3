"""The build driver: spec -> graph -> weights -> artifacts -> manifest, written atomically.

A build writes into a temporary sibling directory and renames it into place only when
every artifact is written, so a failed build leaves the previous output as it was.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from . import __version__
from .errors import SpecError
from .ir import Graph
from .lower import Loaded, load, lower
from .memory import human_size
from .weights import initialize, load_checked

BACKENDS = ("pytorch", "onnx", "tvm")


@dataclass
class BuildOptions:
    seed: int = 0
    weights: Path | None = None
    opset: int = 20
    backends: tuple[str, ...] = BACKENDS
    overrides: tuple[str, ...] = ()  # --set PATH=VALUE
    max_memory: int | None = None  # bytes a build may use; default half the machine's RAM
    strict: bool = False  # warnings (unused inputs or layers) become errors
    passes: tuple[str, ...] | None = None  # --passes: the pass list (passes/pipeline.py), over -O and the spec
    level: int | None = None  # -O: an optimization level 0..3, over the spec's `compile:`
    quantize: str | None = None  # -q: int8 | int8-dynamic | int8-static (ORT, lbdlc/quant_int8.py) | q8_0 | q4_0 | q4_1, over the spec's `quantize:` default
    targets: tuple = ()  # --target: deploy targets (lbdlc/targets.py), over the spec's `deploy:`; a bundle each
    tune: int | None = None  # --tune N: MetaSchedule trials for each target's TVM library (lbdlc/tune.py)
    static: tuple[str, ...] = ()  # --static NAME=N: a symbolic dimension fixed in the deploy libraries
    adapter: Path | tuple | None = None  # --adapter DIR (repeatable): PEFT LoRA adapters applied to the base (lbdlc/finetune.py)
    merge: bool = False  # --merge: fold the LoRA adapters into the base weights (lora_merge)
    adapter_weights: tuple[float, ...] = ()  # --adapter-weights: λ per adapter when several are merged (default 1 each)


@dataclass
class BuildResult:
    out_dir: Path
    graph: Graph
    manifest: dict
    artifacts: list[Path] = field(default_factory=list)
    warnings: list = field(default_factory=list)
    optimized: object = None  # passes.pipeline.Optimized: the graphs the backends ran on, and the pass logs


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tool_versions() -> dict[str, str | None]:
    def version(*dists: str) -> str | None:
        for d in dists:
            try:
                return metadata.version(d)
            except metadata.PackageNotFoundError:
                continue
        return None

    return {
        "lbdlc": __version__,
        "torch": version("torch"),
        "onnx": version("onnx"),
        "onnxruntime": version("onnxruntime-gpu", "onnxruntime"),
        "tvm": version("apache-tvm"),
        "safetensors": version("safetensors"),
    }


def build(spec_path: str | Path, out_dir: str | Path, options: BuildOptions = BuildOptions()) -> BuildResult:
    unknown = [b for b in options.backends if b not in BACKENDS]
    if unknown:
        raise SpecError(f"unknown backend '{unknown[0]}'", hint=f"choose from {', '.join(BACKENDS)}")
    loaded = load(spec_path, options.overrides)
    graph = lower(loaded, options.strict)
    from .lock import lock_warnings  # a lock file next to the spec that it no longer matches

    loaded.warnings += lock_warnings(loaded, list(options.overrides))
    _check_memory(loaded, graph, options.max_memory)
    from .finetune import prepare as finetune  # `finetune:` / --adapter / --merge: base weights, LoRA pass, merge

    finetuned = finetune(loaded, graph, options)
    if finetuned is not None:
        graph, weights = finetuned.graph, finetuned.weights
    else:
        weights = load_checked(graph, options.weights) if options.weights else initialize(graph, options.seed)
    from .passes.pipeline import choose, optimize

    pipeline = choose(loaded, list(options.passes) if options.passes is not None else None, options.level)
    from .passes.quantize import for_build  # weight-only quantization: -q, the spec's `quantize:`

    quantized = for_build(loaded, graph, weights, options.quantize)
    if quantized is None:
        optimized = optimize(loaded, graph, weights, pipeline, options.backends)
    else:
        optimized = optimize(loaded, quantized[0], quantized[1], pipeline, options.backends)
        optimized.log = quantized[2] + (optimized.log or [])
        if getattr(loaded.spec, "train", None) is not None and "pytorch" in options.backends:
            fp32 = optimize(loaded, graph, weights, pipeline, ("pytorch",))  # train.py trains model.py in fp32
            optimized.pytorch_graph, optimized.pytorch_weights = fp32.pytorch_graph, fp32.pytorch_weights
            optimized.pytorch_log, optimized.pytorch_mode = fp32.pytorch_log, fp32.pytorch_mode
    optimized.finetune_train = finetuned.train if finetuned is not None else None  # what train.py trains and saves

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.building-"))
    try:
        artifacts = _write_artifacts(loaded, optimized, tmp, options)
        from .quant_build import after_artifacts  # int8 of model.onnx (onnxruntime.quantization), error vs fp32

        artifacts, quant_entries = after_artifacts(loaded, graph, weights, optimized, tmp, artifacts, options, quantized)
        manifest = _manifest(loaded, graph, options, tmp, artifacts, optimized)
        manifest.update(quant_entries)
        if quantized is not None:  # per matrix: format, bits, bytes before/after, dequantized weight error
            manifest["quantization"] = quantized[3]
        if finetuned is not None:  # base weights, adapters, trainable fraction, merged or not
            manifest["finetune"] = finetuned.report
        if getattr(optimized, "checkpointing", None) is not None:  # blocks recomputed, bytes saved, extra FLOPs
            manifest["checkpointing"] = optimized.checkpointing.to_json()
        from .bundle import write_bundles  # deploy targets: a self-contained bundle each, in deploy/ (lbdlc/bundle.py)

        manifest.update(write_bundles(loaded, optimized, tmp, options, out_dir if out_dir.is_dir() else None))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    artifacts = [out_dir / p.name for p in artifacts] + [out_dir / "manifest.json"]
    return BuildResult(out_dir, graph, manifest, artifacts, loaded.warnings, optimized)


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1, "uint8": 1}
# A build holds the weights about three times at its peak: the tensors, the ONNX protobuf,
# and the serialised safetensors buffer.
BUILD_COPIES = 3


def _check_memory(loaded: Loaded, graph: Graph, limit: int | None) -> None:
    import os

    weights = sum(p.numel * DTYPE_BYTES[p.dtype] for p in graph.params.values())
    needed = BUILD_COPIES * weights
    if limit is None:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    if needed > limit:
        params = sum(p.numel for p in graph.params.values() if not p.buffer)
        raise SpecError(
            f"building {graph.name} needs about {human_size(needed)} of memory for its {params:,} parameters "
            f"({human_size(weights)} of weights), over the limit of {human_size(limit)}",
            hint="`lbdlc check` analyses it without allocating anything; --max-memory raises the limit",
        )


INFERENCE_WEIGHTS = "weights.inference.safetensors"


def _write_artifacts(loaded: Loaded, optimized, tmp: Path, options: BuildOptions) -> list[Path]:
    """model.py (and train.py) from model.py's graph, whose weights are weights.safetensors;
    ONNX and TVM from the inference graph. When passes rewrote weights the inference artifacts
    read (batch-norm folding), those go to weights.inference.safetensors for the TVM library."""
    from .passes.pipeline import separate_inference_weights

    graph, weights = optimized.pytorch_graph, optimized.pytorch_weights
    from safetensors.torch import save_file

    weights_path = tmp / "weights.safetensors"
    save_file(weights, str(weights_path), metadata={"format": "pt"})
    artifacts = [weights_path]
    description = loaded.spec.description
    if "pytorch" in options.backends:
        from .backends import pytorch

        from .checkpointing import plan_for_spec  # train.checkpointing: blocks recomputed in backward

        optimized.checkpointing = plan_for_spec(loaded, graph)
        artifacts += pytorch.write(graph, tmp, str(loaded.path), description, __version__, optimized.checkpointing)
        if getattr(loaded.spec, "train", None) is not None:  # the training protocol: train.py
            from .backends import train_script
            from .training.check import plan

            protocol = plan(loaded, graph)
            protocol.finetune = getattr(optimized, "finetune_train", None)  # train.py: freeze, save the adapters
            from .quant_qat import qat_layers  # `quantize: {qat: true}`: train.py trains fake-quantized

            protocol.qat, protocol.qat_line = qat_layers(loaded, graph)
            from .quant_qat import qat_int8_layers  # int8 static: int8 weights, learned uint8 activation ranges

            protocol.qat_int8 = qat_int8_layers(loaded, graph)
            from .backends.train_fsdp import refuse_unsupported  # `distributed: {strategy: fsdp}`

            refuse_unsupported(loaded, protocol)
            artifacts += train_script.write(protocol, tmp, graph.name, __version__)
    if "onnx" in options.backends:
        from .backends import onnx as onnx_backend

        artifacts += onnx_backend.write(optimized.graph, optimized.weights, tmp, options.opset)
    if "tvm" in options.backends:
        from .backends import tvm as tvm_backend

        artifacts += tvm_backend.write(optimized.graph, tmp)
    if "tvm" in options.backends and separate_inference_weights(optimized):  # ONNX carries its own
        path = tmp / INFERENCE_WEIGHTS
        save_file({n: optimized.weights[n] for n in optimized.graph.inference_params()}, str(path), metadata={"format": "pt"})
        artifacts.append(path)
    return artifacts


def _resolved_sha256(loaded: Loaded) -> str:
    from .lock import resolved_sha256

    return resolved_sha256(loaded)


def _manifest(loaded: Loaded, graph: Graph, options: BuildOptions, tmp: Path, artifacts: list[Path], optimized=None) -> dict:
    from .analysis import summarize
    from .resolved import resolved_dict

    summary = summarize(graph)
    return {
        "spec": {
            "path": loaded.path.as_posix(),
            "sha256": hashlib.sha256(loaded.text.encode("utf-8")).hexdigest(),
            "resolved_sha256": _resolved_sha256(loaded),  # equal for specs that build the same model
        },
        "resolved_spec": resolved_dict(loaded),
        "build": {
            "seed": options.seed,
            "weights_from": Path(options.weights).as_posix() if options.weights else None,
            "opset": options.opset if "onnx" in options.backends else None,
            "backends": list(options.backends),
            "overrides": list(options.overrides),
        },
        "model": {
            "name": graph.name,
            "inputs": summary.inputs,
            "outputs": summary.outputs,
            "params": summary.params,
            "buffers": summary.buffers,
            "flops_per_sample": summary.flops,
            # Argument order of the TVM library's `main` after the inputs.
            "parameter_order": (optimized.graph if optimized else graph).inference_params(),
            # The weights file the TVM library's parameters come from (weights.safetensors
            # unless passes rewrote some: then weights.inference.safetensors).
            "inference_weights": INFERENCE_WEIGHTS if any(p.name == INFERENCE_WEIGHTS for p in artifacts) else "weights.safetensors",
        },
        "passes": optimized.manifest() if optimized else None,
        "versions": tool_versions(),
        "artifacts": {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(artifacts, key=lambda p: p.name)
        },
    }


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`, replacing an earlier build there only after `new` is complete."""
    if target.exists() and not target.is_dir():
        raise SpecError(f"{target} exists and is not a directory")
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{new.name.rsplit('-', 1)[-1]}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
