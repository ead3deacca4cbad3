"""The spec's `quantize:` section (docs/quantization.md).

Weight-only block formats (passes/quantize.py rewrites the IR):

    quantize:
      default: q4_1            # q8_0 | q4_0 | q4_1 | int4 (= `format`) | int8 | none
      method: weight_only      # weight_only | dynamic | static (int8: lbdlc/quant_int8.py)
      format: q4_1             # what 4 bits means: q4_0 (symmetric) | q4_1 (scale + minimum)
      rules:                   # first match wins, fnmatch patterns on layer names
        - {match: "h.*.mlp.c_fc", bits: 8}
        - {match: "h.0.*", bits: none}

int8 post-training quantization of the ONNX artifact by ONNX Runtime's quantizer:

    quantize:
      default: int8
      method: static           # dynamic (activations quantized at run time) | static (QDQ, calibrated)
      calibration: {split: train, samples: 64, observer: minmax}   # minmax | entropy | percentile
      per_channel: true        # one weight scale per output channel
      reduce_range: true       # 7-bit weights: no int16 saturation on AVX2 CPUs without VNNI
      weights: int8            # int8 | uint8 (unsigned weights: the other way around the trap)

`method` defaults to dynamic for `default: int8` and to weight_only otherwise; `int8` with
`method: weight_only` is Q8_0. Under dynamic/static, a rule's `bits: 8` is int8, `bits: none`
keeps the layer fp32 and `bits: 4` (or a `format`) block-quantizes it in the IR first.
"""
from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    field_validator,
    model_validator,
)

FORMAT_NAMES = ("q8_0", "q4_0", "q4_1")
DEFAULTS = FORMAT_NAMES + ("int8", "int4", "none")
INT8_METHODS = ("dynamic", "static")


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


class Calibration(_Strict):
    """Where static int8 quantization gets activation ranges: a split of the spec's `train:`
    data, or `synthetic` random inputs of the model's signature."""
    split: Literal["train", "val", "test", "synthetic"] = "train"
    samples: PositiveInt = 64
    observer: Literal["minmax", "entropy", "percentile"] = "minmax"
    seed: int = 0
    sizes: dict[str, PositiveInt] = Field(default_factory=dict)  # synthetic: symbolic dims other than the batch (default 16)


class QuantizeSpec(_Strict):
    default: Literal["q8_0", "q4_0", "q4_1", "int8", "int4", "none"] = "q4_1"
    method: Literal["weight_only", "dynamic", "static"] | None = None
    format: Literal["q4_0", "q4_1"] = "q4_1"
    rules: list[QuantRule] = Field(default_factory=list)
    calibration: Calibration | None = None  # static int8 only
    per_channel: bool = True
    reduce_range: bool = True
    weights: Literal["int8", "uint8"] = "int8"
    # Quantization-aware training: train.py trains the layers this section quantizes with
    # fake-quantized weights (block formats: backends/train_qat.py), or for int8 static with
    # int8 weights and uint8 activations whose learned ranges the build uses
    # (backends/train_qat_int8.py); an error with int8 dynamic (lbdlc/quant_qat.py).
    qat: bool = False

    @property
    def int8_method(self) -> str | None:
        """dynamic or static when the ONNX artifact gets ONNX Runtime's int8 quantization, else None."""
        method = self.method or ("dynamic" if self.default == "int8" else "weight_only")
        return method if method in INT8_METHODS else None

    def resolve(self, choice: str | None) -> str | None:
        """A block format name (or None: fp32 in the IR) for a default or a rule's format."""
        if choice in (None, "none"):
            return None
        if choice == "int8":
            return None if self.int8_method else "q8_0"
        return {"int4": self.format}.get(choice, choice)

    def rule_format(self, rule: QuantRule) -> str | None:
        if rule.format is not None:
            return self.resolve(rule.format)
        if rule.bits is None or rule.bits == "none":
            return None
        if rule.bits == 8:
            return None if self.int8_method else "q8_0"
        return self.format
