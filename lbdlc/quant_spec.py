"""The spec's `quantize:` section (weight-only block formats; passes/quantize.py applies it).

    quantize:
      default: q4_1            # q8_0 | q4_0 | q4_1 | int8 (= q8_0) | int4 (= `format`) | none
      method: weight_only      # the only method so far (dynamic and static int8: not yet)
      format: q4_1             # what 4 bits means: q4_0 (symmetric) | q4_1 (scale + minimum)
      rules:                   # first match wins, fnmatch patterns on layer names
        - {match: "h.*.mlp.c_fc", bits: 8}
        - {match: "h.0.*", bits: none}
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FORMAT_NAMES = ("q8_0", "q4_0", "q4_1")
DEFAULTS = FORMAT_NAMES + ("int8", "int4", "none")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantRule(_Strict):
    match: str = Field(min_length=1)  # a layer name pattern: `*` any characters, `?` one
    bits: Literal[4, 8, "none"] | None = None
    format: Literal["q8_0", "q4_0", "q4_1", "none"] | None = None  # instead of bits

    @field_validator("bits", mode="before")
    @classmethod
    def _bits(cls, v):
        if v is None or v == "none" or v in (4, 8):
            return v
        raise ValueError(f"bits {v!r} is not supported by the weight-only block formats (4, 8 or none)")

    @model_validator(mode="after")
    def _one_choice(self):
        if (self.bits is None) == (self.format is None):
            raise ValueError("a rule gives either `bits` (4, 8, none) or `format` (q8_0, q4_0, q4_1, none)")
        return self


class QuantizeSpec(_Strict):
    default: Literal["q8_0", "q4_0", "q4_1", "int8", "int4", "none"] = "q4_1"
    method: Literal["weight_only"] = "weight_only"
    format: Literal["q4_0", "q4_1"] = "q4_1"
    rules: list[QuantRule] = Field(default_factory=list)

    def resolve(self, choice: str | None) -> str | None:
        """A format name (or None: fp32) for a default or a rule's format."""
        if choice in (None, "none"):
            return None
        return {"int8": "q8_0", "int4": self.format}.get(choice, choice)

    def rule_format(self, rule: QuantRule) -> str | None:
        if rule.format is not None:
            return self.resolve(rule.format)
        if rule.bits is None or rule.bits == "none":
            return None
        return "q8_0" if rule.bits == 8 else self.format
