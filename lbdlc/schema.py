"""JSON Schema of the spec language, generated from the Pydantic models, for editors.

Layers are a union over the ops (each with its own attributes, selected by `op`), block
uses and groups. Wherever a value may be written as an expression (`"${4 * d_model}"`),
the schema accepts that string too.
"""
from __future__ import annotations

from . import ops
from .spec import BlockDef, SourceSpec, layer_model

EXPRESSION = {"type": "string", "pattern": r"\$\{", "description": "an expression, e.g. ${4 * d_model}"}
_WIRING = {
    "name": {"type": "string", "description": "the layer's name; parameters are named <name>.<param>"},
    "in": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
           "description": "input layer(s); default: the previous layer"},
    "repeat": {"anyOf": [{"type": "integer", "minimum": 1}, EXPRESSION], "description": "repeat in series; `i` is the index"},
    "when": {"anyOf": [{"type": "boolean"}, EXPRESSION], "description": "include only when true; when false the input passes through"},
}


def _items_may_be_expressions(prop: dict) -> dict:
    """List items may be expressions too (`size: ["${h}", "${w}"]`), at any depth."""
    prop = dict(prop)
    if isinstance(prop.get("items"), dict):
        prop["items"] = {"anyOf": [_items_may_be_expressions(prop["items"]), EXPRESSION]}
    if isinstance(prop.get("prefixItems"), list):
        prop["prefixItems"] = [{"anyOf": [_items_may_be_expressions(p), EXPRESSION]} for p in prop["prefixItems"]]
    if isinstance(prop.get("anyOf"), list):
        prop["anyOf"] = [_items_may_be_expressions(p) for p in prop["anyOf"]]
    return prop


def _op_layer(name: str, defs: dict) -> dict:
    schema = layer_model(name).model_json_schema(ref_template="#/$defs/{model}")
    defs.update(schema.pop("$defs", {}))
    for key, prop in schema["properties"].items():
        if key not in ("op", "name", "in"):
            prop = _items_may_be_expressions(prop)
            schema["properties"][key] = {"anyOf": [prop, EXPRESSION], **({"default": prop["default"]} if "default" in prop else {})}
    schema["properties"].update({k: v for k, v in _WIRING.items() if k in ("repeat", "when")})
    schema["properties"]["name"] = _WIRING["name"]
    schema["properties"]["in"] = _WIRING["in"]
    return schema


def json_schema() -> dict:
    defs: dict = {}
    layer_refs = []
    for name in sorted(ops.REGISTRY):
        title = layer_model(name).__name__
        defs[title] = _op_layer(name, defs)
        layer_refs.append({"$ref": f"#/$defs/{title}"})
    defs["BlockUse"] = {
        "type": "object",
        "description": "a use of a block defined under `blocks:`; its other keys are the block's parameters",
        "properties": {"op": {"type": "string", "not": {"enum": sorted(ops.REGISTRY)}}, **_WIRING},
        "required": ["op"],
    }
    defs["Group"] = {
        "type": "object",
        "description": "a list of layers in its own name scope, e.g. repeated as a unit",
        "properties": {**{k: v for k, v in _WIRING.items()}, "layers": {"type": "array", "items": {"$ref": "#/$defs/Layer"}}},
        "required": ["layers"],
        "additionalProperties": False,
    }
    defs["Layer"] = {"anyOf": layer_refs + [{"$ref": "#/$defs/Group"}, {"$ref": "#/$defs/BlockUse"}]}
    if "InitSpec" in defs:  # `init: {weight: {kind: normal, std: "${init_std}"}}`
        props = defs["InitSpec"]["properties"]
        for key in [k for k in props if k != "kind"]:
            props[key] = {"anyOf": [props[key], EXPRESSION]}

    root = SourceSpec.model_json_schema(ref_template="#/$defs/{model}")
    defs.update(root.pop("$defs", {}))
    root["properties"]["layers"]["items"] = {"$ref": "#/$defs/Layer"}
    defs[BlockDef.__name__]["properties"]["layers"]["items"] = {"$ref": "#/$defs/Layer"}
    root["properties"]["inputs"]["additionalProperties"] = {
        "type": "object",
        "properties": {
            "shape": {"type": "array", "items": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string"}]}},
            "dtype": {"enum": ["float32", "float16", "bfloat16", "int64", "int32", "bool"]},
        },
        "required": ["shape"],
        "additionalProperties": False,
    }
    from .training.schema import json_schema as train_schema

    root["properties"]["train"] = train_schema(defs, EXPRESSION)  # the training protocol
    # A spec that extends another may leave inputs and layers to its base.
    root["required"] = [k for k in root.get("required", []) if k not in ("inputs", "layers")]
    root["if"] = {"not": {"required": ["extends"]}}
    root["then"] = {"required": ["inputs", "layers"]}
    root["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    root["title"] = "lbdlc spec"
    root["$defs"] = defs
    return root
