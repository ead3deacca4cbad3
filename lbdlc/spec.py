"""The spec language: Pydantic models for a model file, validated strictly at YAML positions.

A layer's model is its op's attribute model plus the wiring fields every layer has
(`op`, `name`, `in`); layers form a union discriminated by `op`, so JSON Schema and
error messages know each op's parameters.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, create_model, model_validator

from . import ops
from .annotations import literal_tag, model_at
from .errors import SpecError, SpecErrors, did_you_mean
from .quant_spec import QuantizeSpec
from .lora import FinetuneSpec
from .source import LocDict, key_loc, loc_of, node_at
from .training.schema import TrainSpec

LANGUAGE_VERSION = 1

Identifier = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
# Layers of an expanded spec carry their scope: `stage2.0.conv1` (block use, repetition, layer).
ScopedName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")]
DType = Literal["float32", "float16", "bfloat16", "int64", "int32", "bool"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class InputSpec(StrictModel):
    """A model input: its shape (sizes, or names for symbolic dimensions such as `batch`) and dtype."""

    shape: list[PositiveInt | Identifier] = Field(min_length=1)
    dtype: DType = "float32"


class InitSpec(StrictModel):
    """How to initialise one parameter of a layer, replacing the op's default (PyTorch's)."""

    kind: Literal["normal", "uniform", "zeros", "ones", "constant"]
    std: PositiveFloat = 1.0  # normal
    mean: float = 0.0  # normal
    bound: PositiveFloat | None = None  # uniform: U(-bound, bound)
    value: float | None = None  # constant

    @model_validator(mode="after")
    def _arguments_fit_the_kind(self):
        needs = {"uniform": "bound", "constant": "value"}.get(self.kind)
        if needs and getattr(self, needs) is None:
            raise ValueError(f"init kind '{self.kind}' needs `{needs}`")
        given = {k for k in self.model_fields_set if k != "kind"}
        allowed = {"normal": {"std", "mean"}, "uniform": {"bound"}, "constant": {"value"}}.get(self.kind, set())
        if given - allowed:
            raise ValueError(f"init kind '{self.kind}' takes no `{sorted(given - allowed)[0]}`"
                             + (f" (it takes {', '.join(sorted(allowed))})" if allowed else ""))
        return self

    def args(self) -> tuple:
        return {"normal": (("std", self.std), ("mean", self.mean)), "uniform": (("bound", self.bound),),
                "constant": (("value", self.value),)}.get(self.kind, ())


def _known_pass(name: str) -> str:
    from .passes import PASSES
    from .passes.pipeline import unknown_pass_hint

    if name not in PASSES:
        raise ValueError(f"unknown pass ({unknown_pass_hint(name)})")
    return name


def _known_target(entry: Any) -> Any:
    from .targets import check_entry

    return check_entry(entry)


class DeploySpec(StrictModel):
    """Where `lbdlc build` deploys the model (lbdlc/targets.py): one self-contained bundle per
    target in deploy/<name>; `lbdlc targets` lists the presets; --target replaces the list."""

    targets: list[Annotated[str | dict[str, Any], AfterValidator(_known_target)]] = Field(min_length=1)


class CompileSpec(StrictModel):
    """How `lbdlc build` optimizes the inference artifacts (passes/pipeline.py): an -O level or
    a list of passes (`lbdlc passes` lists them); command-line -O and --passes override it."""

    level: Annotated[int, Field(ge=0, le=3)] | None = None
    passes: list[Annotated[str, AfterValidator(_known_pass)]] | None = None
    pytorch: bool = False  # model.py gets the passes too (never those that change training, with `train:`)

    @model_validator(mode="after")
    def _level_or_passes(self):
        if self.level is not None and self.passes is not None:
            raise ValueError("give either `level` or `passes`, not both")
        return self


class LayerBase(StrictModel):
    """What every layer has besides its op's own attributes."""

    name: ScopedName | None = None  # defaults to the op name and a counter: conv2d_1, conv2d_2, ...
    in_: ScopedName | list[ScopedName] | None = Field(None, alias="in")  # defaults to the previous layer
    # Weight tying: this layer's parameter (key) is another layer's (value, a full name), e.g.
    # a language-model head sharing the token embedding: `tie: {weight: wte.weight}`.
    tie: dict[str, ScopedName] | None = None
    # Initialisers by local parameter name, e.g. GPT-2's `init: {weight: {kind: normal, std: 0.02}}`.
    init: dict[str, InitSpec] | None = None


@lru_cache(maxsize=None)
def layer_model(op_name: str) -> type[BaseModel]:
    op = ops.get(op_name)
    clash = set(op.Attrs.model_fields) & (set(LayerBase.model_fields) | {"in", "repeat", "when", "layers"})
    if clash:  # an op attribute would shadow a key every layer has (`init`, `tie`, `name`)
        raise ValueError(f"op '{op_name}' has an attribute named like a layer key: {sorted(clash)[0]}")
    return create_model(
        "".join(p.capitalize() for p in op_name.split("_")) + "Layer",
        __base__=(op.Attrs, LayerBase),
        __doc__=op.summary,
        op=(Literal[op_name], ...),
    )


def _spec_model(op_names: tuple[str, ...]) -> type[BaseModel]:
    layer_union = Annotated[Union[tuple(layer_model(n) for n in op_names)], Field(discriminator="op")]

    class Spec(StrictModel):
        """An lbdlc model spec."""

        lbdlc: Literal[1]
        name: Identifier | None = None  # defaults to the file name
        description: str | None = None
        inputs: dict[Identifier, InputSpec] = Field(min_length=1)
        layers: list[layer_union] = Field(min_length=1)  # type: ignore[valid-type]
        outputs: list[ScopedName] | None = None  # defaults to the last layer
        train: TrainSpec | None = None  # the training protocol (lbdlc/training/schema.py)
        compile: CompileSpec | None = None  # optimization of the inference artifacts (passes/pipeline.py)
        quantize: QuantizeSpec | None = None  # weight-only block quantization (lbdlc/quant_spec.py)
        finetune: FinetuneSpec | None = None  # LoRA fine-tuning (lbdlc/lora.py, passes/lora.py)
        deploy: DeploySpec | None = None  # deployment targets and their bundles (lbdlc/targets.py, lbdlc/bundle.py)

    return Spec


_SPEC_CACHE: dict[tuple[str, ...], type[BaseModel]] = {}


def spec_model() -> type[BaseModel]:
    """The Spec model for the ops registered now (extensions may register more)."""
    key = tuple(sorted(ops.REGISTRY))
    if key not in _SPEC_CACHE:
        _SPEC_CACHE[key] = _spec_model(key)
    return _SPEC_CACHE[key]


def attrs_of(layer: BaseModel) -> ops.OpAttrs:
    """The op-attribute part of a validated layer."""
    op = ops.get(layer.op)
    return op.Attrs.model_validate({k: getattr(layer, k) for k in op.Attrs.model_fields})


def parse_spec(raw: Any, file: str) -> BaseModel:
    """Validate loaded YAML (LocDict) into a Spec; every problem becomes a located SpecError."""
    if not isinstance(raw, LocDict):
        raise SpecError("a spec is a mapping of keys (lbdlc, inputs, layers, ...)", getattr(raw, "loc", None))
    _check_version(raw, file)
    return validate(spec_model(), raw)


def validate(model: type[BaseModel], raw: Any) -> BaseModel:
    """Pydantic validation whose errors point at YAML positions, with did-you-mean for keys."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        errors = _without_misspelled_duplicates(exc.errors(include_url=False), raw, model)
        raise SpecErrors(_located(e, raw, model) for e in errors) from None


def _without_misspelled_duplicates(errors: list[dict], raw, model) -> list[dict]:
    """A misspelled required key shows up twice, as unknown and as missing: keep the first."""
    misspelled = set()
    for e in errors:
        if e["type"] == "extra_forbidden":
            path = tuple(e["loc"])
            close = did_you_mean(path[-1], _allowed_keys(path[:-1], model))
            if close:
                misspelled.add(path[:-1] + (close.split("'")[1],))
    return [e for e in errors if not (e["type"] == "missing" and tuple(e["loc"]) in misspelled)]


def _check_version(raw: LocDict, file: str) -> None:
    if "lbdlc" not in raw:
        raise SpecError(
            "the spec does not say which language version it is written in",
            raw.loc,
            hint=f"start the file with `lbdlc: {LANGUAGE_VERSION}`",
        )
    version = raw["lbdlc"]
    if version != LANGUAGE_VERSION or isinstance(version, bool):
        raise SpecError(
            f"unsupported spec language version {version!r}: this lbdlc reads version {LANGUAGE_VERSION}",
            raw.value_locs["lbdlc"],
            hint="a newer lbdlc may read it; upgrade with `pip install -U lbdlc`" if isinstance(version, int) and version > LANGUAGE_VERSION else f"write `lbdlc: {LANGUAGE_VERSION}`",
        )


def _located(err: dict, raw: LocDict, model) -> SpecError:
    if tuple(err["loc"])[:1] == ("train",):
        from .training.schema import located_error

        return located_error(err, raw)
    path, kind, msg = tuple(err["loc"]), err["type"], err["msg"]
    where = _describe(path, raw)
    error = _located_error(err, path, kind, msg, where, raw, model)
    error.notes += trail_notes(raw, path)
    return error


def trail_notes(raw, path: tuple) -> list:
    """Where an expanded layer was instantiated (block uses, repetitions), for its errors."""
    if len(path) >= 2 and path[0] == "layers" and isinstance(path[1], int):
        layer = node_at(raw, path[:2])
        return list(getattr(layer, "trail", []))
    return []


def _located_error(err, path, kind, msg, where, raw, model) -> SpecError:
    if kind == "extra_forbidden":
        key = path[-1]
        allowed = _allowed_keys(path[:-1], model)
        hint = did_you_mean(key, allowed) or (f"allowed keys here: {', '.join(allowed)}" if allowed else None)
        return SpecError(f"unknown key '{key}'{where}", key_loc(raw, path) or loc_of(raw, path), hint)
    if kind == "missing":
        return SpecError(f"missing required key '{path[-1]}'{where}", loc_of(raw, path[:-1]))
    if kind == "union_tag_invalid":
        tag = err["ctx"]["tag"]
        hint = did_you_mean(tag, ops.REGISTRY) or "`lbdlc ops` lists the ops; blocks are defined under `blocks:`"
        return SpecError(f"unknown op '{tag}'", loc_of(raw, path + ("op",)), hint)
    if kind == "union_tag_not_found":
        return SpecError(
            "a layer needs an `op` key", loc_of(raw, path), hint="e.g. `- {op: linear, out_features: 10}`"
        )
    value = node_at(raw, path)
    shown = f", got {value!r}" if value is not None and not isinstance(value, (dict, list)) else ""
    message = msg[len("Value error, ") :] if msg.startswith("Value error, ") else msg
    return SpecError(f"{_field_name(path)}: {message[0].lower()}{message[1:]}{shown}", loc_of(raw, path))


def _field_name(path: tuple) -> str:
    parts = [str(p) for p in path if not isinstance(p, int)]
    return parts[-1] if parts else "spec"


def _describe(path: tuple, raw: LocDict) -> str:
    """' in layer 'fc1' (linear)' for errors inside a layer, '' elsewhere."""
    if len(path) >= 2 and path[0] == "layers" and isinstance(path[1], int):
        layer = node_at(raw, path[:2])
        if isinstance(layer, dict):
            op, name = layer.get("op"), layer.get("name")
            label = f" '{name}'" if name else f" {path[1]}"
            return f" in layer{label}" + (f" ({op})" if isinstance(op, str) and op in ops.REGISTRY else "")
    return ""


def _allowed_keys(path: tuple, root) -> list[str]:
    model = _model_at(root, path)
    if model is None:
        return []
    return [f.alias or n for n, f in model.model_fields.items()]


def _model_at(annotation, path: tuple):
    """The Pydantic model reached by following `path` (Pydantic error loc) through annotations."""
    return model_at(annotation, path, lambda members, part: next((m for m in members if literal_tag(m, "op") == part), None))


# ---------------------------------------------------------------------------------------
# The source language: what a user writes before blocks, repeats and expressions are
# expanded (lbdlc/expand.py). Layer items stay loose here; each expanded layer is validated
# by its op's model above, at its own YAML position.

Scalar = Union[bool, int, float, str]
ParamType = Literal["int", "float", "bool", "str"]


class ParamDecl(StrictModel):
    """A block parameter: its type and, if it is optional, its default."""

    type: ParamType | None = None  # inferred from the default when left out
    default: Scalar | list[Scalar] | None = None
    description: str | None = None


class BlockDef(StrictModel):
    """A reusable, parameterised sub-graph, used in `layers` like an op: `{op: <block>, param: value}`."""

    description: str | None = None
    params: dict[Identifier, ParamType | ParamDecl] = Field(default_factory=dict)
    inputs: list[Identifier] = Field(default_factory=lambda: ["x"], min_length=1)
    outputs: list[ScopedName] | None = None  # defaults to the last layer
    layers: list[dict[str, Any]] = Field(min_length=1)


class SourceSpec(StrictModel):
    """An lbdlc model spec as written."""

    lbdlc: Literal[1]
    extends: str | None = None  # a base spec, merged under this one (lbdlc/compose.py)
    name: Identifier | None = None
    description: str | None = None
    vars: dict[Identifier, Scalar | list[Scalar]] = Field(default_factory=dict)
    blocks: dict[Identifier, BlockDef] = Field(default_factory=dict)
    inputs: dict[Identifier, dict[str, Any]] = Field(min_length=1)
    layers: list[dict[str, Any]] = Field(min_length=1)
    outputs: list[ScopedName] | None = None
    train: dict[str, Any] | None = None  # validated after expansion (lbdlc/training/schema.py)
    compile: CompileSpec | None = None  # optimization of the inference artifacts (passes/pipeline.py)
    quantize: QuantizeSpec | None = None  # weight-only block quantization (lbdlc/quant_spec.py)
    finetune: FinetuneSpec | None = None  # LoRA fine-tuning (lbdlc/lora.py, passes/lora.py)
    deploy: DeploySpec | None = None  # deployment targets and their bundles (lbdlc/targets.py, lbdlc/bundle.py)


def source_keys() -> list[str]:
    return list(SourceSpec.model_fields)


# Upgrades of older language versions: MIGRATIONS[v] rewrites a version-v spec (LocDict,
# positions kept) into version v + 1. Version 1 is the first, so there are none yet.
MIGRATIONS: dict[int, Any] = {}


def migrate(raw: LocDict) -> LocDict:
    version = raw.get("lbdlc")
    while isinstance(version, int) and version in MIGRATIONS:
        raw = MIGRATIONS[version](raw)
        version = raw["lbdlc"]
    return raw


def parse_source(raw: Any, file: str) -> SourceSpec:
    if not isinstance(raw, LocDict):
        raise SpecError("a spec is a mapping of keys (lbdlc, inputs, layers, ...)", getattr(raw, "loc", None))
    _check_version(raw, file)
    return validate(SourceSpec, raw)
