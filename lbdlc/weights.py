"""Weights: seeded initialisation from the IR's parameter declarations, and checked loading.

Each parameter gets its own generator seeded from (seed, parameter name), so adding a layer
never changes the initial weights of the others and builds are byte-for-byte reproducible.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .errors import SpecError
from .ir import Graph, Param

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
    "uint8": torch.uint8,  # packed block-quantized codes (linear_q)
}


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def init_param(p: Param, seed: int) -> torch.Tensor:
    dtype = TORCH_DTYPES[p.dtype]
    kind = p.init.kind
    if kind == "zeros":
        return torch.zeros(p.shape, dtype=dtype)
    if kind == "ones":
        return torch.ones(p.shape, dtype=dtype)
    if kind == "constant":  # one value, rounded once from float64 (CLIP's ln(1/0.07))
        return torch.full(p.shape, p.init.arg("value"), dtype=torch.float64).to(dtype)
    gen = _generator(seed, p.name)
    if kind == "uniform":
        bound = p.init.arg("bound")
        return (torch.rand(p.shape, generator=gen, dtype=torch.float32) * 2 - 1).mul_(bound).to(dtype)
    if kind == "normal":
        return torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(p.init.arg("std", 1.0)).add_(p.init.arg("mean", 0.0)).to(dtype)
    raise ValueError(f"unknown initializer {kind!r} for {p.name}")


def initialize(graph: Graph, seed: int = 0) -> dict[str, torch.Tensor]:
    return {name: init_param(p, seed) for name, p in graph.params.items()}


def load_checked(graph: Graph, path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file whose names and shapes must match the graph's parameters."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise SpecError(f"no such weights file: {path}") from None
    except (SafetensorError, OSError) as exc:
        raise SpecError(f"{path} is not a readable safetensors file: {exc}") from None
    missing = sorted(set(graph.params) - set(tensors))
    unexpected = sorted(set(tensors) - set(graph.params))
    wrong = [
        f"{n}: file has {list(t.shape)} {str(t.dtype).removeprefix('torch.')}, spec needs {list(graph.params[n].shape)} {graph.params[n].dtype}"
        for n, t in sorted(tensors.items())
        if n in graph.params and (tuple(t.shape) != graph.params[n].shape or t.dtype != TORCH_DTYPES[graph.params[n].dtype])
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append("missing: " + ", ".join(missing))
        if unexpected:
            parts.append("unexpected: " + ", ".join(unexpected))
        if wrong:
            parts.append("wrong shape or dtype: " + "; ".join(wrong))
        raise SpecError(
            f"{path} does not fit the spec's parameters ({'; '.join(parts)})",
            hint="weights are matched by name; `lbdlc check --json` lists the spec's parameters",
        )
    return {n: tensors[n] for n in graph.params}
