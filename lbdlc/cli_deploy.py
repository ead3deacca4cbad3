"""`lbdlc targets`, `lbdlc run`, `lbdlc bench`, and the bundle lines of `lbdlc build`.

Registered on the `lbdlc` app by importing this module from lbdlc/cli.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.table import Table
from rich.text import Text

from .cli import _fail, app, err, out
from .errors import SpecError, SpecErrors

BundleArg = typer.Argument(..., help="A bundle (<build>/deploy/<target>) or a build directory with one bundle.", show_default=False)
TargetOpt = typer.Option(None, "--target", "-t", help="With a build directory of several bundles: the target's bundle.")


def print_bundles(result, console) -> None:
    """After `lbdlc build`: each bundle with its files and sizes, and what tuning did."""
    manifest = result.manifest
    for name, info in manifest["deploy"].items():
        total = sum(f["bytes"] for f in info["files"].values())
        t = info["target"]
        console.print(f"bundle {name} ({t['device']}, {t['arch']}, {t['precision']}) -> {result.out_dir / info['dir']}  "
                      f"{total:,} bytes", markup=False)
        for fname, f in info["files"].items():
            console.print(f"  {fname:<22} {f['bytes']:>12,} bytes  sha256 {f['sha256'][:12]}", markup=False)
    for name, tuning in (manifest.get("tuning") or {}).items():
        if tuning["reused"]:
            console.print(f"tuning {name}: reused {tuning['database']} ({tuning['trials']} trials, {tuning['tasks']} tasks), no tuning", markup=False)
        else:
            meta = json.loads((result.out_dir / tuning["database"] / "meta.json").read_text())
            console.print(f"tuning {name}: {tuning['trials']} trials over {tuning['tasks']} tasks in {meta['seconds']:.1f} s -> {tuning['database']}", markup=False)


def _short(target: dict) -> str:
    """{"kind": "llvm", "mtriple": "aarch64-linux-gnu", ...} -> 'llvm mtriple=aarch64-linux-gnu ...'."""
    parts = [str(target.get("kind"))]
    for k, v in target.items():
        if k in ("kind", "keys", "host", "tag"):
            continue
        parts.append(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}")
    if isinstance(target.get("host"), dict):
        parts.append(f"(host: {_short(target['host'])})")
    return " ".join(parts)


@app.command("targets")
def list_targets(as_json: bool = typer.Option(False, "--json", help="Print the presets as JSON.")) -> None:
    """List the deployment target presets: what each is, its TVM target on this machine, and what a bundle for it holds."""
    from .targets import OPTIONS, describe_presets

    rows = describe_presets()
    if as_json:
        print(json.dumps({"presets": rows, "options": OPTIONS}, indent=2))
        return
    table = Table(show_header=True)
    for col in ("target", "what it is", "TVM target here", "TVM library", "ONNX Runtime", "runs here"):
        table.add_column(col)
    for r in rows:
        if not r["available"]:
            table.add_row(r["name"], Text(r["summary"]), Text(r["note"]), "", "", "no")
            continue
        table.add_row(r["name"], Text(r["summary"]), Text(_short(r["tvm"])), Text(r["library"]),
                      r["onnxruntime"], "yes" if r["runs_here"] else "no")
    out.print(table)
    out.print("Options after a colon: " + "; ".join(f"{k}: {v}" for k, v in OPTIONS.items()) + " (e.g. --target h100:fp16).", markup=False)
    out.print("Any TVM target works as a dict: in a spec `deploy: {targets: [{kind: llvm, mtriple: riscv64-linux-gnu, name: riscv}]}`, "
              "on the command line as JSON.", markup=False)


@app.command("run")
def run_bundle(
    bundle: Path = BundleArg,
    inputs: list[str] = typer.Option(..., "--input", "-i", help="FILE.npy (the only input), NAME=FILE.npy (repeatable), or FILE.npz with arrays by input name."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Save the outputs: FILE.npz (by output name) or FILE.npy (one output)."),
    runtime: Optional[str] = typer.Option(None, "--runtime", "-r", help="tvm or onnx (default: the first of the bundle's runtimes that runs here)."),
    target: Optional[str] = TargetOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the outputs as JSON."),
) -> None:
    """Run a deployment bundle on inputs from .npy/.npz files: print the outputs or save them."""
    from .runner import run, save

    try:
        _, manifest, session, outputs = run(bundle, inputs, runtime, target)
        if output:
            save(manifest, outputs, output)
    except (SpecError, SpecErrors) as exc:
        _fail(exc)
    names = [o["name"] for o in manifest["model"]["outputs"]]
    if as_json:
        print(json.dumps({"runtime": session.runtime, "outputs": {n: o.tolist() for n, o in zip(names, outputs)}}))
        return
    if output:
        out.print(f"{manifest['model']['name']} on {manifest['target']['name']} ({session.runtime}): "
                  + ", ".join(f"{n} {list(o.shape)}" for n, o in zip(names, outputs)) + f" -> {output}", markup=False)
        return
    for n, o in zip(names, outputs):
        out.print(f"{n}: {o.dtype} {list(o.shape)} ({session.runtime})", markup=False)
        out.print(np.array2string(o, threshold=64, precision=6), markup=False)


@app.command("bench")
def bench_bundle(
    bundle: Path = BundleArg,
    runtime: list[str] = typer.Option([], "--runtime", "-r", help="tvm and/or onnx (repeatable; default: each of the bundle's runtimes that runs here)."),
    dims: list[str] = typer.Option([], "--dim", help="Size of a symbolic dimension, NAME=SIZE (default 1), e.g. --dim batch=8."),
    runs: int = typer.Option(50, "--runs", min=1, help="Timed calls per round."),
    warmup: int = typer.Option(5, "--warmup", min=0, help="Untimed calls before timing."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Rounds of --runs calls (each round's median is reported too)."),
    target: Optional[str] = TargetOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Measure a bundle's latency (median, p90 over every timed call) and throughput, numpy in to numpy out, after a warm-up."""
    from .runner import bench

    try:
        path, manifest, results, skipped = bench(bundle, list(runtime) or None, dims, runs, warmup, repeats, target)
    except (SpecError, SpecErrors) as exc:
        _fail(exc)
    for r, why in skipped:
        err.print(f"note: {r} skipped: {why}", markup=False)
    if as_json:
        print(json.dumps({"bundle": str(path), "model": manifest["model"]["name"], "target": manifest["target"]["name"],
                          "results": results}, indent=2))
        return
    t = manifest["target"]
    table = Table(title=f"{manifest['model']['name']} on {t['name']} ({t['device']}, {t['precision']}) — {path}", title_justify="left")
    for col, justify in [("runtime", "left"), ("batch", "right"), ("median ms", "right"), ("p90 ms", "right"), ("min ms", "right"),
                         ("round medians ms", "right"), ("samples/s", "right"), ("timed calls", "right")]:
        table.add_column(col, justify=justify)
    for r in results:
        table.add_row(r["runtime"], str(r["batch"]), f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['min_ms']:.3f}",
                      " / ".join(f"{m:.3f}" for m in r["round_medians_ms"]), f"{r['throughput_per_s']:.1f}", str(r["runs"]))
    out.print(table)
