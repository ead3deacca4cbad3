"""The `lbdlc` command line.

Exit codes scripts can trust: 0 ok, 1 failed checks or differences, 2 usage or spec errors.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import SpecError, SpecErrors, render

app = typer.Typer(
    help="lbdlc compiles deep-learning models written as YAML specs into PyTorch code, ONNX and TVM libraries.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (CI logs, files) gets wide tables instead of rich's 80-column default.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False)

SpecArg = typer.Argument(..., help="A model spec (YAML), e.g. specs/mlp.yaml.", show_default=False)
SetOpt = typer.Option([], "--set", help="Override a spec value: PATH=VALUE, e.g. --set d_model=1024 or --set layers.fc1.out_features=30 (repeatable).")
StrictOpt = typer.Option(False, "--strict", help="Treat warnings (unused inputs or layers) as errors.")


def _warn(warnings) -> None:
    for w in warnings:
        err.print(render(w), markup=False, soft_wrap=True)


def _graph(spec: Path, overrides: list[str], strict: bool):
    """Load, expand and lower a spec; print its warnings."""
    from .lower import load, lower

    loaded = load(spec, overrides)
    graph = lower(loaded, strict)
    _warn(loaded.warnings)
    return loaded, graph


def _fail(exc: SpecError | SpecErrors) -> None:
    errors = exc.errors if isinstance(exc, SpecErrors) else [exc]
    for e in errors:
        err.print(render(e), markup=False, soft_wrap=True)
    if len(errors) > 1:
        err.print(f"{len(errors)} errors", markup=False, soft_wrap=True)
    raise typer.Exit(2)


def _fmt_int(n: int) -> str:
    return f"{n:,}"


@app.command()
def check(
    spec: Path = SpecArg,
    as_json: bool = typer.Option(False, "--json", help="Print the analysis as JSON for scripts."),
    overrides: list[str] = SetOpt,
    strict: bool = StrictOpt,
    train: bool = typer.Option(False, "--train", help="Predict the memory of one training step instead: per layer, in total, and the checkpointing plan."),
    batch: Optional[int] = typer.Option(None, "--batch", min=1, help="With --train: samples per step (default: the spec's train.batch_size / grad_accumulation)."),
    seq: Optional[int] = typer.Option(None, "--seq", min=1, help="With --train: the value of the `seq` dimension."),
    size: list[str] = typer.Option([], "--size", help="With --train: another symbolic dimension, NAME=N (repeatable)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="With --train: fp32, bf16 or fp16 (default: the spec's train.precision)."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="With --train: adam, adamw, sgd, rmsprop or adagrad (default: the spec's)."),
    device: str = typer.Option("cuda", "--device", help="With --train: the device type whose kernels decide what is saved: cuda or cpu."),
    device_memory: Optional[str] = typer.Option(None, "--device-memory", help="With --train: say whether the peak fits this much memory (e.g. 24GiB); exit 1 if not."),
    checkpointing: Optional[str] = typer.Option(None, "--checkpointing", help="With --train: a policy instead of the spec's: none, all, sqrt, selective, a budget (2GiB), or blocks (h.0,h.1)."),
) -> None:
    """Validate a spec and print each layer's op, output shape, parameters and FLOPs, without allocating weights."""
    from .analysis import summarize

    if train:
        from .cli_memory import train_memory

        try:
            code = train_memory(spec, overrides, strict, as_json, batch, seq, size, precision, optimizer, device, device_memory, checkpointing)
        except (SpecError, SpecErrors) as exc:
            _fail(exc)
        if code:
            raise typer.Exit(code)
        return
    try:
        loaded, graph = _graph(spec, overrides, strict)
        summary = summarize(graph)
        from .finetune import describe  # `finetune:`: what the LoRA pass adds and what trains

        finetune_line = describe(loaded, graph)
    except (SpecError, SpecErrors) as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(summary.to_json(), indent=2))
        return
    table = Table(title=f"{summary.name} ({spec})", title_justify="left")
    for col, justify in [("layer", "left"), ("op", "left"), ("output shape", "left"), ("params", "right"), ("FLOPs", "right"), ("line", "right")]:
        table.add_column(col, justify=justify)
    for layer in summary.layers:
        shape = "[" + ", ".join(map(str, layer.output_shape)) + "]"
        table.add_row(Text(layer.name), layer.op, Text(shape), _fmt_int(layer.params), _fmt_int(layer.flops), str(layer.line or ""))
    table.add_section()
    table.add_row("total", "", "", _fmt_int(summary.params), _fmt_int(summary.flops), "")
    out.print(table)
    sig = lambda vs: ", ".join(f"{v['name']} [{', '.join(map(str, v['shape']))}] {v['dtype']}" for v in vs)  # noqa: E731
    out.print(f"inputs:  {sig(summary.inputs)}", markup=False)
    out.print(f"outputs: {sig(summary.outputs)}", markup=False)
    extra = f" (+ {_fmt_int(summary.buffers)} buffer values)" if summary.buffers else ""
    out.print(f"{_fmt_int(summary.params)} parameters{extra}, {_fmt_int(summary.flops)} FLOPs per sample", markup=False)
    if finetune_line:
        out.print(finetune_line, markup=False)


@app.command()
def build(
    spec: Path = SpecArg,
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output directory (default: out/<spec name>)."),
    seed: int = typer.Option(0, help="Seed for initial weights."),
    weights: Optional[Path] = typer.Option(None, help="Use these weights (safetensors, same parameter names) instead of initializing."),
    opset: int = typer.Option(20, help="ONNX opset (18 to 23)."),
    backend: list[str] = typer.Option(
        ["pytorch", "onnx", "tvm"], "--backend", "-b", help="Backends to run (repeat the option); default all."
    ),
    overrides: list[str] = SetOpt,
    strict: bool = StrictOpt,
    max_memory: Optional[str] = typer.Option(None, help="Refuse builds predicted to need more memory (e.g. 24GiB); default half the RAM."),
    verify: bool = typer.Option(False, "--verify", help="Run the built artifacts on random inputs and check they agree (exit 1 if not)."),
    tolerance: float = typer.Option(1e-4, help="With --verify: the largest max-abs difference allowed, relative to max(1, |output|)."),
    check_reproducible: bool = typer.Option(False, "--check-reproducible", help="Build a second time into a temporary directory and compare every artifact byte for byte (exit 1 if any differs)."),
    opt_level: Optional[int] = typer.Option(None, "-O", "--opt-level", min=0, max=3, help="Optimization level of the ONNX and TVM artifacts: -O0 none, -O1 clean-up (default), -O2 folding and fusion, -O3 -O2 plus clean-up."),
    passes: list[str] = typer.Option([], "--passes", help="Run exactly these passes, in order (comma-separated or repeated); `lbdlc passes` lists them. Overrides -O and the spec's `compile:`."),
    print_passes: bool = typer.Option(False, "--print-passes", help="Print the pass log: each pass with nodes, parameters and bytes before and after, its rewrites and time."),
    quantize: Optional[str] = typer.Option(None, "-q", "--quantize", help="Quantize: int8 (ONNX Runtime int8 of model.onnx, dynamic unless the spec's `quantize:` says static), int8-dynamic, int8-static (calibrated QDQ), or weight-only blocks of the linear layers: q8_0, q4_0, q4_1; replaces the default of the spec's `quantize:`."),
    target: list[str] = typer.Option([], "--target", "-t", help="Deploy target (repeatable): a preset (`lbdlc targets`; options after a colon: h100:fp16, arm64:so) or a TVM target as JSON; a bundle each in <output>/deploy/<target>. Replaces the spec's `deploy:`."),
    tune: Optional[int] = typer.Option(None, "--tune", min=1, help="Tune each target's TVM library with MetaSchedule, N trials; the database is kept in <output>/tuning and reused while the graph is unchanged."),
    static: list[str] = typer.Option([], "--static", help="Fix a symbolic dimension in the deploy libraries, NAME=SIZE (repeatable); --tune fixes each one, at 1 unless given."),
    adapter: list[Path] = typer.Option([], "--adapter", help="A PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors) applied to the base weights; repeat it to merge several (with --merge)."),
    merge: bool = typer.Option(False, "--merge", help="Fold the LoRA adapters (`finetune:` or --adapter) into the base weights: the base model's parameters and ops."),
    adapter_weights: Optional[str] = typer.Option(None, "--adapter-weights", help="With several --adapter and --merge: λ per adapter, comma-separated (default 1 each): W + Σ λ·(α/r)·BA."),
) -> None:
    """Compile a spec: model.py, weights.safetensors, model.onnx, a TVM library and manifest.json."""
    from .driver import BuildOptions, build as run_build
    from .memory import parse_size
    from .lower import load

    try:
        limit = parse_size(max_memory) if max_memory else None
        out_dir = output or Path("out") / load(spec, overrides).name
        options = BuildOptions(seed=seed, weights=weights, opset=opset, backends=tuple(backend), overrides=tuple(overrides), strict=strict, max_memory=limit,
                               passes=tuple(passes) if passes else None, level=opt_level, quantize=quantize,
                               targets=tuple(target), tune=tune, static=tuple(static), adapter=tuple(adapter) or None, merge=merge,
                               adapter_weights=tuple(_adapter_weights(adapter_weights)))
        result = run_build(spec, out_dir, options)
    except (SpecError, SpecErrors) as exc:
        _fail(exc)
    _warn(result.warnings)
    m = result.manifest["model"]
    out.print(f"built {m['name']}: {_fmt_int(m['params'])} parameters -> {result.out_dir}", markup=False)
    ft = result.manifest.get("finetune")
    if ft and "trainable_params" in ft:  # `finetune:`: what train.py trains
        out.print(f"  finetune: {_fmt_int(ft['trainable_params'])} of {_fmt_int(ft['params'])} parameters trainable "
                  f"({100 * ft['trainable_fraction']:.2f}%), LoRA on {', '.join(ft['adapted_layers'][:6])}"
                  f"{' ...' if len(ft['adapted_layers']) > 6 else ''}", markup=False)
    elif ft and ft.get("merged"):
        out.print(f"  finetune: adapters merged into the base weights; {ft.get('precision', '')}", markup=False)
    for name, info in result.manifest["artifacts"].items():
        out.print(f"  {name:<22} {info['bytes']:>12,} bytes  sha256 {info['sha256'][:12]}", markup=False)
    if result.manifest.get("deploy"):
        from .cli_deploy import print_bundles

        print_bundles(result, out)
    if result.manifest.get("quantization") or result.manifest.get("quantization_int8"):
        from .cli_quant import print_report  # per matrix and per output: bytes and error against fp32

        print_report(result.manifest, out)
    if print_passes:
        from .cli_passes import print_pass_log

        print_pass_log(result.optimized, out)
    if check_reproducible:
        from .cli_vcs import reproducible_report

        if not reproducible_report(spec, result.out_dir, options):
            raise typer.Exit(1)
    if verify and not _verified(result.out_dir, tuple(backend), tolerance):
        raise typer.Exit(1)


@app.command()
def train(
    spec: Path = SpecArg,
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Build directory (default: out/<spec name>); the run goes to <output>/run."),
    overrides: list[str] = SetOpt,
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Train for this many optimizer steps instead of the spec's length."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Train for this many epochs instead."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Training seed (default: the spec's `train.seed`)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes for data-parallel training (torchrun --nproc_per_node)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from <output>/run/checkpoint."),
    strict: bool = StrictOpt,
    weights: Optional[Path] = typer.Option(None, "--weights", help="Start from these weights (safetensors, the spec's names); with `finetune:` the base model's weights."),
) -> None:
    """Build a spec's model.py and train.py (PyTorch backend), then run train.py: exit 0 when training finished, 1 when it failed."""
    from .lower import load
    from .training.run import TrainOptions, prepare, run

    try:
        out_dir = output or Path("out") / load(spec, overrides).name
        result = prepare(spec, out_dir, tuple(overrides), strict, weights=weights)
    except (SpecError, SpecErrors) as exc:
        _fail(exc)
    _warn(result.warnings)
    out.print(f"built {result.manifest['model']['name']} -> {out_dir}; running train.py", markup=False)
    code = run(out_dir, TrainOptions(steps=steps, epochs=epochs, seed=seed, device=device, nproc=nproc, resume=resume))
    if code != 0:
        err.print(f"train.py failed (exit status {code})", markup=False)
        raise typer.Exit(1)


def _adapter_weights(text: str | None) -> list[float]:
    """--adapter-weights 0.5,0.3 -> [0.5, 0.3]."""
    if text is None:
        return []
    try:
        return [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise SpecError(f"--adapter-weights must be comma-separated numbers, got {text!r}", hint="e.g. --adapter-weights 0.5,0.5") from None


def _verified(out_dir: Path, backends: tuple[str, ...], tolerance: float) -> bool:
    """Invariant 1 on this build: every backend computes what the generated module computes."""
    from .verify import compare, random_inputs, run_pytorch

    if "pytorch" not in backends or len(backends) < 2:
        out.print("verify: needs the pytorch backend and at least one other", markup=False)
        return False
    from .cli_quant import verify as verify_quantized  # fp32 model.py vs quantized artifacts: the quantization bound

    quantized = verify_quantized(out_dir, backends, tolerance, out)
    if quantized is not None:
        return quantized
    inputs = random_inputs(out_dir, int_high=2)  # symbolic dims at 2; ids 0/1 fit any table
    ordered = ("pytorch",) + tuple(b for b in backends if b != "pytorch")
    agreement = compare(out_dir, inputs, ordered)
    scale = max([1.0] + [float(abs(r).max()) for r in run_pytorch(out_dir, inputs) if r.size])
    ok = all(d <= tolerance * scale for d in agreement.max_abs_diff.values())
    for b, d in agreement.max_abs_diff.items():
        out.print(f"  verify {b:<8} max |diff| vs pytorch {d:.2e} (allowed {tolerance * scale:.1e})", markup=False)
    out.print("verify: agree" if ok else "verify: DIFFER", markup=False)
    return ok


@app.command()
def show(spec: Path = SpecArg, overrides: list[str] = SetOpt) -> None:
    """Print the fully resolved spec: extends and --set applied, blocks and repeats expanded, expressions evaluated, defaults filled."""
    from .resolved import resolved_yaml

    try:
        loaded, _ = _graph(spec, overrides, False)
    except (SpecError, SpecErrors) as exc:
        _fail(exc)
    print(resolved_yaml(loaded), end="")


@app.command()
def schema() -> None:
    """Print the JSON Schema of the spec language, for editors (see README: VS Code YAML)."""
    from .schema import json_schema

    print(json.dumps(json_schema(), indent=2))


@app.command("ops")
def list_ops() -> None:
    """List the ops a spec can use, with their attributes."""
    from . import ops

    table = Table(show_header=True)
    table.add_column("op")
    table.add_column("attributes")
    table.add_column("what it computes")
    for name in sorted(ops.REGISTRY):
        op = ops.REGISTRY[name]
        attrs = ", ".join(
            f"{k}" + ("" if f.is_required() else f"={f.default!r}") for k, f in op.Attrs.model_fields.items()
        )
        table.add_row(name, Text(attrs), Text(op.summary))
    out.print(table)


@app.command()
def version() -> None:
    """Print the versions of lbdlc and the tools it builds with."""
    from .driver import tool_versions

    for tool, v in tool_versions().items():
        out.print(f"{tool:<12} {v or 'not installed'}", markup=False)


from . import cli_vcs  # noqa: E402,F401  (diff, fmt, git-setup, lock: specs in version control)
from . import cli_passes  # noqa: E402,F401  (passes: the optimization passes and levels)
from . import cli_merge  # noqa: E402,F401  (merge: task arithmetic / TIES on weight files)
from . import cli_deploy  # noqa: E402,F401  (targets, run, bench: deployment targets and bundles)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        sys.exit(130)
