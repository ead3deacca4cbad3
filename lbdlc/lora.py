"""The spec's `finetune:` section (LoRA; passes/lora.py applies it, lbdlc/adapters.py writes
and reads PEFT adapter files).

    finetune:
      base: runs/gpt2/weights.safetensors   # base weights, the spec's parameter names
      lora:
        targets: ["*.attn.q_proj"]          # fnmatch patterns on layer names; default: every untied linear layer
                                            # (attention projections included: passes/decompose_attention.py)
        r: 8
        alpha: 16
        dropout: 0.05
        rslora: false                       # scale α/√r instead of α/r
      freeze: ["*"]                         # parameter patterns frozen (LoRA's A and B never are)
      train_also: ["head.*"]                # ... except these
      qlora: {format: q4_1, merge: requantize}  # optional QLoRA: adapted layers' base weights quantized, frozen
"""
from __future__ import annotations

import fnmatch
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import SpecError
from .ir import Graph


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSpec(_Strict):
    targets: list[str] | None = Field(None, min_length=1)
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    rslora: bool = False


class QLoraSpec(_Strict):
    format: Literal["q4_0", "q4_1", "q8_0"] = "q4_1"  # the frozen base's block format (lbdlc/quant_formats.py)
    merge: Literal["requantize", "float32"] = "requantize"  # --merge: W̄ + scale·BA requantized, or kept fp32


class FinetuneSpec(_Strict):
    base: str | None = None
    lora: LoraSpec = Field(default_factory=LoraSpec)
    qlora: QLoraSpec | None = None  # QLoRA: the adapted layers' base weights block-quantized and frozen
    freeze: list[str] = Field(default_factory=lambda: ["*"])
    train_also: list[str] = Field(default_factory=list)


def lora_pass(loaded, seed: int = 0):
    """The `lora` pass a spec's `finetune:` section asks for, target patterns located."""
    from .passes.lora import DEFAULT_TARGETS, LoRA
    from .source import loc_of

    spec: FinetuneSpec = loaded.spec.finetune
    lo = spec.lora
    targets = lo.targets or list(DEFAULT_TARGETS)
    locs = [loc_of(loaded.raw, ("finetune", "lora", "targets", k)) for k in range(len(targets))] if lo.targets else None
    return LoRA(targets, lo.r, lo.alpha, lo.dropout, lo.rslora, seed, locs, loc_of(loaded.raw, ("finetune", "lora", "r")))


def qlora_pass(loaded):
    """The `qlora` pass of a spec's `finetune.qlora` (None without one)."""
    from .passes.lora import QLoRA
    from .source import loc_of

    q = loaded.spec.finetune.qlora
    return QLoRA(q.format, loc_of(loaded.raw, ("finetune", "qlora", "format"))) if q is not None else None


def trainable(loaded, graph: Graph) -> list[str]:
    """Parameter names a fine-tune trains: LoRA's A and B, and what `freeze` leaves or
    `train_also` names (buffers never). Patterns that match no parameter are errors."""
    from .source import loc_of

    spec: FinetuneSpec = loaded.spec.finetune
    names = [n for n, p in graph.params.items() if not p.buffer]
    for key in ("freeze", "train_also"):
        for k, pattern in enumerate(getattr(spec, key)):
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise SpecError(f"finetune.{key} pattern '{pattern}' matches no parameter", loc_of(loaded.raw, ("finetune", key, k)),
                                hint=f"parameters look like {', '.join(names[:4])}")
    out = []
    for n in names:
        if ".lora_A." in n or ".lora_B." in n or not any(fnmatch.fnmatchcase(n, p) for p in spec.freeze) or any(fnmatch.fnmatchcase(n, p) for p in spec.train_also):
            out.append(n)
    return out
