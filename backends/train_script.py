"""Training code: the spec's `train:` section becomes a standalone `train.py` beside `model.py`.

The script is meant to be read and edited: it holds only the options the spec uses, with
their values written out as constants that point to the spec line, in small functions
(`make_data`, `augment`, `loss_fn`, `make_optimizer`, `lr_factor`, `make_schedule`,
`train_step`, `evaluate`, `train`). It imports torch, numpy and safetensors (scikit-learn
for the digits data), and `Model` from `model.py`; never lbdlc. It runs with plain
`python train.py` and under `torchrun` (DistributedDataParallel, gloo on CPU, nccl on GPU).

What it relies on from `model.py`: the file name, `Model` (built with no arguments), the
forward signature (the spec's inputs by name, in spec order), the return value (one tensor,
or a tuple in the order of the spec's outputs) and `state_dict()` names equal to the IR's
parameter names, so that saved weights load into `lbdlc build --weights`.
"""
from __future__ import annotations

import math
from pathlib import Path
from string import Template

from . import train_losses
from lbdlc.training.check import Plan
from lbdlc.training.schema import CLASS_LOSSES


def _fill(template: str, **values) -> str:
    return Template(template).substitute(**values)


def _py(value) -> str:
    """A Python literal in the style of the rest of the file (double-quoted strings)."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        return "(" + ", ".join(_py(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, list):
        return "[" + ", ".join(_py(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py(k)}: {_py(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return _num(value)
    return repr(value)


def _num(x) -> str:
    """A float as a short, exact literal (1e-3, 0.9, 2.0)."""
    if isinstance(x, bool) or isinstance(x, int):
        return repr(x)
    r = repr(float(x))
    if "e" in r:
        mant, exp = r.split("e")
        return f"{mant.rstrip('0').rstrip('.') if '.' in mant else mant}e{int(exp)}"
    return r


class _Writer:
    def __init__(self, plan: Plan):
        self.p = plan
        self.t = plan.train
        self.file = plan.spec_file

    def at(self, *path) -> str:
        line = self.p.line(*path)
        return f"{self.file}:{line}" if line else self.file

    # -- pieces --------------------------------------------------------------------------
    @property
    def class_losses(self):
        return [lp for lp in self.p.losses if lp.spec.kind in CLASS_LOSSES]

    def input_names(self) -> list[str]:
        return [i.name for i in self.p.inputs]

    def forward_call(self) -> str:
        args = ", ".join(f'batch["{n}"]' for n in self.input_names())
        if len(self.p.outputs) == 1:
            return f"(model({args}),)"
        return f"model({args})"



# Lines of the generated train.py, each there exactly once, where the optional features
# (train_lora.py, train_qat.py, train_qat_int8.py, train_fsdp.py) insert their code.
DEFINE_BEFORE = "def train(args: argparse.Namespace) -> dict:\n"  # their functions go before train()
MODEL_READY = "    raw_model.to(device)\n"  # the model built, on its device, not yet wrapped
OPTIMIZER_MADE = "    optimizer = make_optimizer(raw_model)\n"
CHECKPOINT_SAVED = '    torch.save(state, tmp / "training_state.pt")\n'
CHECKPOINT_LOADED = '    model.load_state_dict(load_file(str(path / "weights.safetensors")))\n'
WEIGHTS_SAVED = '        save_file(weights_of(raw_model), str(out / "weights.safetensors"))\n'


def insert(text: str, feature: str, edits: list[tuple[str, str, str]]) -> str:
    """`edits`: (anchor, "before" | "after", code) applied to a generated train.py. Every
    anchor must occur once: otherwise this file changed under the feature's patch (a bug, not
    a user error)."""
    for anchor, _, _ in edits:
        if text.count(anchor) != 1:
            raise AssertionError(f"{feature}: the generated train.py has {text.count(anchor)} copies of {anchor.strip()!r}")
    for anchor, where, code in edits:
        text = text.replace(anchor, code + anchor if where == "before" else anchor + code)
    return text


def generate(plan: Plan, model_name: str, lbdlc_version: str) -> str:
    w = _Writer(plan)
    t = plan.train
    sections = [
        _header(w, model_name, lbdlc_version),
        _imports(w),
        _constants(w),
        _seeding(w),
        _data(w),
    ]
    if _augments(t):
        sections.append(_augment(w))
    special = train_losses  # gan, td, masked_lm, triplet, contrastive: their code and hooks
    sections += [special.support(w), special.forward_and_loss(w) or _forward_and_loss(w), _optimizer(w), _schedule(w),
                 special.train_step(w) or _train_step(w), special.evaluate(w) or _evaluate(w),
                 _distributed(w), _checkpoints(w), _logging(w), _train_loop(w), _main(w)]
    text = "\n\n".join(s.strip("\n") + "\n" for s in sections if s.strip()).replace("\n\n\n\n", "\n\n\n")
    from . import train_lora  # `finetune:`: freeze all but the trainable parameters, save the LoRA adapters

    from . import train_qat  # `quantize: {qat: true}`: train with the weights the build will quantize

    from . import train_fsdp  # `distributed: {strategy: fsdp}`: sharded parameters, gathered files

    return train_fsdp.patch(train_qat.patch(train_lora.patch(text, plan), plan), plan)


def _augments(t) -> bool:
    a = getattr(t.data, "augment", None)
    return bool(a and (a.crop or a.flip or a.noise))


# ---------------------------------------------------------------------------------------


def _header(w: _Writer, model_name: str, version: str) -> str:
    t = w.t
    needs = "torch, numpy and safetensors" + (" (and scikit-learn for the digits data)" if t.data.kind == "digits" else "")
    return _fill('''\
"""Training script for $name, generated by lbdlc $version from $file (its `train:` section, line $line).

Standalone: needs $needs, and model.py beside it; not lbdlc.

    python train.py                            # train; writes run/ beside this file
    torchrun --nproc_per_node=2 train.py       # the same, data parallel over 2 processes
    python train.py --resume                   # continue from run/checkpoint exactly
    python train.py --steps 100 --seed 1 --device cpu --out other_run

The trained weights (run/weights.safetensors) keep the spec's parameter names, so
`lbdlc build $file --weights run/weights.safetensors` compiles them to ONNX and TVM.
"""''', name=model_name, version=version, file=w.file, line=w.p.train_line, needs=needs)


def _imports(w: _Writer) -> str:
    t = w.t
    lines = ["import argparse", "import csv"]
    if t.grad_accumulation > 1:
        lines.append("import contextlib")
    if t.optimizer.no_decay or t.optimizer.groups or train_losses.needs_fnmatch(w):
        lines.append("import fnmatch")
    lines += ["import json", "import math", "import os", "import random", "import sys", "import time",
              "from pathlib import Path", "", "import numpy as np", "import torch", "import torch.distributed as dist",
              "import torch.nn.functional as F", "from safetensors.torch import load_file, save_file",
              "from torch import nn", "from torch.nn.parallel import DistributedDataParallel",
              "from torch.utils.data import DistributedSampler", "", "from model import Model"]
    return "\n".join(lines)


def _constants(w: _Writer) -> str:
    t, p = w.t, w.p
    c: list[str] = [f"# The protocol, from {w.file} (`train:`). Command-line flags override a few of these."]

    def const(name, value, *path, note=""):
        where = w.at(*path) if path else w.file
        c.append(f"{name} = {value}  # {note + ', ' if note else ''}{where}")

    const("SEED", t.seed, "seed") if w.p.line("seed") else c.append(f"SEED = {t.seed}")
    if t.deterministic:
        const("DETERMINISTIC", True, "deterministic")
    const("BATCH_SIZE", t.batch_size, "batch_size", note="samples per optimizer step, all processes together")
    if t.grad_accumulation > 1:
        const("GRAD_ACCUMULATION", t.grad_accumulation, "grad_accumulation", note="micro-batches per optimizer step")
    if t.epochs is not None:
        const("EPOCHS", t.epochs, "epochs")
    else:
        const("STEPS", t.steps, "steps", note="optimizer steps")
    opt = t.optimizer
    const("LR", _num(opt.lr), "optimizer", "lr")
    if opt.l2:
        const("L2", _num(opt.l2), "optimizer", "l2", note="penalty L2 / 2 * |w|^2 in the loss")
    if opt.no_decay:
        const("NO_DECAY", _py(tuple(p.no_decay)), "optimizer", "no_decay", note="parameters without weight decay or L2")
    if t.clip_grad_norm is not None:
        const("CLIP_GRAD_NORM", _num(t.clip_grad_norm), "clip_grad_norm")
    s = t.schedule
    if s is not None and s.warmup:
        const("WARMUP_STEPS", s.warmup, "schedule", "warmup")
        if s.warmup_start:
            const("WARMUP_START", _num(s.warmup_start), "schedule", "warmup_start", note="lr factor at step 0")
    if s is not None and s.kind in ("cosine", "linear"):
        const("MIN_LR", _num(s.min_lr), "schedule", "min_lr" if w.p.line("schedule", "min_lr") else "kind")
    if t.compile:
        const("COMPILE", True, "compile", note="torch.compile the model")
    ev = t.eval
    if ev is not None and ev.every:
        const("EVAL_EVERY", ev.every, "eval", "every", note="steps")
    if ev is not None and ev.batch_size:
        const("EVAL_BATCH_SIZE", ev.batch_size, "eval", "batch_size")
    if t.early_stopping is not None:
        es = t.early_stopping
        const("EARLY_STOPPING_METRIC", _py(es.metric), "early_stopping", note="on the validation split")
        const("PATIENCE", es.patience, "early_stopping", note="evaluations without improvement")
        const("MIN_DELTA", _num(es.min_delta), "early_stopping")
    if t.checkpoint is not None and t.checkpoint.every:
        const("CHECKPOINT_EVERY", t.checkpoint.every, "checkpoint", "every", note="steps")
    if w.p.line("log", "every"):
        const("LOG_EVERY", t.log.every, "log", "every", note="steps between progress lines and metrics.csv rows")
    else:
        c.append(f"LOG_EVERY = {t.log.every}  # steps between progress lines and metrics.csv rows (default)")
    if t.log.tensorboard:
        const("TENSORBOARD", True, "log", "tensorboard")
    return "\n".join(c)


def _seeding(w: _Writer) -> str:
    det = ""
    if w.t.deterministic:
        det = '''
    if DETERMINISTIC:  # the same run gives the same numbers, at some cost in speed
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True'''
    return f'''\
def seed_everything(seed: int) -> None:
    """One seed for Python, NumPy and torch (CPU and GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed){det}'''


# -- data ------------------------------------------------------------------------------


def _split_code(w: _Writer) -> tuple[str, str, int]:
    split = w.t.data.split
    seed = split.seed if split.seed is not None else w.t.seed
    return ('''\
def split(arrays: dict[str, torch.Tensor], val: float, test: float, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Shuffle the samples once with `seed` and cut off the test and validation parts."""
    n = len(next(iter(arrays.values())))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test, n_val = round(n * test), round(n * val)
    parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return {name: {k: v[index] for k, v in arrays.items()} for name, index in parts.items()}''',
            f"split(arrays, val={_num(split.val)}, test={_num(split.test)}, seed=SPLIT_SEED)", seed)


def _data(w: _Writer) -> str:
    d = w.t.data
    split_fn, split_call, split_seed = _split_code(w)
    where = w.at("data")
    head = f"SPLIT_SEED = {split_seed}  # train/validation/test split, {w.at('data', 'split') if w.p.line('data', 'split') else where}\n"
    check = _shape_check(w) if d.kind in ("npz", "npy", "csv") else ""
    body = {"digits": _digits, "synthetic": _synthetic, "npz": _npz, "npy": _npy, "csv": _csv, "text": _text,
            "image_folder": train_losses.image_folder}[d.kind](w, split_call)
    parts = [head, split_fn if d.kind != "text" else "", check, body]
    return "\n\n\n".join(x.strip("\n") for x in parts if x.strip())


def _digits(w: _Writer, split_call: str) -> str:
    d = w.t.data
    image = w.p.inputs[0].name
    target = d.target or (w.p.losses[0].output if w.p.targets else None)  # None: no labels needed (an autoencoder)
    lines = ["    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download", "",
             "    digits = load_digits()",
             "    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8], in [0, 1]"]
    if getattr(d, "classes", None):  # `classes:` only these digits (their labels unchanged)
        lines[3:3] = [f"    keep = np.isin(digits.target, {sorted(d.classes)})  # classes, {w.at('data', 'classes')}",
                      "    digits.images, digits.target = digits.images[keep], digits.target[keep]"]
    if d.resize:
        h, wd = d.resize
        lines.append(f"    images = F.interpolate(images, size=({h}, {wd}), mode=\"bilinear\", align_corners=False)  # resize, {w.at('data', 'resize')}")
    if d.flatten:
        lines.append(f"    images = images.flatten(1)  # flatten, {w.at('data', 'flatten')}")
    if tuple(d.range) != (0.0, 1.0):
        lo, hi = d.range
        lines.append(f"    images = {_num(lo)} + {_num(hi - lo)} * images  # values in [{_num(lo)}, {_num(hi)}], {w.at('data', 'range')}")
    if target is not None:
        lines += ["    labels = torch.tensor(digits.target, dtype=torch.int64)", f'    arrays = {{"{image}": images, "{target}": labels}}']
    else:
        lines.append(f'    arrays = {{"{image}": images}}')
    lines.append(f"    return {split_call}")
    return (f'def make_data() -> dict[str, dict[str, torch.Tensor]]:\n'
            f'    """The handwritten digits ({w.at("data", "kind")}): train/val/test splits of model inputs and targets by name."""\n'
            + "\n".join(lines))


def _resolve_dim(d, sizes: dict, n: str):
    if isinstance(d, int):
        return str(d)
    return str(sizes[d]) if d in sizes else None


def _synthetic(w: _Writer, split_call: str) -> str:
    d = w.t.data
    lines = [f"    g = torch.Generator().manual_seed(SPLIT_SEED)", f"    n = {d.samples}"]
    feats = []
    for k, i in enumerate(w.p.inputs):
        dims = ["n"] + [str(x) if isinstance(x, int) else str(d.sizes[x]) for x in i.shape[1:]]
        shape = ", ".join(dims)
        if i.is_float:
            lines.append(f'    {_var(i.name)} = torch.randn({shape}, generator=g)')
            feats.append(f"{_var(i.name)}.flatten(1)")
        else:
            high = w.p.int_high[i.name]
            lines.append(f'    {_var(i.name)} = torch.randint(0, {high}, ({shape},), generator=g)  # ids in [0, {high})')
            feats.append(f"{_var(i.name)}.flatten(1).float() / {high} - 0.5")
    arrays = [f'"{i.name}": {_var(i.name)}' for i in w.p.inputs]
    if w.p.targets:
        feat_expr = feats[0] if len(feats) == 1 else "torch.cat([" + ", ".join(feats) + "], dim=1)"
        lines.append(f"    features = {feat_expr}  # every input, flattened side by side")
        lines.append("    # Targets from a fixed random linear teacher, so that there is something to learn.")
        kinds = {lp.output: lp.spec.kind for lp in w.p.losses if lp.target}
        for name, tgt in w.p.targets.items():
            if kinds[name] == "contrastive":  # one 0/1 similarity per pair (train_losses.py)
                lines.append("    teacher = torch.randn(features.shape[1], generator=g) / math.sqrt(features.shape[1])")
                lines.append(f"    {_var(name)} = (features @ teacher > 0).float()  # 1: a similar pair")
                arrays.append(f'"{name}": {_var(name)}')
                continue
            out = next(o for o in w.p.outputs if o.name == name)
            dims = [_resolve_dim(x, d.sizes, "n") for x in out.shape[1:]]
            if any(x is None for x in dims):
                from lbdlc.errors import SpecError

                raise SpecError(f"synthetic data cannot shape targets for output '{name}' {out.shape_text()}", None,
                                hint="give the symbolic dimensions their sizes under `data: {sizes: ...}`")
            v = _var(name) + "_target" if name in [i.name for i in w.p.inputs] else _var(name)
            width = " * ".join(dims) if dims else "1"
            lines.append(f"    teacher = torch.randn(features.shape[1], {width}, generator=g) / math.sqrt(features.shape[1])")
            scores = f"(features @ teacher).view(n{''.join(', ' + x for x in dims)})" if len(dims) != 1 else "(features @ teacher)"
            kind = kinds[name]
            if kind in CLASS_LOSSES:
                lines.append(f"    {v} = {scores}.argmax(-1)  # class ids")
            elif kind == "binary_cross_entropy":
                lines.append(f"    {v} = ({scores} > 0).float()  # 0/1 labels")
            elif kind == "kl_div":
                lines.append(f"    {v} = {scores}.softmax(-1)  # probability rows")
            else:
                lines.append(f"    {v} = {scores}")
            arrays.append(f'"{name}": {v}')
    lines += [f"    arrays = {{{', '.join(arrays)}}}", f"    return {split_call}"]
    return (f'def make_data() -> dict[str, dict[str, torch.Tensor]]:\n'
            f'    """{d.samples} random samples shaped like the model\'s inputs ({w.at("data", "kind")})."""\n'
            + "\n".join(lines))


def _var(name: str) -> str:
    return name.replace(".", "_")


def _convert(name: str, w: _Writer) -> str:
    """torch conversion of a loaded array for a model input or a target."""
    inp = next((i for i in w.p.inputs if i.name == name), None)
    dtype = inp.dtype if inp else w.p.targets[name].dtype
    return {"float32": ".float()", "int64": ".long()", "int32": ".int()", "float16": ".half()", "bfloat16": ".bfloat16()", "bool": ".bool()"}[dtype]


def _shape_check(w: _Writer) -> str:
    sig = {i.name: [x if isinstance(x, int) else None for x in i.shape[1:]] for i in w.p.inputs}
    sig.update({n: [x if isinstance(x, int) else None for x in t.shape[1:]] for n, t in w.p.targets.items()})
    sig.update(train_losses.sample_shapes(w))
    return f'''\
# Sample shapes the model needs (None: any size), after the batch dimension.
SAMPLE_SHAPES = {_py(sig)}


def check_shapes(arrays: dict[str, torch.Tensor]) -> None:
    n = {{len(v) for v in arrays.values()}}
    if len(n) != 1:
        sys.exit(f"error: the arrays hold different numbers of samples: " + ", ".join(f"{{k}} {{len(v)}}" for k, v in arrays.items()))
    for name, want in SAMPLE_SHAPES.items():
        have = list(arrays[name].shape[1:])
        if len(have) != len(want) or any(w is not None and w != h for w, h in zip(want, have)):
            sys.exit(f"error: {{name}} has samples of shape {{have}}, the model needs {{want}}")'''


def _npz(w: _Writer, split_call: str) -> str:
    d = w.t.data
    inputs = d.inputs or {i.name: i.name for i in w.p.inputs}
    targets = d.targets or {n: n for n in w.p.targets}
    arrays = [f'"{k}": torch.from_numpy(files["{v}"]){_convert(k, w)}' for k, v in list(inputs.items()) + list(targets.items())]
    arrays += train_losses.npz_arrays(w)
    joined = ",\n            ".join(arrays)
    return f'''\
DATA = "{w.p.data_paths[0]}"  # {w.at("data", "path")} (--data overrides)


def make_data(path: str = DATA) -> dict[str, dict[str, torch.Tensor]]:
    """Arrays from {Path(d.path).name}: model inputs and loss targets by name."""
    with np.load(path) as files:
        arrays = {{
            {joined},
        }}
    check_shapes(arrays)
    return {split_call}'''


def _npy(w: _Writer, split_call: str) -> str:
    d = w.t.data
    names = list(d.inputs) + list(d.targets)
    files = "\n".join(f'    "{n}": "{pth}",' for n, pth in zip(names, w.p.data_paths))
    convert = ", ".join(f'"{n}": "{_convert(n, w)[1:-2]}"' for n in names)
    return f'''\
FILES = {{  # {w.at("data", "kind")}
{files}
}}


def make_data() -> dict[str, dict[str, torch.Tensor]]:
    """One .npy file per model input and per target."""
    dtypes = {{{convert}}}
    arrays = {{name: getattr(torch.from_numpy(np.load(path)), dtypes[name])() for name, path in FILES.items()}}
    check_shapes(arrays)
    return {split_call}'''


def _csv(w: _Writer, split_call: str) -> str:
    d = w.t.data
    image = w.p.inputs[0].name
    target = next(iter(w.p.targets))
    classes = w.p.targets[target].dtype == "int64"
    feats = "None  # every column but the target" if d.features is None else _py(list(d.features))
    label_code = ('''\
    try:
        labels = torch.tensor([int(float(v)) for v in column], dtype=torch.int64)
    except ValueError:  # class names: ids in sorted order
        names = sorted(set(column))
        labels = torch.tensor([names.index(v) for v in column], dtype=torch.int64)''' if classes else
                  "    labels = torch.tensor([float(v) for v in column], dtype=torch.float32)")
    header = "True" if d.header else "False"
    return f'''\
DATA = "{w.p.data_paths[0]}"  # {w.at("data", "path")} (--data overrides)
TARGET_COLUMN = {_py(d.target)}
FEATURE_COLUMNS = {feats}


def make_data(path: str = DATA) -> dict[str, dict[str, torch.Tensor]]:
    """Rows of {Path(d.path).name}: feature columns -> {image}, column {d.target!r} -> {target}."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.reader(f, delimiter={_py(d.delimiter)}) if row]
    names = rows.pop(0) if {header} else list(range(len(rows[0])))
    index = lambda col: names.index(col) if isinstance(col, str) else col  # noqa: E731
    t = index(TARGET_COLUMN)
    features = [index(c) for c in FEATURE_COLUMNS] if FEATURE_COLUMNS is not None else [k for k in range(len(names)) if k != t]
    x = torch.tensor([[float(row[k]) for k in features] for row in rows], dtype=torch.float32)
    column = [row[t] for row in rows]
{label_code}
    arrays = {{"{image}": x, "{target}": labels}}
    check_shapes(arrays)
    return {split_call}'''


def _text(w: _Writer, split_call: str) -> str:
    d = w.t.data
    tok = w.p.inputs[0].name
    vocab = w.p.int_high.get(tok)
    stride = d.stride or 1
    if d.tokenizer == "char":
        tokenize = f'''\
    text = Path(path).read_text(encoding="utf-8")
    chars = sorted(set(text))  # the character vocabulary: id k is chars[k]
    if len(chars) > VOCAB_SIZE:
        sys.exit(f"error: {{path}} has {{len(chars)}} distinct characters, the model's vocabulary only {{VOCAB_SIZE}}")
    index = {{c: k for k, c in enumerate(chars)}}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int64)'''
        vocab_line = f"VOCAB_SIZE = {vocab}  # the token embedding's size\n" if vocab else "VOCAB_SIZE = 2 ** 31\n"
        ret = "    return splits, chars"
        doc_ret = "the splits and the vocabulary"
    else:
        tokenize = '''\
    ids = torch.tensor(list(Path(path).read_bytes()), dtype=torch.int64)  # byte values 0-255'''
        vocab_line = ""
        ret = "    return splits, None"
        doc_ret = "the splits (and no vocabulary: ids are bytes)"
    split = w.t.data.split
    return f'''\
DATA = "{w.p.data_paths[0]}"  # {w.at("data", "path")} (--data overrides)
SEQ_LEN = {d.seq_len}  # {w.at("data", "seq_len")}
{vocab_line}

def windows(ids: torch.Tensor, stride: int) -> torch.Tensor:
    """[n_windows, SEQ_LEN] token windows every `stride` tokens."""
    if len(ids) < SEQ_LEN:
        return ids.new_zeros(0, SEQ_LEN)
    return ids.unfold(0, SEQ_LEN, stride)


def make_data(path: str = DATA):
    """{Path(d.path).name} as {d.tokenizer}-level token ids; the validation and test parts are its tail
    (windows never straddle two parts). Returns {doc_ret}."""
{tokenize}
    n = len(ids)
    n_test, n_val = {f"round(n * {_num(split.test)})" if split.test else "0"}, {f"round(n * {_num(split.val)})" if split.val else "0"}
    parts = {{"train": ids[:n - n_val - n_test], "val": ids[n - n_val - n_test:n - n_test], "test": ids[n - n_test:]}}
    splits = {{
        name: {{"{tok}": windows(part, {stride} if name == "train" else SEQ_LEN)}}  # training windows overlap
        for name, part in parts.items()
    }}{train_losses.text_masks(w)}
{ret}'''


def _augment(w: _Writer) -> str:
    a = w.t.data.augment
    images = [i.name for i in w.p.inputs if i.is_float and (len(i.shape) == 4 or w.t.data.kind == "digits")]
    lines = []
    doc = []
    if a.crop:
        doc.append(f"random crop with padding {a.crop.padding}")
        lines.append(_fill('''\
        # Random crop: pad by PAD on each side, then cut a window of the original size.
        n, c, h, w = x.shape
        padded = F.pad(x, (PAD, PAD, PAD, PAD))
        top = torch.randint(0, 2 * PAD + 1, (n, 1, 1, 1), device=x.device)
        left = torch.randint(0, 2 * PAD + 1, (n, 1, 1, 1), device=x.device)
        rows = (top + torch.arange(h, device=x.device).view(1, 1, h, 1)).expand(n, c, h, w + 2 * PAD)
        x = padded.gather(2, rows)
        cols = (left + torch.arange(w, device=x.device).view(1, 1, 1, w)).expand(n, c, h, w)
        x = x.gather(3, cols)'''.replace("PAD", str(a.crop.padding))))
    if a.flip:
        doc.append("horizontal flip with probability 1/2")
        lines.append('''\
        flip = torch.rand(x.shape[0], device=x.device) < 0.5
        x = torch.where(flip.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)''')
    if a.noise:
        doc.append(f"Gaussian noise of std {_num(a.noise)}")
        lines.append(f"        x = x + {_num(a.noise)} * torch.randn_like(x)")
    doc_line = f'"""Training-time augmentation ({w.at("data", "augment")}): {", ".join(doc)}."""'
    if len(images) == 1:
        body = "\n".join(line[4:] for line in "\n".join(lines).splitlines())
        return f'''\
def augment(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    {doc_line}
    x = batch["{images[0]}"]
{body}
    return {{**batch, "{images[0]}": x}}'''
    body = "\n".join(lines)
    return f'''\
def augment(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    {doc_line}
    batch = dict(batch)
    for name in {_py(tuple(images))}:
        x = batch[name]
{body}
        batch[name] = x
    return batch'''


# -- forward, loss ---------------------------------------------------------------------


def _loss_expr(w: _Writer, lp) -> tuple[str, str]:
    s = lp.spec
    if s.kind in train_losses.KINDS:
        return train_losses.loss_expr(w, lp)
    o = f"outputs[{lp.index}]"
    out = next(x for x in w.p.outputs if x.name == lp.output)
    t = f'batch["{lp.target}"]' if lp.target else None
    rank = len(out.shape)
    kw = []
    if s.kind == "mse":
        return f"F.mse_loss({o}, {t})", f"mean squared error of {lp.output}"
    if s.kind == "l1":
        return f"F.l1_loss({o}, {t})", f"L1 (mean absolute error) of {lp.output}"
    if s.kind == "smooth_l1":
        return f"F.smooth_l1_loss({o}, {t}, beta={_num(s.beta)})", f"smooth L1 of {lp.output}, beta {_num(s.beta)}"
    if s.kind == "huber":
        return f"F.huber_loss({o}, {t}, delta={_num(s.delta)})", f"Huber loss of {lp.output}, delta {_num(s.delta)}"
    if s.kind in ("cross_entropy", "nll"):
        fn = "F.cross_entropy" if s.kind == "cross_entropy" else "F.nll_loss"
        if getattr(s, "label_smoothing", 0):
            kw.append(f"label_smoothing={_num(s.label_smoothing)}")
        if s.ignore_index is not None:
            kw.append(f"ignore_index={s.ignore_index}")
        args = f"{o}, {t}" if rank == 2 else f"{o}.flatten(0, -2), {t}.flatten()"
        what = ("softmax cross-entropy" if s.kind == "cross_entropy" else "negative log-likelihood") + f" of {lp.output}"
        if getattr(s, "label_smoothing", 0):
            what += f", label smoothing {_num(s.label_smoothing)}"
        return f"{fn}({args}{''.join(', ' + k for k in kw)})", what
    if s.kind == "binary_cross_entropy":
        pw = f", pos_weight={o}.new_tensor({_num(s.pos_weight)})" if s.pos_weight else ""
        return f"F.binary_cross_entropy_with_logits({o}, {t}{pw})", f"binary cross-entropy on the logits {lp.output}"
    if s.kind == "kl_div":
        inp = f"F.log_softmax({o}, dim=-1)" if s.input == "logits" else o
        lt = ", log_target=True" if s.log_target else ""
        return f'F.kl_div({inp}, {t}, reduction="batchmean"{lt})', f"KL(target || softmax({lp.output}))"
    if s.kind == "next_token":
        if s.ignore_index is not None:
            kw.append(f"ignore_index={s.ignore_index}")
        tok = f'batch["{lp.tokens}"]'
        return (f"F.cross_entropy({o}[:, :-1].flatten(0, 1), {tok}[:, 1:].flatten(){''.join(', ' + k for k in kw)})",
                f"next-token cross-entropy: {lp.output} at position t predicts {lp.tokens} at t + 1")
    if s.kind == "vae":
        mu, logvar, x = f"outputs[{lp.extra['mu']}]", f"outputs[{lp.extra['logvar']}]", f'batch["{lp.extra["input"]}"]'
        recon = (f'F.binary_cross_entropy_with_logits({o}, {x}, reduction="sum")' if s.reconstruction == "bce_logits"
                 else f'F.mse_loss({o}, {x}, reduction="sum")')
        beta = "" if s.beta == 1 else f"{_num(s.beta)} * "
        return (f"({recon} - {beta}0.5 * torch.sum(1 + {logvar} - {mu}.pow(2) - {logvar}.exp())) / len({o})",
                f"negative ELBO per sample: reconstruction of {lp.extra['input']} by {lp.output} "
                f"({'BCE on logits' if s.reconstruction == 'bce_logits' else 'squared error'}, summed) + "
                f"{beta}KL(N(mu, exp(logvar)) || N(0, I))")
    if s.kind == "clip":
        pairs = f"torch.arange(len({o}), device={o}.device)"
        return (f"0.5 * (F.cross_entropy({o}, {pairs}) + F.cross_entropy({o}.t(), {pairs}))",
                f"CLIP: symmetric cross-entropy of the pair logits {lp.output}, row i matches column i")
    raise ValueError(s.kind)


def _forward_and_loss(w: _Writer) -> str:
    terms = []
    docs = []
    losses = w.p.losses
    for lp in losses:
        expr, what = _loss_expr(w, lp)
        weight = lp.spec.weight
        line = w.at("loss") if w.t.loss is not None else f"{w.file}:{lp.line}"
        terms.append((expr if weight == 1 else f"{_num(weight)} * {expr}", f"{what} ({line})"))
        docs.append(what)
    if len(terms) == 1:
        body = f"    # {terms[0][1]}\n    return {terms[0][0]}"
    else:
        body = "    return (\n" + "\n".join(f"        {'+ ' if k else ''}{e}  # {c}" for k, (e, c) in enumerate(terms)) + "\n    )"
    sig = ", ".join(f"{n}" for n in w.input_names())
    outs = ", ".join(o.name for o in w.p.outputs)
    return f'''\
def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The model on a batch: inputs ({sig}) by name; the outputs ({outs}) as a tuple."""
    return {w.forward_call()}


def loss_fn(outputs: tuple[torch.Tensor, ...], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training objective{" (a weighted sum)" if len(terms) > 1 else ""}."""
{body}'''


# -- optimizer -------------------------------------------------------------------------


def _optimizer(w: _Writer) -> str:
    opt = w.t.optimizer
    kind = opt.kind
    args = ["groups", "lr=LR"]
    if kind == "sgd":
        cls = "torch.optim.SGD"
        if opt.momentum:
            args.append(f"momentum={_num(opt.momentum)}")
        if opt.nesterov:
            args.append("nesterov=True")
        what = "SGD" + (f", momentum {_num(opt.momentum)}" if opt.momentum else "") + (" (Nesterov)" if opt.nesterov else "")
    elif kind in ("adam", "adamw"):
        cls = "torch.optim.Adam" if kind == "adam" else "torch.optim.AdamW"
        if tuple(opt.betas) != (0.9, 0.999):
            args.append(f"betas=({_num(opt.betas[0])}, {_num(opt.betas[1])})")
        if opt.eps != 1e-8:
            args.append(f"eps={_num(opt.eps)}")
        if opt.amsgrad:
            args.append("amsgrad=True")
        if kind == "adamw":
            args.append(f"weight_decay={_num(opt.weight_decay)}")
        what = ("Adam" if kind == "adam" else f"AdamW, decoupled weight decay {_num(opt.weight_decay)}")
    elif kind == "rmsprop":
        cls = "torch.optim.RMSprop"
        if opt.alpha != 0.99:
            args.append(f"alpha={_num(opt.alpha)}")
        if opt.eps != 1e-8:
            args.append(f"eps={_num(opt.eps)}")
        if opt.momentum:
            args.append(f"momentum={_num(opt.momentum)}")
        if opt.centered:
            args.append("centered=True")
        what = "RMSprop"
    else:
        cls = "torch.optim.Adagrad"
        if opt.lr_decay:
            args.append(f"lr_decay={_num(opt.lr_decay)}")
        if opt.eps != 1e-10:
            args.append(f"eps={_num(opt.eps)}")
        if opt.initial_accumulator_value:
            args.append(f"initial_accumulator_value={_num(opt.initial_accumulator_value)}")
        what = "Adagrad"
    uses_l2 = bool(opt.l2) or any(g.l2 for g in opt.groups)
    decay_key = "weight_decay" if kind == "adamw" else None
    # Parameter groups: the spec's groups first (first match wins), then the rest, split by NO_DECAY.
    lines = []
    group_defs = []
    for k, g in enumerate(opt.groups):
        settings = {}
        if g.lr is not None:
            settings["lr"] = _num(g.lr)
        if g.weight_decay is not None:
            settings["weight_decay"] = _num(g.weight_decay)
        if uses_l2:
            settings["l2"] = _num(g.l2) if g.l2 is not None else ("L2" if opt.l2 else "0.0")
        group_defs.append((tuple(g.params), settings, w.at("optimizer", "groups", k)))
    rest_decay = {"l2": "L2"} if opt.l2 else ({"l2": "0.0"} if uses_l2 else {})
    rest_no = {}
    if opt.no_decay:
        if decay_key:
            rest_no["weight_decay"] = "0.0"
        if uses_l2:
            rest_no["l2"] = "0.0"
    if not group_defs and not opt.no_decay:
        body = ["    params = [p for p in model.parameters() if p.requires_grad]",
                f"    groups = [{{\"params\": params{_settings(rest_decay)}}}]"]
    else:
        body = []
        if group_defs:
            body.append("    # Groups with their own settings; a parameter goes to the first group that matches it.")
            body.append("    GROUPS = [")
            for pats, settings, where in group_defs:
                body.append(f"        ({_py(pats)}, {{{', '.join(f'{_py(k)}: {v}' for k, v in settings.items())}}}),  # {where}")
            body.append("    ]")
            body.append("    grouped = [[] for _ in GROUPS]")
        body.append("    decay, no_decay = [], []")
        body.append("    for name, p in model.named_parameters():")
        body.append("        if not p.requires_grad:")
        body.append("            continue")
        cond = "if"
        if group_defs:
            body.append("        k = next((k for k, (patterns, _) in enumerate(GROUPS) if any(fnmatch.fnmatchcase(name, pat) for pat in patterns)), None)")
            body.append("        if k is not None:")
            body.append("            grouped[k].append(p)")
            cond = "elif"
        if opt.no_decay:
            body.append(f"        {cond} any(fnmatch.fnmatchcase(name, pat) for pat in NO_DECAY):")
            body.append("            no_decay.append(p)")
            body.append("        else:")
        else:
            body.append("        else:")
        body.append("            decay.append(p)")
        parts = []
        if group_defs:
            parts.append('[{"params": params, **settings} for params, (_, settings) in zip(grouped, GROUPS)]')
        rest = [f'{{"params": decay{_settings(rest_decay)}}}']
        if opt.no_decay:
            rest.append(f'{{"params": no_decay{_settings(rest_no)}}}')
        parts.append("[" + ", ".join(rest) + "]")
        body.append(f"    groups = {' + '.join(parts)}")
    body.append(f"    return {cls}({', '.join(args)})")
    doc = f'"""{what}, lr {_num(opt.lr)}' + (f", L2 penalty {_num(opt.l2)}" if opt.l2 else "") + (
        " (none on NO_DECAY)" if opt.no_decay else "") + f' ({w.at("optimizer")})."""'
    text = f'''\
def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    {doc}
''' + "\n".join(body)
    if uses_l2:
        text += '''


def l2_penalty(optimizer: torch.optim.Optimizer) -> torch.Tensor | float:
    """L2 regularisation in the loss: sum over groups of l2 / 2 * |w|^2 (its gradient adds l2 * w)."""
    return sum(g["l2"] / 2 * sum(p.pow(2).sum() for p in g["params"]) for g in optimizer.param_groups if g["l2"])'''
    return text


def _settings(d: dict) -> str:
    return "".join(f", {_py(k)}: {v}" for k, v in d.items())


# -- schedule --------------------------------------------------------------------------


def _schedule(w: _Writer) -> str:
    s = w.t.schedule
    kind = s.kind if s is not None else "constant"
    warm = s is not None and s.warmup > 0
    start = "WARMUP_START" if warm and s.warmup_start else "0.0"
    t = "step - WARMUP_STEPS" if warm else "step"
    total = "total_steps - WARMUP_STEPS" if warm else "total_steps"
    lines = []
    doc = []
    if warm:
        doc.append(f"linear warm-up over {s.warmup} steps")
        lines += ["    if step < WARMUP_STEPS:",
                  f"        return {start} + (1 - {start}) * step / WARMUP_STEPS" if start != "0.0" else "        return step / WARMUP_STEPS"]
    if kind == "constant":
        doc.append("constant")
        lines.append("    return 1.0")
    elif kind == "step":
        doc.append(f"times {_num(s.gamma)} every {s.step_size} steps")
        lines.append(f"    return {_num(s.gamma)} ** (({t}) // {s.step_size})")
    elif kind == "exponential":
        doc.append(f"times {_num(s.gamma)} each step")
        lines.append(f"    return {_num(s.gamma)} ** ({t})")
    elif kind == "cosine":
        doc.append("half a cosine from LR down to MIN_LR")
        lines += [f"    progress = min(1.0, ({t}) / max(1, {total}))",
                  "    return MIN_LR / LR + (1 - MIN_LR / LR) * 0.5 * (1 + math.cos(math.pi * progress))"]
    elif kind == "linear":
        doc.append("linear from LR down to MIN_LR")
        lines += [f"    progress = min(1.0, ({t}) / max(1, {total}))",
                  "    return MIN_LR / LR + (1 - MIN_LR / LR) * (1 - progress)"]
    where = w.at("schedule") if s is not None else "constant: the spec gives no schedule"
    return f'''\
def lr_factor(step: int, total_steps: int) -> float:
    """The learning rate at optimizer step `step` (from 0), as a factor of each group's lr:
    {", then ".join(doc)} ({where})."""
''' + "\n".join(lines) + '''


def make_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps))'''


# -- one optimizer step ------------------------------------------------------------------


def _train_step(w: _Writer) -> str:
    t = w.t
    uses_l2 = bool(t.optimizer.l2) or any(g.l2 for g in t.optimizer.groups)
    first = w.input_names()[0]
    loss_line = "loss = loss_fn(forward(model, batch), batch)" + (" + l2_penalty(optimizer)" if uses_l2 else "")
    if t.precision != "fp32":
        dtype = "torch.bfloat16" if t.precision == "bf16" else "torch.float16"
        fwd = f'''\
            with torch.autocast(batch["{first}"].device.type, dtype={dtype}):  # mixed precision, {w.at("precision")}
                {loss_line}'''
    else:
        fwd = f"            {loss_line}"
    accumulate = t.grad_accumulation > 1
    scaled = "scaler.scale(loss / len(micro_batches)).backward()" if t.precision == "fp16" else "(loss / len(micro_batches)).backward()"
    if accumulate:
        loop = f'''\
    for k, batch in enumerate(micro_batches):
        # Under DDP, average gradients across processes only on the last micro-batch.
        last = k == len(micro_batches) - 1
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()
        with sync:
{fwd}
            {scaled}
        total += loss.detach()'''
    else:
        fwd = "\n".join(line[4:] for line in fwd.splitlines())
        loop = f'''\
    for batch in micro_batches:
{fwd}
        {scaled}
        total += loss.detach()'''
    after = []
    if t.precision == "fp16":
        after.append("    scaler.unscale_(optimizer)  # clip (and report) true gradient norms" if t.clip_grad_norm else "")
    if t.clip_grad_norm is not None:
        after.append(f"    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_GRAD_NORM)  # {w.at('clip_grad_norm')}")
    if t.precision == "fp16":
        after += ["    scaler.step(optimizer)  # skipped when the fp16 gradients overflowed", "    scaler.update()"]
    else:
        after.append("    optimizer.step()")
    after.append("    optimizer.zero_grad(set_to_none=True)")
    scaler_arg = ", scaler: torch.amp.GradScaler" if t.precision == "fp16" else ""
    return f'''\
def train_step(model: nn.Module, optimizer: torch.optim.Optimizer{scaler_arg}, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """One optimizer step over {"GRAD_ACCUMULATION micro-batches" if accumulate else "one batch"}; returns the mean loss (of this process)."""
    total = torch.zeros(())
{loop}
''' + "\n".join(a for a in after if a) + '''
    return total / len(micro_batches)'''


# -- evaluation ------------------------------------------------------------------------


def _evaluate(w: _Writer) -> str:
    t = w.t
    metrics = list(t.eval.metrics) if t.eval else []
    lp = next((lp for lp in w.p.losses if lp.output == w.p.metric_output), w.p.losses[0])
    s = lp.spec
    needs_scores = bool(metrics)
    lines = []
    finals = []
    init = ['    totals = torch.zeros(2, dtype=torch.float64)  # [loss * samples, samples]']
    if needs_scores:
        if lp.spec.kind == "next_token":
            lines.append(f'        scores, target = outputs[{lp.index}][:, :-1], batch["{lp.tokens}"][:, 1:]  # next-token predictions')
        else:
            lines.append(f'        scores, target = outputs[{lp.index}], batch["{lp.target}"]')
        ignore = getattr(s, "ignore_index", None)
        if ignore is not None and lp.spec.kind in CLASS_LOSSES:
            lines.append(f"        keep = target != {ignore}  # ignore_index")
            lines.append("        scores, target = scores[keep], target[keep]")
    out = next(o for o in w.p.outputs if o.name == lp.output)
    classes = out.shape[-1] if s.kind in CLASS_LOSSES else None
    if any(m in ("accuracy", "precision", "recall", "f1") for m in metrics):
        init.append(f"    per_class = torch.zeros(3, {classes}, dtype=torch.float64)  # [correct, predicted, true] counts per class")
        lines.append("        predicted, target = scores.argmax(-1).flatten(), target.flatten()")
        lines.append(f"        per_class[0] += torch.bincount(target[predicted == target], minlength={classes}).double().cpu()")
        lines.append(f"        per_class[1] += torch.bincount(predicted, minlength={classes}).double().cpu()")
        lines.append(f"        per_class[2] += torch.bincount(target, minlength={classes}).double().cpu()")
    if "perplexity" in metrics:
        init.append("    token_nll = torch.zeros(2, dtype=torch.float64)  # [summed -log p, tokens]")
        lines.append('        token_nll += torch.tensor([F.cross_entropy(scores.flatten(0, -2).float(), target.flatten(), reduction="sum").item(), target.numel()], dtype=torch.float64)')
    if "mse" in metrics:
        init.append("    squared = torch.zeros(2, dtype=torch.float64)  # [summed squared error, values]")
        lines.append("        squared += torch.tensor([(scores.float() - target).pow(2).sum().item(), target.numel()], dtype=torch.float64)")
    reduce_names = ["totals"] + [n for n, m in (("per_class", {"accuracy", "precision", "recall", "f1"}), ("token_nll", {"perplexity"}), ("squared", {"mse"})) if m & set(metrics)]
    finals.append('    metrics = {"loss": (totals[0] / totals[1]).item()}')
    if "accuracy" in metrics:
        finals.append('    metrics["accuracy"] = (per_class[0].sum() / per_class[2].sum()).item()')
    if {"precision", "recall", "f1"} & set(metrics):
        finals += ["    # Macro averages over the classes that occur (as targets or predictions), as scikit-learn's.",
                   "    correct, predicted, true = per_class",
                   "    precision = correct / predicted.clamp(min=1)",
                   "    recall = correct / true.clamp(min=1)",
                   "    present = (predicted + true) > 0"]
        if "precision" in metrics:
            finals.append('    metrics["precision"] = precision[present].mean().item()')
        if "recall" in metrics:
            finals.append('    metrics["recall"] = recall[present].mean().item()')
        if "f1" in metrics:
            finals.append("    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0.0)")
            finals.append('    metrics["f1"] = f1[present].mean().item()')
    if "perplexity" in metrics:
        finals.append('    metrics["perplexity"] = math.exp(token_nll[0] / token_nll[1])')
    if "mse" in metrics:
        finals.append('    metrics["mse"] = (squared[0] / squared[1]).item()')
    reduce = "\n".join(f"        dist.all_reduce({n})" for n in reduce_names)
    size = "EVAL_BATCH_SIZE" if t.eval and t.eval.batch_size else "BATCH_SIZE"
    first = w.input_names()[0]
    body = "\n".join(lines)
    return f'''\
@torch.no_grad()
def evaluate(model: nn.Module, data: dict[str, torch.Tensor], batch_size: int = {size}) -> dict[str, float]:
    """Loss{" and " + ", ".join(metrics) if metrics else ""} on `data`{f" (metrics on {lp.output})" if metrics else ""}; under torchrun each process takes every
    world-size-th sample and the sums are added up."""
    was_training = model.training
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    index = torch.arange(rank, len(data["{first}"]), world)
''' + "\n".join(init) + f'''
    for start in range(0, len(index), batch_size):
        batch = {{k: v[index[start:start + batch_size]] for k, v in data.items()}}
        outputs = forward(model, batch)
        samples = len(batch["{first}"])
        totals += torch.tensor([loss_fn(outputs, batch).item() * samples, samples], dtype=torch.float64)
{body}
    if dist.is_initialized():
{reduce}
    model.train(was_training)
''' + "\n".join(finals) + '''
    return metrics'''


# -- distributed, checkpoints, logging -----------------------------------------------------


def _distributed(w: _Writer) -> str:
    return '''\
def setup_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun: one process per device, gloo on CPU, nccl on GPU."""
    use_cuda = torch.cuda.is_available() and device != "cpu" and not (device or "").startswith("cpu")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device or ("cuda" if use_cuda else "cpu"))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(local)
        return rank, world, local
    return rank, world, torch.device("cpu")'''


def _checkpoints(w: _Writer) -> str:
    t = w.t
    fp16 = t.precision == "fp16"
    es = t.early_stopping is not None
    return f'''\
def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict, named as in the spec (and in `lbdlc build --weights`)."""
    return {{name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}}


def rng_state() -> dict:
    """This process's random number generators, so that a resumed run draws the same numbers."""
    np_state = np.random.get_state()
    state = {{
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, model: nn.Module, optimizer, schedule{", scaler" if fp16 else ""}, progress: dict) -> None:
    """out/checkpoint/: weights.safetensors and training_state.pt (optimizer, schedule, step, random
    generators of every process). Written to a temporary directory, then renamed: an interrupted
    save leaves the previous checkpoint whole. Every process must call it (it gathers their RNG states)."""
    states = [None] * dist.get_world_size() if dist.is_initialized() else [None]
    if dist.is_initialized():
        dist.all_gather_object(states, rng_state())
    else:
        states[0] = rng_state()
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    tmp, final = out / "checkpoint.tmp", out / "checkpoint"
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(weights_of(model), str(tmp / "weights.safetensors"), metadata={{"step": str(progress["step"])}}){train_losses.checkpoint_save(w)}
    state = {{
        "progress": progress,
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),{"""
        "scaler": scaler.state_dict(),""" if fp16 else ""}
        "rng": states,
    }}
    torch.save(state, tmp / "training_state.pt")
    old = out / "checkpoint.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


def load_checkpoint(path: Path, model: nn.Module, optimizer, schedule{", scaler" if fp16 else ""}) -> dict:
    """Restore a checkpoint written by save_checkpoint; returns its progress counters."""
    model.load_state_dict(load_file(str(path / "weights.safetensors")))
    state = torch.load(path / "training_state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"]){"""
    scaler.load_state_dict(state["scaler"])""" if fp16 else ""}
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if len(state["rng"]) == world:
        set_rng_state(state["rng"][rank])
    elif rank == 0:
        print(f"note: the checkpoint comes from {{len(state['rng'])}} processes, this run has {{world}}: random streams restart")
    return state["progress"]'''


def _logging(w: _Writer) -> str:
    metrics = list(w.t.eval.metrics) if w.t.eval else []
    cols = ["step", "epoch", "lr", "train_loss", "samples_per_s", "val_loss"] + [f"val_{m}" for m in metrics]
    cols += train_losses.log_columns(w)
    tb = ""
    if w.t.log.tensorboard:
        tb = '''
        self.tensorboard = None
        if TENSORBOARD:  # TensorBoard events too, when tensorboard is installed
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                print("note: tensorboard is not installed; metrics go to metrics.csv only")'''
    tb_write = '''
        if self.tensorboard is not None:
            for key, value in row.items():
                if key not in ("step", "epoch") and value != "":
                    self.tensorboard.add_scalar(key, float(value), row["step"])
            self.tensorboard.flush()''' if w.t.log.tensorboard else ""
    return f'''\
COLUMNS = {_py(cols)}


class Log:
    """metrics.csv (one row per logged or evaluated step) and progress lines, on rank 0 only."""

    def __init__(self, out: Path, resume_step: int):
        self.path = out / "metrics.csv"
        rows = []
        if resume_step and self.path.exists():  # keep the rows up to the checkpoint
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows){tb}

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS, restval="").writerow(row){tb_write}


def progress_line(step: int, total: int, epoch: int, loss: float, lr: float, speed: float) -> str:
    done = int(20 * step / total)
    return f"step {{step:>{{len(str(total))}}}}/{{total}} [{{'#' * done}}{{'.' * (20 - done)}}] epoch {{epoch}} loss {{loss:.4f}} lr {{lr:.2e}} {{speed:,.0f}} samples/s"'''


def _train_loop(w: _Writer) -> str:
    t = w.t
    text = t.data.kind == "text"
    fp16 = t.precision == "fp16"
    es = t.early_stopping is not None
    has_eval_every = t.eval is not None and t.eval.every
    metrics = list(t.eval.metrics) if t.eval else []
    first = w.input_names()[0]
    if t.epochs is not None:
        total = "args.steps or (args.epochs or EPOCHS) * steps_per_epoch"
    else:
        total = "args.steps or (args.epochs * steps_per_epoch if args.epochs else STEPS)"
    data_load = ("splits, vocabulary = make_data(args.data)" if text else
                 "splits = make_data(args.data)" if t.data.kind in ("npz", "csv", "image_folder") else "splits = make_data()")
    vocab_save = '''
    if rank == 0 and vocabulary is not None:
        (out / "vocab.json").write_text(json.dumps(vocabulary, ensure_ascii=False))''' if text else ""
    augment_line = "\n            batch = augment(batch)" if _augments(t) else ""
    micro = ("[{k: v[j::GRAD_ACCUMULATION] for k, v in batch.items()} for j in range(GRAD_ACCUMULATION)]"
             if t.grad_accumulation > 1 else "[batch]")
    scaler_arg = ", scaler" if fp16 else ""
    if t.eval is not None and t.eval.every:
        eval_due = "step % EVAL_EVERY == 0 or step == total_steps"
    elif t.epochs is not None:
        eval_due = "step % steps_per_epoch == 0 or step == total_steps"
    else:
        eval_due = "step == total_steps"
    if t.checkpoint is not None and t.checkpoint.every:
        ckpt_due = "step % CHECKPOINT_EVERY == 0 or step == total_steps or step == args.stop_at or stop"
    elif t.epochs is not None:
        ckpt_due = "step % steps_per_epoch == 0 or step == total_steps or step == args.stop_at or stop"
    else:
        ckpt_due = "step == total_steps or step == args.stop_at or stop"
    has_val = t.data.split.val > 0
    if es:
        mode_min = t.early_stopping.metric in ("loss", "perplexity", "mse")
        better = ("value < progress[\"best\"] - MIN_DELTA" if mode_min else "value > progress[\"best\"] + MIN_DELTA")
        best_init = "math.inf" if mode_min else "-math.inf"
        es_code = f'''
                # Early stopping ({w.at("early_stopping")}): keep the best weights, stop after PATIENCE evaluations without improvement.
                value = metrics[EARLY_STOPPING_METRIC]
                if {better}:
                    progress["best"], progress["bad_evals"] = value, 0
                    best_weights = weights_of(raw_model)
                    if rank == 0:
                        save_file(best_weights, str(out / "best.safetensors"))
                else:
                    progress["bad_evals"] += 1
                    stop = progress["bad_evals"] >= PATIENCE'''
        es_init = f', "best": {best_init}, "bad_evals": 0'
        es_end = '''
    if best_weights is not None:  # early stopping: end with the best weights seen
        raw_model.load_state_dict(best_weights)'''
        es_resume = '''
        if (resume / ".." / "best.safetensors").exists():
            best_weights = load_file(str(resume / ".." / "best.safetensors"))'''
    else:
        es_code = es_init = es_end = es_resume = ""
    eval_block = f'''
            if {eval_due}:
                metrics = evaluate(raw_model, splits["val"])
                row.update({{f"val_{{k}}": repr(v) for k, v in metrics.items()}})
                if rank == 0:
                    print("  validation: " + ", ".join(f"{{k}} {{v:.4f}}" for k, v in metrics.items()), flush=True){es_code}''' if has_val else ""
    tensorboard_close = '''
        if log.tensorboard is not None:
            log.tensorboard.close()''' if t.log.tensorboard else ""
    compile_line = '''
    if COMPILE:
        model = torch.compile(model)''' if t.compile else ""
    fp16_setup = '''
    if device.type != "cuda":
        sys.exit("error: fp16 training needs a CUDA device (its gradient scaler is CUDA-only); use `precision: bf16` on CPU")
    scaler = torch.amp.GradScaler("cuda")''' if fp16 else ""
    per_process = "BATCH_SIZE // world"
    accum_check = " * GRAD_ACCUMULATION" if t.grad_accumulation > 1 else ""
    return f'''\
def train(args: argparse.Namespace) -> dict:
    rank, world, device = setup_distributed(args.device)
    if BATCH_SIZE % {"(world" + accum_check + ")" if accum_check else "world"}:
        sys.exit(f"error: BATCH_SIZE {{BATCH_SIZE}} does not split evenly over {{world}} processes{" and GRAD_ACCUMULATION micro-batches" if accum_check else ""}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)  # the same on every process: the same initial weights
    raw_model = Model()
    if args.init and Path(args.init).exists():  # the build's initial weights (seeded, or from --weights)
        raw_model.load_state_dict(load_file(args.init))
    raw_model.to(device)
    {data_load}{vocab_save}
    splits = {{name: {{k: v.to(device) for k, v in part.items()}} for name, part in splits.items()}}
    n_train = len(splits["train"]["{first}"])
    steps_per_epoch = n_train // BATCH_SIZE
    if steps_per_epoch == 0:
        sys.exit(f"error: the training split has {{n_train}} samples, fewer than one batch of {{BATCH_SIZE}}")
    total_steps = {total}

    optimizer = make_optimizer(raw_model)
    schedule = make_schedule(optimizer, total_steps){fp16_setup}
    progress = {{"step": 0{es_init}}}
    best_weights = None
    if args.resume is not None:
        resume = Path(args.resume or out / "checkpoint")
        progress = load_checkpoint(resume, raw_model, optimizer, schedule{scaler_arg}){es_resume}
        if rank == 0:
            print(f"resumed from {{resume}} at step {{progress['step']}}")
    else:
        torch.manual_seed(args.seed + rank)  # dropout and augmentation differ between processes{train_losses.after_setup(w)}{train_losses.ddp_comment(w)}
    model = DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None{train_losses.ddp_options(w)}) if world > 1 else raw_model{compile_line}
    model.train()

    # Each epoch is one permutation of the training split (seeded by SEED and the epoch);
    # batch k is samples [k * BATCH_SIZE, (k + 1) * BATCH_SIZE) of it, every world-th to each process.
    sampler = DistributedSampler(range(n_train), num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    per_process = {per_process}
    log = Log(out, progress["step"]) if rank == 0 else None
    step, stop = progress["step"], False
    window_loss, window_steps, window_start = torch.zeros(()), 0, time.perf_counter()
    started = time.perf_counter()
    while step < total_steps and not stop:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), device=device)
        for k in range(step % steps_per_epoch, steps_per_epoch):
            index = order[k * per_process:(k + 1) * per_process]
            batch = {{name: v[index] for name, v in splits["train"].items()}}{augment_line}{train_losses.batch_hook(w)}
            lr = optimizer.param_groups[-1]["lr"]  # the base lr (groups of their own come first)
            loss = train_step(model, optimizer{scaler_arg}, {micro})
            schedule.step()
            step += 1
            progress["step"] = step{train_losses.after_step(w)}
            window_loss += loss.detach().cpu()
            window_steps += 1
            row = {{}}
            if step % LOG_EVERY == 0 or step == total_steps:
                mean = torch.stack([window_loss / window_steps])
                if dist.is_initialized():
                    dist.all_reduce(mean)
                    mean /= world
                speed = window_steps * BATCH_SIZE / (time.perf_counter() - window_start)
                row = {{"step": step, "epoch": epoch + 1, "lr": repr(lr), "train_loss": repr(mean.item()), "samples_per_s": f"{{speed:.1f}}"}}
                if rank == 0:
                    print(progress_line(step, total_steps, epoch + 1, mean.item(), lr, speed), flush=True)
                window_loss, window_steps, window_start = torch.zeros(()), 0, time.perf_counter(){eval_block}
            if row and rank == 0:
                log.write({{"step": step, "epoch": epoch + 1, **row}})
            if {ckpt_due}:
                save_checkpoint(out, raw_model, optimizer, schedule{scaler_arg}, progress)
            if step >= total_steps or step == args.stop_at or stop:
                stop = True
                break
    seconds = time.perf_counter() - started{es_end}

    summary = {{"steps": step, "total_steps": total_steps, "seconds": round(seconds, 3), "world_size": world}}
    if not (step < total_steps and step == args.stop_at):  # finished, not paused by --stop-at
        for name in ("val", "test"):
            if len(splits[name]["{first}"]):
                summary[name] = evaluate(raw_model, splits[name])
    if rank == 0:
        save_file(weights_of(raw_model), str(out / "weights.safetensors"))
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\\n")
        results = "; ".join(f"{{name}} " + ", ".join(f"{{k}} {{v:.4f}}" for k, v in summary[name].items()) for name in ("val", "test") if name in summary)
        print(f"done: {{step}} steps in {{seconds:.1f}} s" + (f"; {{results}}" if results else "") + f"; weights in {{out / 'weights.safetensors'}}", flush=True){tensorboard_close}
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return summary'''


def _main(w: _Writer) -> str:
    t = w.t
    data_flag = ""
    if t.data.kind in ("npz", "csv", "text", "image_folder"):
        data_flag = '\n    parser.add_argument("--data", default=DATA, help="the data file (default: the one the spec names)")'
    return f'''\
def main(argv: list[str] | None = None) -> dict:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(here / "run"), help="where checkpoints, weights and metrics go (default: run/ beside this file)")
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                        help="continue from a checkpoint directory (default: OUT/checkpoint)")
    parser.add_argument("--steps", type=int, default=None, help="train for this many optimizer steps instead")
    parser.add_argument("--epochs", type=int, default=None, help="train for this many epochs instead")
    parser.add_argument("--stop-at", type=int, default=None, help="pause at this step (checkpoint saved; --resume continues)")
    parser.add_argument("--seed", type=int, default=SEED, help="seed for initialisation, data order, dropout and augmentation")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--init", default=str(here / "weights.safetensors"),
                        help="initial weights (default: the build's weights.safetensors; 'none': the module's own initialisation)"){data_flag}
    args = parser.parse_args(argv)
    if args.init == "none":
        args.init = None
    return train(args)


if __name__ == "__main__":
    main()'''


def write(plan: Plan, out_dir: Path, model_name: str, lbdlc_version: str) -> list[Path]:
    path = out_dir / "train.py"
    path.write_text(generate(plan, model_name, lbdlc_version), encoding="utf-8")
    return [path]
