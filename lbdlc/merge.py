"""Model merging on safetensors files: task arithmetic and TIES.

Task arithmetic: θ = θ_base + Σ_t λ_t (θ_t − θ_base). TIES (Yadav et al. 2023) first trims
each task vector to its largest-magnitude `density` fraction, elects a per-entry sign (the
sign of the summed trimmed vectors) and averages, per entry, only the values agreeing with
it, then adds λ times that to the base (λ = the mean of the weights).
The files must hold the same parameter names with the same shapes and dtypes; the first
difference found (in sorted name order) is reported.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import SpecError


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise SpecError(f"no such weights file: {path}", hint="merge takes safetensors files: base, then each fine-tuned model")
    except (SafetensorError, OSError, ValueError) as exc:
        raise SpecError(f"{path} is not a readable safetensors file: {exc}")


def check_compatible(base: dict[str, torch.Tensor], other: dict[str, torch.Tensor], base_name: str, other_name: str) -> None:
    """Raise a SpecError naming the first parameter (sorted order) whose name, shape or dtype differs."""
    for name in sorted(set(base) | set(other)):
        if name not in other:
            raise SpecError(f"{other_name} has no parameter '{name}' (present in {base_name})", hint="merged models must share every parameter name")
        if name not in base:
            raise SpecError(f"{other_name} has a parameter '{name}' that {base_name} lacks", hint="merged models must share every parameter name")
        a, b = base[name], other[name]
        if tuple(a.shape) != tuple(b.shape):
            raise SpecError(f"parameter '{name}' has shape {list(b.shape)} in {other_name} but {list(a.shape)} in {base_name}")
        if a.dtype != b.dtype:
            raise SpecError(f"parameter '{name}' is {b.dtype} in {other_name} but {a.dtype} in {base_name}")


def task_arithmetic(base: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():  # integer buffers (counters, codes) are kept from the base
            out[name] = b.clone()
            continue
        acc = b.double()
        for lam, m in zip(weights, models):
            acc = acc + lam * (m[name].double() - b.double())
        out[name] = acc.to(b.dtype)
    return out


def ties(base: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]], weights: list[float], density: float = 0.2) -> dict[str, torch.Tensor]:
    lam = sum(weights) / len(weights)
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            out[name] = b.clone()
            continue
        taus = torch.stack([m[name].double() - b.double() for m in models])  # [T, ...]
        flat = taus.reshape(len(models), -1)
        k = max(1, round(density * flat.shape[1])) if flat.shape[1] else 0
        if k and k < flat.shape[1]:  # trim: keep the top-k magnitudes of each task vector
            thresh = flat.abs().kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values
            flat = torch.where(flat.abs() >= thresh, flat, torch.zeros_like(flat))
        sign = torch.sign(flat.sum(0))  # elect
        agree = (torch.sign(flat) == sign) & (flat != 0)
        count = agree.sum(0).clamp(min=1)
        merged = torch.where(agree, flat, torch.zeros_like(flat)).sum(0) / count  # disjoint mean
        out[name] = (b.double() + lam * merged.reshape(b.shape)).to(b.dtype)
    return out


def merge_files(base: Path, models: list[Path], weights: list[float] | None, output: Path, method: str = "task_arithmetic", density: float = 0.2) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file

    if not models:
        raise SpecError("merge needs at least one fine-tuned model after the base")
    if weights is None:
        weights = [1.0 / len(models)] * len(models)
    if len(weights) != len(models):
        raise SpecError(f"--weights has {len(weights)} values for {len(models)} fine-tuned models", hint="give one weight per model, e.g. --weights 0.5,0.5")
    if method not in ("task_arithmetic", "ties"):
        raise SpecError(f"unknown merge method {method!r}", hint="use task_arithmetic or ties")
    if not 0 < density <= 1:
        raise SpecError(f"--density must be in (0, 1], got {density}")
    b = _load(base)
    ms = [_load(p) for p in models]
    for p, m in zip(models, ms):
        check_compatible(b, m, str(base), str(p))
    merged = task_arithmetic(b, ms, weights) if method == "task_arithmetic" else ties(b, ms, weights, density)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in merged.items()}, str(output))
    return merged


def parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise SpecError(f"--weights must be comma-separated numbers, got {text!r}", hint="e.g. --weights 0.5,0.5")
