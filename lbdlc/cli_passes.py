"""`lbdlc passes` (the optimization passes and levels) and the pass log of `lbdlc build --print-passes`.

Registered on the `lbdlc` app by importing this module from lbdlc/cli.py.
"""
from __future__ import annotations

import json

import typer
from rich.table import Table
from rich.text import Text

from .cli import app, out


@app.command("passes")
def list_passes(as_json: bool = typer.Option(False, "--json", help="Print the passes and levels as JSON.")) -> None:
    """List the optimization passes (what each does, its preconditions, the levels that run it) and the levels -O0..-O3."""
    from .passes import DEFAULT_LEVEL, LEVELS, PASSES

    levels_of = {name: [lvl for lvl, names in LEVELS.items() if name in names] for name in PASSES}
    if as_json:
        print(json.dumps({
            "passes": [{"name": n, "description": p.description, "preconditions": p.preconditions, "levels": levels_of[n]}
                       for n, p in PASSES.items()],
            "levels": {str(k): v for k, v in LEVELS.items()},
            "default_level": DEFAULT_LEVEL,
        }, indent=2))
        return
    table = Table(show_header=True)
    for col in ("pass", "what it does", "preconditions", "levels"):
        table.add_column(col)
    for name, p in PASSES.items():
        table.add_row(name, Text(p.description), ", ".join(p.preconditions), " ".join(f"-O{k}" for k in levels_of[name]))
    out.print(table)
    for level, names in LEVELS.items():
        default = " (default)" if level == DEFAULT_LEVEL else ""
        out.print(f"-O{level}{default}: {', '.join(names) if names else 'no passes'}", markup=False)
    out.print("Passes apply to model.onnx and the TVM library; model.py too with `compile: {pytorch: true}` in the spec.", markup=False)


def _human_bytes(n: int) -> str:
    from .memory import human_size

    return human_size(n)


def pass_table(log, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col, justify in [("pass", "left"), ("nodes", "right"), ("params", "right"), ("bytes", "right"),
                         ("time", "right"), ("what changed", "left")]:
        table.add_column(col, justify=justify)
    for r in log:
        def span(a, b, fmt=lambda v: f"{v:,}"):
            return fmt(a) if a == b else f"{fmt(a)} -> {fmt(b)}"

        changes = ", ".join(f"{n} × {what}" for what, n in sorted(r.changes.items())) or "nothing"
        table.add_row(r.name, span(r.nodes_before, r.nodes_after), span(r.params_before, r.params_after),
                      span(r.bytes_before, r.bytes_after, _human_bytes), f"{1000 * r.seconds:.1f} ms", Text(changes))
    if log:
        first, last = log[0], log[-1]
        table.add_section()
        table.add_row("total", f"{first.nodes_before:,} -> {last.nodes_after:,}", f"{first.params_before:,} -> {last.params_after:,}",
                      f"{_human_bytes(first.bytes_before)} -> {_human_bytes(last.bytes_after)}",
                      f"{1000 * sum(r.seconds for r in log):.1f} ms", "")
    return table


def print_pass_log(optimized, console) -> None:
    """The pass log of a build: the inference artifacts' pipeline, and model.py's if it had one."""
    if optimized is None:
        return
    p = optimized.pipeline
    chosen = {"default": f"the default level -O{p.level}", "--passes": "--passes", "compile.passes": "the spec's compile.passes",
              "compile.level": f"the spec's compile.level (-O{p.level})"}.get(p.source, p.source)
    if optimized.log is None:
        console.print("no inference artifacts built: no passes ran for ONNX or TVM", markup=False)
    elif not optimized.log:
        console.print(f"passes for model.onnx and the TVM library: none (chosen by {chosen})", markup=False)
    else:
        console.print(pass_table(optimized.log, f"passes for model.onnx and the TVM library (chosen by {chosen})"))
    if optimized.pytorch_log is not None and optimized.pytorch_log is optimized.log:
        console.print("model.py: the same optimized graph and weights (compile.pytorch, no train:)", markup=False)
    elif optimized.pytorch_log is not None:
        what = "train.py trains it" if optimized.pytorch_mode == "training" else "inference"
        console.print(pass_table(optimized.pytorch_log, f"passes for model.py ({what})"))
        if optimized.left_out:
            console.print(f"left out for model.py (inference-only; train.py trains it): {', '.join(optimized.left_out)}", markup=False)
