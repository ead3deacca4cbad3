"""The resolved view of a spec: what will be built, as a flat spec that builds the same.

Extends and overrides applied, blocks and repeats expanded into scoped layer names,
expressions evaluated and every default written out. One layer per line.
"""
from __future__ import annotations

import yaml

from .lower import Loaded

_FIRST = ("op", "name", "in")


def resolved_dict(loaded: Loaded) -> dict:
    spec = loaded.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    spec["name"] = loaded.name
    spec["layers"] = [
        {k: layer[k] for k in _FIRST if k in layer} | {k: v for k, v in layer.items() if k not in _FIRST}
        for layer in spec["layers"]
    ]
    for layer in spec["layers"]:
        if isinstance(layer.get("init"), dict):
            layer["init"] = {p: _init_args(v) for p, v in layer["init"].items()}
    order = ["lbdlc", "name", "description", "inputs", "layers", "outputs"]
    return {k: spec[k] for k in order if k in spec} | {k: v for k, v in spec.items() if k not in order}


def _init_args(init: dict) -> dict:
    """An `init:` entry with the arguments its kind takes (a dump writes them all, and a
    `zeros` initialiser given `std` would not load back)."""
    from .spec import InitSpec

    allowed = {k for k, _ in InitSpec.model_construct(**init).args()}
    return {k: v for k, v in init.items() if k == "kind" or k in allowed}


def _flow(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**9)
    return text.removesuffix("\n...\n").strip()  # a bare scalar ends its "document"


def resolved_yaml(loaded: Loaded) -> str:
    spec = resolved_dict(loaded)
    lines = [f"# Resolved from {loaded.path.name} by `lbdlc show`: builds the same model.", f"lbdlc: {spec['lbdlc']}"]
    for key, value in spec.items():
        if key == "lbdlc":
            continue
        if key == "inputs":
            lines.append("inputs:")
            lines += [f"  {name}: {_flow(inp)}" for name, inp in value.items()]
        elif key == "layers":
            lines.append("layers:")
            lines += [f"  - {_flow(layer)}" for layer in value]
        else:
            lines.append(f"{key}: {_flow(value)}")
    return "\n".join(lines) + "\n"
