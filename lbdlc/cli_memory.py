"""`lbdlc check --train`: the predicted memory of one training step, per layer and in total,
whether it fits a device, and the checkpointing plan (lbdlc/memory.py, lbdlc/checkpointing.py)."""
from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table
from rich.text import Text

from .errors import SpecError


def _sizes(seq: int | None, size: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in size:
        name, sep, value = item.partition("=")
        if not sep or not name.strip().isidentifier() or not value.strip().isdigit() or int(value) < 1:
            raise SpecError(f"--size '{item}' is not NAME=N", hint="e.g. --size seq=128 --size seq_kv=64")
        out[name.strip()] = int(value)
    if seq is not None:
        out["seq"] = seq
    return out


def _policy(text: str | None):
    """--checkpointing none|all|sqrt|selective|SIZE (a budget) or a comma-separated list of blocks."""
    if text is None:
        return None
    from .memory import parse_size
    from .training.schema import CHECKPOINT_POLICIES, CheckpointBudget

    if text in CHECKPOINT_POLICIES:
        return text
    if text[:1].isdigit():
        return CheckpointBudget(budget=parse_size(text))
    return [t.strip() for t in text.split(",") if t.strip()]


def train_memory(spec: Path, overrides: list[str], strict: bool, as_json: bool, batch: int | None, seq: int | None,
                 size: list[str], precision: str | None, optimizer: str | None, device: str, device_memory: str | None,
                 checkpointing: str | None) -> int:
    """Print the table (or JSON); the exit code: 1 when --device-memory is given and the peak exceeds it."""
    from .checkpointing import plan_for_spec, train_config
    from .cli import _graph, out
    from .memory import human_size, parse_size
    from .memory import estimate

    loaded, graph = _graph(spec, overrides, strict)
    from .finetune import training_graph  # `finetune:`: the adapted graph, only A, B (and train_also) trainable

    graph = training_graph(loaded, graph)
    limit = parse_size(device_memory) if device_memory else None
    config = train_config(loaded, graph, batch, _sizes(seq, size), precision, optimizer, device)
    plan = plan_for_spec(loaded, graph, config, _policy(checkpointing))
    t = getattr(loaded.spec, "train", None)
    report = estimate(graph, config, losses=t.loss_list() if t is not None else None, plan=plan)
    fits = None if limit is None else report.fits(limit)
    if as_json:
        data = report.to_json()
        data["device_memory"], data["fits"] = limit, fits
        print(json.dumps(data, indent=2))
        return 1 if fits is False else 0
    c = config
    sizes = "".join(f", {k} {v}" for k, v in c.sizes)
    table = Table(title=f"{report.name} ({spec}): one training step, batch {c.batch}{sizes}, {c.precision}, "
                        f"{c.optimizer.kind}, {c.device}", title_justify="left")
    for col, justify in [("layer", "left"), ("op", "left"), ("saved for backward", "right"), ("bytes", "right"), ("line", "right")]:
        table.add_column(col, justify=justify)
    for layer in report.layers:
        kept = human_size(layer.saved) if layer.saved else ("recomputed" if layer.recomputed else "-")
        if layer.recomputed and layer.saved:
            kept = f"{human_size(layer.saved)} (segment input)"
        table.add_row(Text(layer.name), layer.op, kept, f"{layer.saved:,}", str(layer.line or ""))
    table.add_section()
    table.add_row("activations", "", human_size(report.activations), f"{report.activations:,}", "")
    out.print(table)
    rows = [
        ("weights", report.weights, f"{report.trainable:,} trainable parameters"),
        ("gradients", report.grads, ""),
        ("optimizer state", report.optimizer, f"{c.optimizer.kind}: {c.optimizer.states} per trainable parameter"),
        ("activations", report.activations, "kept for backward at the end of the forward pass"),
        ("loss", report.loss, "kept by the loss for backward"),
        ("peak", report.peak, f"at {report.peak_at}"),
    ]
    for name, value, note in rows:
        out.print(f"{name:<16} {human_size(value):>11}  {note}", markup=False)
    if plan is not None:
        out.print(f"checkpointing    {plan.policy}: {plan.describe()}", markup=False)
        if plan.activations_after is not None:
            share = f" (+{100 * plan.extra_flops / plan.step_flops:.0f}% of a step)" if plan.step_flops else ""
            out.print(f"                 activations {human_size(plan.activations_before)} -> {human_size(plan.activations_after)}, "
                      f"peak {human_size(plan.peak_before)} -> {human_size(plan.peak_after)}; "
                      f"recomputation {plan.extra_flops:,} FLOPs per step{share}", markup=False)
    if limit is not None:
        verdict = (f"fits in {human_size(limit)} ({human_size(limit - report.peak)} to spare)" if fits
                   else f"does NOT fit in {human_size(limit)}: {human_size(report.peak - limit)} over")
        out.print(verdict, markup=False)
    return 1 if fits is False else 0
