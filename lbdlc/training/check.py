"""The `train:` section against the model's graph: located errors, then a plan for codegen.

`plan(loaded, graph)` checks what the schema alone cannot (a loss names an output that
exists and fits it, the data fits the inputs, parameter patterns match parameters, options
that only make sense together) and returns a `Plan`: the protocol with every default that
depends on the model resolved (which output each loss reads, target dtypes and shapes,
integer ranges, the parameters without weight decay). Errors point at the YAML line.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from ..errors import Note, SpecError, did_you_mean
from ..ir import Graph, TensorType, dim_str
from ..source import key_loc, loc_of
from . import special
from .schema import CLASS_LOSSES, CLASS_METRICS, TrainSpec

NORM_OPS = ("batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm")
EMBEDDING_OPS = ("embedding", "position_embedding", "cls_token")


@dataclass
class Tensor:
    """A model input or output, as train.py sees it: shape with symbols as names."""

    name: str
    shape: list  # ints and symbol names
    dtype: str

    @property
    def is_float(self) -> bool:
        return self.dtype in ("float32", "float16", "bfloat16")

    def shape_text(self) -> str:
        return "[" + ", ".join(map(str, self.shape)) + "]"


@dataclass
class LossPlan:
    spec: object  # the LossSpec
    output: str
    index: int  # position of the output in the model's return value
    target: str | None  # the data key of its target (the output name); None for next_token
    tokens: str | None = None  # next_token: the token input
    extra: dict = field(default_factory=dict)  # vae: indices of mu and logvar, the input reconstructed
    line: int | None = None


@dataclass
class Plan:
    train: TrainSpec
    spec_file: str
    inputs: list[Tensor]
    outputs: list[Tensor]
    losses: list[LossPlan]
    targets: dict[str, Tensor]  # output name -> target tensor (shape and dtype)
    int_high: dict[str, int]  # integer input -> exclusive upper bound of its values
    no_decay: list[str]  # fnmatch patterns over parameter names
    metric_output: str | None
    param_names: list[str]
    lines: dict[str, int] = field(default_factory=dict)  # train.<path> -> spec line
    data_paths: list[str] = field(default_factory=list)  # data files, resolved against the spec's folder
    train_line: int | None = None  # the line of `train:`
    noise: dict = field(default_factory=dict)  # gan: noise input -> sample shape, drawn in forward() (special.py)
    model_inputs: list[str] = field(default_factory=list)  # every input of the model, in forward order
    find_unused: bool = False  # DistributedDataParallel(find_unused_parameters=...)
    finetune: object = None  # lbdlc/finetune.py's TrainFinetune: train.py freezes the rest, saves the LoRA adapters
    qat: dict = field(default_factory=dict)  # layer -> block format trained fake-quantized (backends/train_qat.py)
    qat_line: int | None = None  # of `qat:` in the spec
    qat_int8: dict | None = None  # int8 static qat: layers, activations, weight options (backends/train_qat_int8.py)

    def line(self, *path) -> int | None:
        return self.lines.get(".".join(map(str, path)))

    @property
    def total_steps_known(self) -> bool:
        return self.train.steps is not None


def _tensor(v) -> Tensor:
    return Tensor(v.name, [d if isinstance(d, int) else dim_str(d) for d in v.type.shape], v.type.dtype)


class _Ctx:
    def __init__(self, loaded, graph: Graph):
        self.raw = loaded.raw
        self.train: TrainSpec = loaded.spec.train
        self.graph = graph

    def at(self, *path):
        return loc_of(self.raw, ("train",) + path)

    def key_at(self, *path):
        return key_loc(self.raw, ("train",) + path) or self.at(*path)

    def has(self, *path) -> bool:
        node = self.raw["train"]
        for p in path:
            if isinstance(node, dict) and p in node:
                node = node[p]
            elif isinstance(node, list) and isinstance(p, int) and p < len(node):
                node = node[p]
            else:
                return False
        return True


def plan(loaded, graph: Graph) -> Plan:
    """Check `train:` against the graph and resolve it; raises located SpecErrors."""
    c = _Ctx(loaded, graph)
    t = c.train
    inputs = [_tensor(v) for v in graph.inputs]
    outputs = [_tensor(v) for v in graph.outputs]
    _check_length(c)
    losses = _losses(c, inputs, outputs)
    model_inputs = [i.name for i in inputs]
    inputs = special.data_inputs(losses, inputs)  # a GAN's noise is drawn, not read from the data
    targets = _targets(c, losses, outputs)
    int_high = _int_ranges(c, graph, inputs)
    _check_data(c, inputs, outputs, losses, targets)
    c.train_folder = loaded.path.parent  # data paths are relative to the spec's folder
    special.check_data(c, losses, inputs, outputs, targets)
    no_decay = _check_optimizer(c, graph)
    _check_run(c, losses, outputs)
    metric_output = _check_metrics(c, losses, outputs, targets)
    lines = _lines(c.raw["train"], "")
    noise = {k: v for lp in losses if lp.spec.kind == "gan" for k, v in lp.extra["noise"].items()}
    return Plan(t, loaded.path.name, inputs, outputs, losses, targets, int_high, no_decay, metric_output,
                list(graph.params), lines, _data_paths(loaded, t), c.raw.key_locs["train"].line,
                noise=noise, model_inputs=model_inputs, find_unused=special.find_unused(c, graph, losses))


def _data_paths(loaded, t: TrainSpec) -> list[str]:
    """Data files named by the spec, relative to the spec's folder, as absolute paths."""
    d = t.data
    if d.kind == "npy":
        names = list(d.inputs.values()) + list(d.targets.values())
    elif d.kind in ("npz", "csv", "text", "image_folder"):
        names = [d.path]
    else:
        names = []
    return [(loaded.path.parent / n).resolve().as_posix() for n in names]


def _lines(node, prefix: str) -> dict[str, int]:
    out = {}
    if isinstance(node, dict):
        for k in node:
            path = f"{prefix}.{k}" if prefix else str(k)
            out[path] = node.value_locs[k].line if hasattr(node, "value_locs") else None
            out.update(_lines(node[k], path))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            path = f"{prefix}.{i}"
            out[path] = node.item_locs[i].line if hasattr(node, "item_locs") else None
            out.update(_lines(item, path))
    return out


def _check_length(c: _Ctx) -> None:
    t = c.train
    if t.epochs is None and t.steps is None:
        raise SpecError("the training protocol does not say how long to train", loc_of(c.raw, ("train",)),
                        hint="add `epochs: N` (passes over the training split) or `steps: N` (optimizer steps)")
    if t.epochs is not None and t.steps is not None:
        raise SpecError("`epochs` and `steps` both set: give one of them", c.key_at("steps"),
                        notes=[Note("epochs set here", c.key_at("epochs"))])
    if t.loss is None and t.losses is None:
        raise SpecError("the training protocol has no loss", loc_of(c.raw, ("train",)),
                        hint="add e.g. `loss: {kind: cross_entropy}`, or `losses:` for a weighted sum")
    if t.loss is not None and t.losses is not None:
        raise SpecError("`loss` and `losses` both set: give one of them", c.key_at("losses"),
                        notes=[Note("loss set here", c.key_at("loss"))],
                        hint="`losses:` is a list for a weighted sum; put every loss there")
    if t.batch_size % t.grad_accumulation:
        raise SpecError(f"grad_accumulation {t.grad_accumulation} does not divide batch_size {t.batch_size}",
                        c.at("grad_accumulation"),
                        hint="batch_size is the samples per optimizer step; each accumulation step takes batch_size / grad_accumulation")


def _losses(c: _Ctx, inputs: list[Tensor], outputs: list[Tensor]) -> list[LossPlan]:
    t = c.train
    single = t.loss is not None
    out: list[LossPlan] = []
    names = [o.name for o in outputs]
    for k, loss in enumerate(t.loss_list()):
        path = ("loss",) if single else ("losses", k)
        if loss.kind == "gan":  # reads two outputs and draws an input (special.py)
            out.append(special.gan_plan(c, loss, path, inputs, outputs))
            continue
        if loss.output is None:
            if len(outputs) > 1:
                raise SpecError(f"the model has {len(outputs)} outputs; say which one this loss is for", c.at(*path),
                                hint=f"add `output: <name>`, one of {', '.join(names)}")
            name = names[0]
        else:
            name = loss.output
            if name not in names:
                layer = any(n.name == name for n in c.graph.nodes)
                raise SpecError(
                    f"the loss reads '{name}', which is not an output of the model", c.at(*path, "output"),
                    hint=(f"list it under `outputs:` (now {', '.join(names)})" if layer
                          else did_you_mean(name, names) or f"outputs: {', '.join(names)}"))
        o = outputs[names.index(name)]
        tokens = _check_loss_fits(c, loss, o, inputs, path)
        extra = _check_special(c, loss, o, inputs, outputs, path)
        target = None if loss.kind in TARGETLESS + special.TARGETLESS else name
        tokens = tokens or extra.get("tokens")  # masked_lm's token input
        out.append(LossPlan(loss, name, names.index(name), target, tokens, line=c.at(*path).line, extra=extra))
    return out


def _check_loss_fits(c: _Ctx, loss, o: Tensor, inputs: list[Tensor], path) -> str | None:
    where = c.at(*path, "kind")
    if not o.is_float:
        raise SpecError(f"{loss.kind} needs a float output; '{o.name}' is {o.dtype}", where)
    if loss.kind in ("cross_entropy", "nll", "kl_div") and len(o.shape) < 2:
        raise SpecError(f"{loss.kind} reads class scores along the last dimension; '{o.name}' has shape {o.shape_text()}",
                        where, hint="the output should be [batch, classes] (or [batch, ..., classes])")
    if loss.kind in CLASS_LOSSES and not isinstance(o.shape[-1], int):
        raise SpecError(f"{loss.kind}: the number of classes (last dimension of '{o.name}') must be fixed, got {o.shape[-1]}", where)
    if loss.kind != "next_token":
        return None
    if len(o.shape) != 3:
        raise SpecError(f"next_token reads logits [batch, seq, vocab]; '{o.name}' has shape {o.shape_text()}", where)
    ints = [i for i in inputs if not i.is_float]
    if loss.tokens is not None:
        tok = next((i for i in inputs if i.name == loss.tokens), None)
        if tok is None or tok.is_float:
            raise SpecError(f"'{loss.tokens}' is not an integer input of the model", c.at(*path, "tokens"),
                            hint=did_you_mean(loss.tokens, [i.name for i in ints]) or
                            (f"integer inputs: {', '.join(i.name for i in ints)}" if ints else "the model has no integer input"))
    elif len(ints) != 1:
        raise SpecError("next_token predicts the model's token input shifted by one; "
                        + ("the model has no integer input" if not ints else f"say which: `tokens: <input>` ({', '.join(i.name for i in ints)})"),
                        where)
    else:
        tok = ints[0]
    if len(tok.shape) != 2:
        raise SpecError(f"next_token needs token ids [batch, seq]; '{tok.name}' has shape {tok.shape_text()}", where)
    return tok.name


TARGETLESS = ("next_token", "vae", "clip")  # losses whose targets come from the inputs or the batch itself


def _check_special(c: _Ctx, loss, o: Tensor, inputs: list[Tensor], outputs: list[Tensor], path) -> dict:
    """vae: mu and logvar outputs, the input reconstructed; clip: a square [batch, batch] output."""
    if loss.kind in special.KINDS:
        return special.check(c, loss, o, inputs, outputs, path)
    if loss.kind == "clip":
        if len(o.shape) != 2 or o.shape[0] != o.shape[1]:
            raise SpecError(f"clip reads a [batch, batch] matrix of pair logits; '{o.name}' has shape {o.shape_text()}",
                            c.at(*path, "kind"))
        return {}
    if loss.kind != "vae":
        return {}
    names = [x.name for x in outputs]
    extra = {}
    for key in ("mu", "logvar"):
        ref = getattr(loss, key)
        if ref not in names:
            raise SpecError(f"vae: '{ref}' is not an output of the model", c.at(*path, key),
                            hint=did_you_mean(ref, names) or f"outputs: {', '.join(names)}")
        extra[key] = names.index(ref)
    mu, logvar = outputs[extra["mu"]], outputs[extra["logvar"]]
    if mu.shape != logvar.shape:
        raise SpecError(f"vae: mu {mu.shape_text()} and logvar {logvar.shape_text()} differ in shape", c.at(*path, "logvar"))
    floats = [i for i in inputs if i.is_float]
    if loss.input is not None:
        x = next((i for i in floats if i.name == loss.input), None)
        if x is None:
            raise SpecError(f"vae: '{loss.input}' is not a float input of the model", c.at(*path, "input"),
                            hint=did_you_mean(loss.input, [i.name for i in floats]))
    elif len(floats) != 1:
        raise SpecError("vae: say which input is reconstructed (`input: <name>`)", c.at(*path, "kind"))
    else:
        x = floats[0]
    if o.shape[1:] != x.shape[1:]:
        raise SpecError(f"vae: the reconstruction '{o.name}' {o.shape_text()} does not have the shape of input '{x.name}' {x.shape_text()}",
                        c.at(*path, "output") if loss.output else c.at(*path, "kind"))
    extra["input"] = x.name
    return extra


def _targets(c: _Ctx, losses: list[LossPlan], outputs: list[Tensor]) -> dict[str, Tensor]:
    targets: dict[str, Tensor] = {}
    kinds: dict[str, tuple[str, int]] = {}
    for k, lp in enumerate(losses):
        if lp.target is None:
            continue
        o = next(o for o in outputs if o.name == lp.output)
        if special.target_of(lp, o) is not None:
            want = special.target_of(lp, o)
        elif lp.spec.kind in CLASS_LOSSES:
            want = Tensor(o.name, o.shape[:-1], "int64")
        else:
            want = Tensor(o.name, list(o.shape), "float32")
        if o.name in targets and targets[o.name].dtype != want.dtype:
            first = kinds[o.name]
            raise SpecError(f"{lp.spec.kind} and {first[0]} both read '{o.name}' but need different targets "
                            f"(class ids vs values)", loc_of(c.raw, ("train", "losses", k, "kind")),
                            notes=[Note(f"{first[0]} is here", loc_of(c.raw, ("train", "losses", first[1], "kind")))])
        targets[o.name] = want
        kinds.setdefault(o.name, (lp.spec.kind, k))
    return targets


def _embedding_size(graph: Graph, name: str) -> int | None:
    users = graph.users()
    value = next(v for v in graph.inputs if v.name == name)
    for node in users.get(id(value), []):
        size = getattr(node.attrs, "num_embeddings", None)
        if size:
            return int(size)
    return None


def _int_ranges(c: _Ctx, graph: Graph, inputs: list[Tensor]) -> dict[str, int]:
    data = c.train.data
    out = {}
    for i in inputs:
        if i.is_float:
            continue
        size = _embedding_size(graph, i.name)
        if data.kind == "synthetic" and data.high is not None:
            size = data.high
        if size is None and data.kind == "synthetic":
            raise SpecError(f"synthetic data: no range for the integer input '{i.name}'", c.at("data"),
                            hint="add `high: N` (values are drawn from [0, N))")
        if size is not None:
            out[i.name] = size
    return out


def _check_data(c: _Ctx, inputs: list[Tensor], outputs: list[Tensor], losses: list[LossPlan], targets: dict) -> None:
    data = c.train.data
    kind_at = c.at("data", "kind")
    if data.split.val + data.split.test >= 1:
        raise SpecError(f"the validation and test fractions ({data.split.val} + {data.split.test}) leave nothing to train on",
                        c.at("data", "split"))
    floats = [i for i in inputs if i.is_float]
    if data.kind == "digits":
        if len(inputs) != 1 or not floats:
            raise SpecError("the digits data feeds one float image input; the model has "
                            + ", ".join(f"{i.name} {i.dtype}" for i in inputs), kind_at)
        image = inputs[0]
        h, w = data.resize or (8, 8)
        shape = [h * w] if data.flatten else [1, h, w]
        if image.shape[1:] != shape:
            hint = ("resize the 8x8 images with `resize: [H, W]`" + (" and flatten them with `flatten: true`" if len(image.shape) == 2 else "")
                    if len(image.shape) in (2, 4) else None)
            if len(image.shape) == 4 and len(image.shape[2:]) == 2 and all(isinstance(d, int) for d in image.shape[2:]):
                hint = f"write `resize: [{image.shape[2]}, {image.shape[3]}]`" + (" and drop `flatten`" if data.flatten else "")
            if len(image.shape) == 2 and isinstance(image.shape[1], int):
                hint = "write `flatten: true`" + (f" (64 features), or resize so that H * W = {image.shape[1]}" if image.shape[1] != 64 else "")
            raise SpecError(f"the digits data gives samples of shape {shape}, but input '{image.name}' is "
                            f"{image.shape_text()} (batch first)", c.at("data", "resize") if data.resize else kind_at, hint=hint)
        if data.classes and len(set(data.classes)) < len(data.classes):  # `classes:` keeps each digit once
            k = next(k for k, v in enumerate(data.classes) if v in data.classes[:k])
            raise SpecError(f"digit {data.classes[k]} is listed twice in `classes`", c.at("data", "classes", k),
                            hint="list each digit 0-9 once")
        if data.augment and (data.augment.crop or data.augment.flip) and data.flatten:
            raise SpecError("crop and flip need images; with `flatten: true` the samples are vectors",
                            c.at("data", "augment"))
        target = data.target or (losses[0].output if losses else None)
        if not targets and data.target is None:  # nothing needs the labels (an autoencoder)
            target = None
        elif target not in targets:
            raise SpecError(f"the digits labels need a loss on '{target}' with class targets (cross_entropy or nll)",
                            c.at("data", "target") if data.target else kind_at,
                            hint=f"outputs with targets: {', '.join(targets) or 'none'}")
        t = targets.get(target)
        o = next((o for o in outputs if o.name == target), None)
        if t is not None and (t.dtype != "int64" or len(o.shape) != 2 or o.shape[1] < 10):
            raise SpecError(f"the digits labels are classes 0-9, so '{target}' needs [batch, 10] class scores and a "
                            f"cross_entropy or nll loss; it is {o.shape_text()}", kind_at)
        extra = [k for k in targets if k != target]
        if extra:
            raise SpecError(f"the digits data has labels for one output only; the losses also need targets for {', '.join(extra)}", kind_at)
    elif data.kind == "synthetic":
        named = set()
        for i in inputs:
            for d in i.shape[1:]:
                if isinstance(d, str) and d not in data.sizes:
                    raise SpecError(f"synthetic data: input '{i.name}' has the symbolic dimension '{d}'; give its size",
                                    c.at("data"), hint=f"add `sizes: {{{d}: 16}}`")
                if isinstance(d, str):
                    named.add(d)
        unknown = [k for k in data.sizes if k not in named]
        if unknown:
            raise SpecError(f"synthetic data: '{unknown[0]}' is not a symbolic dimension of the inputs (after batch)",
                            key_loc(c.raw, ("train", "data", "sizes", unknown[0])),
                            hint=did_you_mean(unknown[0], named) or (f"symbolic dimensions: {', '.join(sorted(named))}" if named else "the inputs have none"))
    elif data.kind == "text":
        if any(lp.spec.kind not in ("next_token", "masked_lm") for lp in losses):
            raise SpecError("text data gives token windows only: its losses are `next_token`", kind_at,
                            hint="use `loss: {kind: next_token}`")
        tok = inputs[0] if len(inputs) == 1 else None
        if tok is None or tok.is_float or len(tok.shape) != 2:
            raise SpecError("text data feeds one integer input [batch, seq]; the model has "
                            + ", ".join(f"{i.name} {i.shape_text()} {i.dtype}" for i in inputs), kind_at)
        if isinstance(tok.shape[1], int) and tok.shape[1] != data.seq_len:
            raise SpecError(f"seq_len {data.seq_len} does not fit input '{tok.name}' {tok.shape_text()}", c.at("data", "seq_len"),
                            hint=f"write `seq_len: {tok.shape[1]}`")
        for node in c.graph.nodes:
            limit = getattr(node.attrs, "max_positions", None)
            if node.op == "position_embedding" and limit and data.seq_len > limit:
                raise SpecError(f"seq_len {data.seq_len} is longer than the {limit} positions of layer '{node.name}'",
                                c.at("data", "seq_len"), notes=[Note("the positions are declared here", node.origin)])
        if data.tokenizer == "byte":
            size = _embedding_size(c.graph, tok.name)
            if size is not None and size < 256:
                raise SpecError(f"the byte tokenizer gives ids 0-255, but the embedding of '{tok.name}' has {size} entries",
                                c.at("data", "tokenizer"), hint="use `tokenizer: char`, or a vocabulary of at least 256")
    elif data.kind == "csv":
        if len(inputs) != 1 or not floats or len(inputs[0].shape) != 2:
            raise SpecError("CSV data feeds one float input [batch, features]; the model has "
                            + ", ".join(f"{i.name} {i.shape_text()}" for i in inputs), kind_at)
        if len(targets) != 1:
            raise SpecError(f"CSV data has one target column; the losses need targets for {len(targets)} outputs", kind_at)
        if not data.header and any(isinstance(x, str) for x in [data.target] + list(data.features or [])):
            raise SpecError("without a header row, columns are given by index (0, 1, ...)", c.at("data", "target"))
    elif data.kind in ("npz", "npy"):
        names = [i.name for i in inputs]
        for key in (data.inputs or {}):
            if key not in names:
                raise SpecError(f"'{key}' is not an input of the model", key_loc(c.raw, ("train", "data", "inputs", key)),
                                hint=did_you_mean(key, names) or f"inputs: {', '.join(names)}")
        if data.kind == "npy":
            missing = [n for n in names if n not in data.inputs]
            if missing:
                raise SpecError(f"no .npy file for input '{missing[0]}'", c.at("data", "inputs"))
        for key in (data.targets or {}):
            if key not in targets:
                raise SpecError(f"'{key}' is not an output that a loss needs a target for",
                                key_loc(c.raw, ("train", "data", "targets", key)),
                                hint=did_you_mean(key, list(targets)) or f"outputs with targets: {', '.join(targets) or 'none'}")
        if data.kind == "npy":
            missing = [n for n in targets if n not in data.targets]
            if missing:
                raise SpecError(f"no .npy file for the target of '{missing[0]}'", c.at("data"),
                                hint=f"add `targets: {{{missing[0]}: labels.npy}}`")
    augment = getattr(data, "augment", None)
    if augment and (augment.crop or augment.flip):
        images = [i for i in floats if len(i.shape) == 4]
        if data.kind != "digits" and not images:
            raise SpecError("crop and flip augment images [batch, channels, height, width]; the model has no such input",
                            c.at("data", "augment"))


def _param_patterns(c: _Ctx, graph: Graph, words: list[str], path) -> list[str]:
    """`biases`, `norms`, `embeddings` and fnmatch patterns -> patterns; each must match."""
    params = list(graph.params)
    out: list[str] = []
    for k, word in enumerate(words):
        if word == "biases":
            pats = ["*.bias"]
        elif word in ("norms", "embeddings"):
            ops_ = NORM_OPS if word == "norms" else EMBEDDING_OPS
            names = [p for n in graph.nodes if n.op in ops_ for p in n.params.values() if not graph.params[p].buffer]
            pats = _generalize(names, params)
        else:
            pats = [word]
        if not any(fnmatch.fnmatchcase(p, pat) for pat in pats for p in params):
            keyword = word in ("biases", "norms", "embeddings")
            raise SpecError(f"'{word}' matches no parameter of the model", c.at(*path, k),
                            hint=f"the model has no {word[:-1]} parameters" if keyword else
                            did_you_mean(word, ["biases", "norms", "embeddings"] + params)
                            or "patterns are fnmatch patterns over parameter names (`lbdlc check --json` lists them), "
                               "or the words biases, norms, embeddings")
        out += [p for p in pats if p not in out]
    return out


def _generalize(names: list[str], params: list[str]) -> list[str]:
    """Patterns for `names` with repetition indices as `*` (h.*.ln_1.*), where that matches
    no other parameter; the exact names otherwise."""
    out: list[str] = []
    chosen = set(names)
    for name in names:
        scope = name.rsplit(".", 1)[0]
        pat = ".".join("*" if part.isdigit() else part for part in scope.split(".")) + ".*"
        ok = all(p in chosen for p in params if fnmatch.fnmatchcase(p, pat))
        pick = pat if ok else name
        if pick not in out:
            out.append(pick)
    return out


def _check_optimizer(c: _Ctx, graph: Graph) -> list[str]:
    opt = c.train.optimizer
    if getattr(opt, "nesterov", False) and opt.momentum == 0:
        raise SpecError("nesterov momentum needs `momentum` > 0", c.at("optimizer", "nesterov"), hint="e.g. momentum: 0.9")
    decays = opt.l2 > 0 or getattr(opt, "weight_decay", 0) > 0 or any((g.l2 or 0) > 0 or (g.weight_decay or 0) > 0 for g in opt.groups)
    if opt.no_decay and not decays:
        raise SpecError("`no_decay` has no effect: nothing sets weight_decay or l2", c.key_at("optimizer", "no_decay"),
                        hint="set `weight_decay` (adamw) or `l2`, or remove no_decay")
    no_decay = _param_patterns(c, graph, opt.no_decay, ("optimizer", "no_decay"))
    for k, group in enumerate(opt.groups):
        _param_patterns(c, graph, group.params, ("optimizer", "groups", k, "params"))
        if group.weight_decay is not None and opt.kind != "adamw":
            raise SpecError(f"{opt.kind} has no decoupled weight decay", c.key_at("optimizer", "groups", k, "weight_decay"),
                            hint="write `l2: ...` for an L2 penalty, or use `kind: adamw`")
    return no_decay


def _check_run(c: _Ctx, losses, outputs) -> None:
    t = c.train
    if t.early_stopping is not None and t.data.split.val == 0:
        raise SpecError("early stopping watches the validation split, but `split.val` is 0", c.key_at("early_stopping"))
    if t.early_stopping is not None and t.early_stopping.metric != "loss":
        metrics = t.eval.metrics if t.eval else []
        if t.early_stopping.metric not in metrics:
            raise SpecError(f"early stopping watches '{t.early_stopping.metric}', which `eval.metrics` does not compute",
                            c.at("early_stopping", "metric"), hint=f"add it: `eval: {{metrics: [{t.early_stopping.metric}]}}`")
    if t.schedule is not None and t.steps is not None and t.schedule.warmup >= t.steps:
        raise SpecError(f"warmup of {t.schedule.warmup} steps is not shorter than the run ({t.steps} steps)",
                        c.at("schedule", "warmup"))


def _check_metrics(c: _Ctx, losses: list[LossPlan], outputs: list[Tensor], targets: dict) -> str | None:
    t = c.train
    ev = t.eval
    if ev is None or not ev.metrics:
        return losses[0].output if losses else None
    names = [lp.output for lp in losses]
    out = ev.output or names[0]
    if out not in names:
        raise SpecError(f"metrics are computed on an output that a loss reads; '{out}' is not one", c.at("eval", "output"),
                        hint=did_you_mean(out, names) or f"loss outputs: {', '.join(names)}")
    kinds = {lp.spec.kind for lp in losses if lp.output == out}
    classes = bool(kinds & set(CLASS_LOSSES))
    if not any(lp.target or lp.spec.kind == "next_token" for lp in losses if lp.output == out):
        raise SpecError(f"metrics compare an output with its targets; '{out}' is trained with {', '.join(sorted(kinds))}, which has none",
                        c.at("eval", "metrics"), hint="the validation loss is always reported")
    for k, m in enumerate(ev.metrics):
        if m in CLASS_METRICS + ("perplexity",) and not classes:
            raise SpecError(f"{m} needs class targets; '{out}' is trained with {', '.join(sorted(kinds))}",
                            c.at("eval", "metrics", k))
        if m == "mse" and classes:
            raise SpecError(f"mse compares values; '{out}' is trained on class ids ({', '.join(sorted(kinds))})",
                            c.at("eval", "metrics", k))
    return out
