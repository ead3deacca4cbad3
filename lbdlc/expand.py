"""Expansion: blocks, repeats, groups and expressions become one flat list of layers.

The result is an ordinary flat spec (a LocDict, positions kept) whose layers have scoped
names (`stage2.0.conv1`: block use `stage2`, repetition 0, layer `conv1`) and explicit
inputs. `lbdlc show` prints it; building from it gives the same artifacts.

Scoping rules:
- `vars` are visible everywhere; a block's parameters inside its layers; `i` (the
  repetition index) inside a `repeat`. Inner names shadow outer ones.
- A layer's `in` names a layer of its own scope or, through groups and repeats, of an
  enclosing scope; a block sees only its inputs and its own layers. `a.b` reaches into a
  scope (`stage2.conv1`, `encoder.memory`); a repeated item's name means its last repetition.
- Without `in`, a layer reads the previous item of its scope (the first one reads the
  scope's input). A repeated item chains its repetitions: each gets the previous one's
  output as its first input and the same other inputs (a decoder stack's memory).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import ops
from .errors import Note, SpecError, did_you_mean
from .ir import SpecScope
from .expr import ExprError, has_expression, substitute
from .source import Loc, LocDict, LocList
from .spec import BlockDef, ParamDecl, SourceSpec

LAYER_KEYS = ("op", "name", "in", "repeat", "when")
GROUP_KEYS = ("name", "in", "repeat", "when", "layers")
_MISSING = object()


@dataclass
class Ref:
    """A name written in `in:` or `outputs:`, resolved once every scope is known."""

    text: str
    scope: "Scope"
    loc: Loc | None


@dataclass
class Entry:
    output: "str | Ref | None" = None  # full name of the value this item produces
    scope: "Scope | None" = None  # the names inside it (groups, block uses, repeats)
    outputs: dict[str, "str | Ref"] = field(default_factory=dict)  # named outputs of a block use


@dataclass
class Scope:
    prefix: str
    parent: "Scope | None" = None
    closed: bool = False  # blocks do not see the names around their use
    entries: dict[str, Entry] = field(default_factory=dict)

    def visible(self) -> list[str]:
        names, scope = [], self
        while scope is not None:
            names += [n for n in scope.entries if n not in names]
            scope = None if scope.closed else scope.parent
        return names


def _valid_name(name: str, nested: bool) -> bool:
    first, *rest = name.split(".")
    ok_first = first.isidentifier() or (nested and first.isdigit())
    return ok_first and all(p.isidentifier() or p.isdigit() for p in rest)


def _at(value, key, default=None):
    return value.value_locs.get(key, default) if isinstance(value, LocDict) else default


class Expander:
    def __init__(self, raw: LocDict, source: SourceSpec):
        self.raw = raw
        self.source = source
        self.layers = LocList()
        self.layers.loc, self.layers.item_locs = raw.value_locs["layers"], []
        self.block_stack: list[str] = []
        self.scopes: dict[str, SpecScope] = {}  # name prefix -> the block use or repeat behind it
        self.vars = self._evaluate_vars()

    # -- values -------------------------------------------------------------------------
    def _evaluate_vars(self) -> dict:
        out: dict = {}
        raw_vars = self.raw.get("vars") or LocDict()
        for name in raw_vars:
            if name in SourceSpec.model_fields:
                raise SpecError(f"the variable '{name}' has the name of a top-level key", raw_vars.key_locs[name],
                                hint=f"`--set {name}=...` would mean the key; rename the variable, e.g. n_{name}")
            out[name] = self.value(raw_vars[name], out, raw_vars.value_locs[name])
        return out

    def value(self, value, names: dict, loc: Loc | None, trail: list[Note] = ()):
        """Evaluate `${...}` in a scalar (or inside a list), reporting errors at the character."""
        if isinstance(value, LocList):
            out = LocList(self.value(v, names, l, trail) for v, l in zip(value, value.item_locs))
            out.loc, out.item_locs = value.loc, value.item_locs
            return out
        if isinstance(value, LocDict):
            out = LocDict()
            out.loc, out.key_locs, out.value_locs = value.loc, value.key_locs, value.value_locs
            for k in value:
                out[k] = self.value(value[k], names, value.value_locs[k], trail)
            return out
        if not has_expression(value):
            return value
        try:
            return substitute(value, names)
        except ExprError as exc:
            where = Loc(loc.file, loc.line, loc.col + exc.offset) if loc else None
            raise SpecError(exc.message, where, hint=exc.hint, notes=list(trail)) from None

    # -- items --------------------------------------------------------------------------
    def expand_items(self, items, scope: Scope, inputs: list, names: dict, trail: list[Note]):
        """Expand a list of items in `scope`; returns the output of the last one."""
        local_names = self._local_names(items, scope, names)
        previous = inputs[0]
        for item, name, item_loc in zip(items, local_names, items.item_locs):
            in_refs = self._inputs(item, scope, names) if "in" in item else [previous]
            previous = self.expand_item(item, item_loc, scope, name, in_refs, names, trail)
        return previous

    def _local_names(self, items, scope: Scope, names: dict) -> list[str]:
        """Explicit names, else `<op>_<k>` (`group_<k>` for groups) counted per scope."""
        out, counts = [], {}
        explicit = {}
        for item, loc in zip(items, items.item_locs):
            if not isinstance(item, LocDict):
                raise SpecError("a layer is a mapping such as `{op: linear, out_features: 10}`", loc)
            if "op" not in item and "layers" not in item:
                raise SpecError("a layer needs an `op` key (or `layers:` for a group)", loc, hint="e.g. `- {op: linear, out_features: 10}`")
            if "name" in item:
                name = self.value(item["name"], names, item.value_locs["name"])
                # Inside blocks and groups, digit names are allowed too (torchvision's `downsample.0`);
                # dotted names are what `lbdlc show` writes for expanded layers.
                if not isinstance(name, str) or not _valid_name(name, nested=bool(scope.prefix)):
                    raise SpecError(f"a layer name is an identifier (letters, digits, _), got {name!r}", item.value_locs["name"])
                if name in explicit or name in scope.entries:
                    first = explicit.get(name)
                    raise SpecError(f"the name '{name}' is already used", item.value_locs["name"],
                                    notes=[Note("first used here", first)] if first else [],
                                    hint="names must be unique within a block, group or the model")
                explicit[name] = item.value_locs["name"]
        for item in items:
            if "name" in item:
                out.append(self.value(item["name"], names, None))
                continue
            base = item["op"] if "op" in item and isinstance(item["op"], str) else "group"
            k = counts.get(base, 0) + 1
            while f"{base}_{k}" in explicit or f"{base}_{k}" in scope.entries:
                k += 1
            counts[base] = k
            out.append(f"{base}_{k}")
        return out

    def _inputs(self, item: LocDict, scope: Scope, names: dict) -> list:
        refs = item["in"]
        if isinstance(refs, str):
            return [Ref(self.value(refs, names, item.value_locs["in"]), scope, item.value_locs["in"])]
        if isinstance(refs, LocList) and refs and all(isinstance(r, str) for r in refs):
            return [Ref(self.value(r, names, l), scope, l) for r, l in zip(refs, refs.item_locs)]
        raise SpecError("`in` names a layer or input, or lists several", item.value_locs["in"], hint="e.g. `in: [x, skip]`")

    def expand_item(self, item: LocDict, loc: Loc, scope: Scope, name: str, inputs: list, names: dict, trail: list[Note]):
        if "repeat" not in item:
            return self._expand_one(item, loc, scope, name, inputs, names, trail)
        count = self.value(item["repeat"], names, item.value_locs["repeat"], trail)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise SpecError(f"`repeat` is a positive whole number, got {count!r}", item.value_locs["repeat"],
                            hint="e.g. `repeat: 6` or `repeat: ${n_layers}`")
        repeated = Scope(f"{scope.prefix}{name}.", parent=scope)
        self.scopes[scope.prefix + name] = SpecScope(repeat=count)
        entry = Entry(scope=repeated)
        scope.entries[name] = entry
        current = inputs
        for k in range(count):
            out = self._expand_one(item, loc, repeated, str(k), current, {**names, "i": k},
                                   trail + [Note(f"in repetition {k} of '{scope.prefix}{name}'", _at(item, "repeat", loc))])
            current = [out] + list(inputs[1:])  # later inputs (a decoder's memory) stay the same
        entry.output = current[0]
        return current[0]

    def _expand_one(self, item: LocDict, loc: Loc, scope: Scope, name: str, inputs: list, names: dict, trail: list[Note]):
        if "when" in item and not self._included(item, names, trail):
            # A skipped item passes its (first) input through: `in: [bn3, downsample]` then
            # reads what `downsample` would have read; a skipped `add` of [y, x] leaves y.
            scope.entries[name] = Entry(output=inputs[0])
            return inputs[0]
        op = item.get("op")
        if "layers" in item:
            return self._group(item, scope, name, inputs, names, trail)
        if isinstance(op, str) and op in self.source.blocks:
            return self._block_use(item, scope, name, inputs, names, trail)
        if isinstance(op, str) and op not in ops.REGISTRY and did_you_mean(op, self.source.blocks):
            raise SpecError(f"unknown op '{op}'", item.value_locs["op"], hint=did_you_mean(op, self.source.blocks))
        # Ops, and unknown ops too: validating the flat spec reports every bad layer at once.
        return self._layer(item, loc, scope, name, inputs, names, trail)

    def _included(self, item: LocDict, names: dict, trail) -> bool:
        value = self.value(item["when"], names, item.value_locs["when"], trail)
        if not isinstance(value, bool):
            raise SpecError(f"`when` is true or false, got {value!r}", item.value_locs["when"], hint="e.g. `when: ${i == 0}`")
        return value

    def _layer(self, item, loc, scope, name, inputs, names, trail):
        full = scope.prefix + name
        flat = LocDict()
        flat.loc, flat.key_locs, flat.value_locs = loc, {}, {}
        flat.trail = trail
        flat["op"] = item["op"]
        flat.key_locs["op"], flat.value_locs["op"] = item.key_locs["op"], item.value_locs["op"]
        flat["name"] = full
        flat.key_locs["name"] = flat.value_locs["name"] = item.value_locs.get("name", loc)
        flat["in"] = inputs  # Refs and full names, resolved in `resolve`
        flat.key_locs["in"] = flat.value_locs["in"] = item.value_locs.get("in", loc)
        for key in item:
            if key in LAYER_KEYS:
                continue
            flat[key] = self.value(item[key], names, item.value_locs[key], trail)
            flat.key_locs[key], flat.value_locs[key] = item.key_locs[key], item.value_locs[key]
        self.layers.append(flat)
        self.layers.item_locs.append(loc)
        scope.entries[name] = Entry(output=full)
        return full

    def _group(self, item, scope, name, inputs, names, trail):
        for key in item:
            if key not in GROUP_KEYS:
                raise SpecError(f"unknown key '{key}' in a group of layers", item.key_locs[key],
                                hint=did_you_mean(key, GROUP_KEYS) or "a group has only name, in, repeat and layers")
        layers = item["layers"]
        if not isinstance(layers, LocList) or not layers:
            raise SpecError("`layers` of a group is a non-empty list", item.value_locs["layers"])
        inner = Scope(f"{scope.prefix}{name}.", parent=scope)
        entry = Entry(scope=inner)
        scope.entries[name] = entry
        entry.output = self.expand_items(layers, inner, inputs, names, trail)
        return entry.output

    def _block_use(self, item, scope, name, inputs, names, trail):
        block_name = item["op"]
        if block_name in self.block_stack:
            cycle = " -> ".join(self.block_stack[self.block_stack.index(block_name):] + [block_name])
            raise SpecError(f"block '{block_name}' uses itself ({cycle})", item.value_locs["op"],
                            hint="blocks can nest, but not recursively")
        block: BlockDef = self.source.blocks[block_name]
        raw_block = self.raw["blocks"][block_name]
        params = self._block_params(item, block_name, block, raw_block, names, trail)
        if len(inputs) != len(block.inputs):
            raise SpecError(
                f"block '{block_name}' takes {len(block.inputs)} input{'s' if len(block.inputs) > 1 else ''} "
                f"({', '.join(block.inputs)}), got {len(inputs)}",
                item.value_locs.get("in", item.value_locs["op"]),
                notes=[Note("the block is defined here", self.raw["blocks"].key_locs[block_name])],
            )
        inner = Scope(f"{scope.prefix}{name}.", parent=scope, closed=True)
        self.scopes[scope.prefix + name] = SpecScope(
            block=block_name, params=tuple((p, params[p]) for p in block.params), inputs=tuple(block.inputs),
            description=block.description, defined=self.raw["blocks"].key_locs[block_name])
        for input_name, value in zip(block.inputs, inputs):
            inner.entries[input_name] = Entry(output=value)
        entry = Entry(scope=inner)
        scope.entries[name] = entry
        self.block_stack.append(block_name)
        try:
            last = self.expand_items(raw_block["layers"], inner, inputs, {**self.vars, **params},
                                     trail + [Note(f"in block '{block_name}', used as '{scope.prefix}{name}' here", item.loc)])
        finally:
            self.block_stack.pop()
        if block.outputs is None:
            entry.output = last
        else:
            outs = raw_block["outputs"]
            refs = [Ref(o, inner, l) for o, l in zip(outs, outs.item_locs)]
            entry.outputs = {o.split(".")[-1]: r for o, r in zip(block.outputs, refs)}
            entry.output = refs[-1] if len(refs) == 1 else None
        return entry.output if entry.output is not None else next(iter(entry.outputs.values()))

    def _block_params(self, item, block_name, block: BlockDef, raw_block, names, trail) -> dict:
        params = {}
        for key in item:
            if key in LAYER_KEYS:
                continue
            if key not in block.params:
                raise SpecError(f"block '{block_name}' has no parameter '{key}'", item.key_locs[key],
                                hint=did_you_mean(key, block.params) or (f"its parameters: {', '.join(block.params)}" if block.params else "it takes no parameters"))
            params[key] = self.value(item[key], names, item.value_locs[key], trail)
        for pname, decl in block.params.items():
            decl = decl if isinstance(decl, ParamDecl) else ParamDecl(type=decl)
            has_default = "default" in decl.model_fields_set
            if pname not in params:
                if not has_default:
                    raise SpecError(f"block '{block_name}' needs the parameter '{pname}'", item.loc,
                                    notes=[Note("declared here", raw_block["params"].key_locs[pname])],
                                    hint=f"add `{pname}: ...` to this layer")
                params[pname] = self.value(decl.default, {**self.vars, **params}, raw_block["params"].value_locs[pname])
            kind = decl.type or (type(decl.default).__name__ if has_default and decl.default is not None else None)
            self._check_param_type(block_name, pname, kind, params[pname], _at(item, pname, item.loc))
        return params

    @staticmethod
    def _check_param_type(block_name, pname, kind, value, loc):
        ok = {
            None: True,
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
        }.get(kind, True)
        if not ok:
            raise SpecError(f"parameter '{pname}' of block '{block_name}' is a {kind}, got {value!r}", loc)

    # -- references ---------------------------------------------------------------------
    def resolve(self, ref: "Ref | str", all_names: set[str]) -> str:
        """A full value name for a reference, following entries and scopes."""
        seen = 0
        while isinstance(ref, Ref):
            seen += 1
            if seen > 1000:
                raise SpecError(f"'{ref.text}' refers to itself", ref.loc)
            ref = self._lookup(ref, all_names)
        return ref

    def _lookup(self, ref: Ref, all_names: set[str]):
        head, *rest = ref.text.split(".")
        scope = ref.scope
        while scope is not None and head not in scope.entries:
            scope = None if scope.closed else scope.parent
        if scope is None:
            if ref.text in all_names:  # a full scoped name: stage2.0.conv1
                return ref.text
            owner, _, index = ref.text.rpartition(".")
            if index.isdigit() and owner in all_names:  # one output of a multi-output layer, by full name
                return ref.text
            visible = ref.scope.visible()
            raise SpecError(f"no layer or input named '{head}'" + ("" if not rest else f" (in '{ref.text}')"), ref.loc,
                            hint=did_you_mean(head, visible) or ("names here: " + ", ".join(visible)))
        entry = scope.entries[head]
        for k, part in enumerate(rest):
            if k == len(rest) - 1 and part in entry.outputs:
                return entry.outputs[part]
            if k == len(rest) - 1 and part.isdigit() and entry.scope is None and entry.output is not None:
                # One output of a multi-output layer (`split_1.0`); lowering checks that it exists.
                return f"{self.resolve(entry.output, all_names)}.{part}"
            if entry.scope is None or part not in entry.scope.entries:
                inside = list(entry.outputs) + (list(entry.scope.entries) if entry.scope else [])
                raise SpecError(f"'{'.'.join([head] + rest[:k])}' has nothing named '{part}'", ref.loc,
                                hint=did_you_mean(part, inside) or (f"inside: {', '.join(inside)}" if inside else None))
            entry = entry.scope.entries[part]
        if entry.output is None:
            raise SpecError(f"'{ref.text}' has several outputs; name one", ref.loc,
                            hint="e.g. " + ", ".join(f"{ref.text}.{o}" for o in entry.outputs))
        return entry.output


def expand(raw: LocDict, source: SourceSpec) -> LocDict:
    """The flat spec: expanded layers with resolved inputs, evaluated inputs and outputs."""
    ex = Expander(raw, source)
    top = Scope("")
    inputs = LocDict()
    inputs.loc, inputs.key_locs, inputs.value_locs = raw["inputs"].loc, raw["inputs"].key_locs, raw["inputs"].value_locs
    for name in raw["inputs"]:
        inputs[name] = ex.value(raw["inputs"][name], ex.vars, raw["inputs"].value_locs[name])
        top.entries[name] = Entry(output=name)
    first = next(iter(raw["inputs"]))
    last = ex.expand_items(raw["layers"], top, [first], ex.vars, [])

    all_names = {layer["name"] for layer in ex.layers} | set(inputs)
    previous = first
    for layer in ex.layers:
        resolved = [ex.resolve(r, all_names) for r in layer["in"]]
        if resolved == [previous]:
            del layer["in"]
            layer.key_locs.pop("in"), layer.value_locs.pop("in")
        elif len(resolved) == 1:
            layer["in"] = resolved[0]
        else:  # keep each name's position, so that errors about one input point at it
            written = LocList(resolved)
            written.loc = layer.value_locs["in"]
            written.item_locs = [r.loc if isinstance(r, Ref) and r.loc else written.loc for r in layer["in"]]
            layer["in"] = written
        previous = layer["name"]

    flat = LocDict()
    flat.loc, flat.key_locs, flat.value_locs = raw.loc, {}, {}
    for key in ("lbdlc", "name", "description"):
        if key in raw:
            flat[key], flat.key_locs[key], flat.value_locs[key] = raw[key], raw.key_locs[key], raw.value_locs[key]
    flat["inputs"], flat.key_locs["inputs"], flat.value_locs["inputs"] = inputs, raw.key_locs["inputs"], raw.value_locs["inputs"]
    flat["layers"], flat.key_locs["layers"], flat.value_locs["layers"] = ex.layers, raw.key_locs["layers"], raw.value_locs["layers"]
    outputs = LocList()
    if "outputs" in raw:
        outs = raw["outputs"]
        outputs += [ex.resolve(Ref(o, top, l), all_names) for o, l in zip(outs, outs.item_locs)]
        outputs.loc, outputs.item_locs = outs.loc, outs.item_locs
    else:
        outputs.append(ex.resolve(last, all_names))
        outputs.loc, outputs.item_locs = raw.loc, [raw.loc]
    flat["outputs"], flat.key_locs["outputs"], flat.value_locs["outputs"] = outputs, raw.key_locs.get("outputs", raw.loc), outputs.loc
    if "train" in raw:  # the training protocol: `vars` and `${...}` evaluated, positions kept
        flat["train"] = ex.value(raw["train"], ex.vars, raw.value_locs["train"])
        flat.key_locs["train"], flat.value_locs["train"] = raw.key_locs["train"], raw.value_locs["train"]
    if "compile" in raw:  # the build's passes (passes/pipeline.py), positions kept for their errors
        flat["compile"], flat.key_locs["compile"], flat.value_locs["compile"] = raw["compile"], raw.key_locs["compile"], raw.value_locs["compile"]
    if "quantize" in raw:  # weight-only quantization (lbdlc/quant_spec.py), positions kept for its errors
        flat["quantize"], flat.key_locs["quantize"], flat.value_locs["quantize"] = raw["quantize"], raw.key_locs["quantize"], raw.value_locs["quantize"]
    if "finetune" in raw:  # LoRA fine-tuning (lbdlc/lora.py), positions kept for its errors
        flat["finetune"], flat.key_locs["finetune"], flat.value_locs["finetune"] = raw["finetune"], raw.key_locs["finetune"], raw.value_locs["finetune"]
    if "deploy" in raw:  # deployment targets (lbdlc/targets.py), positions kept for their errors
        flat["deploy"], flat.key_locs["deploy"], flat.value_locs["deploy"] = raw["deploy"], raw.key_locs["deploy"], raw.value_locs["deploy"]
    flat.scopes = ex.scopes  # not spec data: what lowering records as Graph.scopes
    return flat
