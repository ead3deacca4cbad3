"""`lbdlc merge`: task arithmetic / TIES over safetensors files (see lbdlc/merge.py)."""
from __future__ import annotations

from pathlib import Path

import typer

from .cli import _fail, _fmt_int, app, out
from .errors import SpecError, SpecErrors


@app.command()
def merge(
    base: Path = typer.Argument(..., help="The base model's weights (safetensors).", show_default=False),
    models: list[Path] = typer.Argument(..., help="Fine-tuned models' weights, same parameter names and shapes.", show_default=False),
    weights: str | None = typer.Option(None, "--weights", help="λ per fine-tuned model, comma-separated (default 1/T each)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the merged safetensors file."),
    method: str = typer.Option("task_arithmetic", "--method", help="task_arithmetic (θ + Σ λ_t (θ_t − θ)) or ties."),
    density: float = typer.Option(0.2, "--density", help="TIES: fraction of each task vector kept."),
) -> None:
    """Merge fine-tuned models into their base: θ + Σ λ_t (θ_t − θ), or TIES."""
    from .merge import merge_files, parse_weights

    try:
        merged = merge_files(base, list(models), parse_weights(weights), output, method, density)
    except (SpecError, SpecErrors) as exc:
        _fail(exc)
    total = sum(t.numel() for t in merged.values())
    out.print(f"merged {len(models)} model(s) into {base} ({method}): {len(merged)} tensors, {_fmt_int(total)} values -> {output}", markup=False)
