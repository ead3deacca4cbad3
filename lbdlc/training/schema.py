"""The `train:` section of a spec: the training protocol, validated strictly at YAML positions.

Every choice with options of its own (data source, loss, optimizer, schedule) is a mapping
selected by its `kind`, with only that kind's options allowed:

    train:
      data: {kind: digits, resize: [28, 28]}
      batch_size: 64
      epochs: 8
      loss: {kind: cross_entropy, label_smoothing: 0.05}
      optimizer: {kind: adam, lr: 2e-3}
      schedule: {kind: cosine, warmup: 50}

Unknown keys and kinds are located errors with did-you-mean, like everywhere in a spec.
Checks that need the model's graph (loss outputs exist, targets fit them, data fits the
inputs, parameter patterns match parameters) live in `lbdlc.training.check`.
docs/training.md describes every option.
"""
from __future__ import annotations

import typing
from typing import Annotated, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Tag

from ..annotations import literal_tag, model_at, strip as _strip
from ..errors import SpecError, did_you_mean
from ..source import LocDict, LocList, key_loc, loc_of, node_at

Identifier = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
ScopedName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")]
Fraction = Annotated[float, Field(ge=0, lt=1)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# ---------------------------------------------------------------------------------------
# Data


class Split(StrictModel):
    """Held-out fractions; the training split is the rest. Shuffled with `seed` (default:
    the training seed), except for text, whose validation and test parts are its tail."""

    val: Fraction = 0.1
    test: Fraction = 0.0
    seed: int | None = None


class Crop(StrictModel):
    """Random crop back to the original size after zero-padding each side by `padding`."""

    padding: PositiveInt


class Augment(StrictModel):
    """Augmentation of training images ([batch, channels, height, width] inputs)."""

    crop: Crop | None = None
    flip: bool = False  # horizontal flip with probability 1/2
    noise: PositiveFloat | None = None  # std of added Gaussian noise


class DataBase(StrictModel):
    split: Split = Split()


class DigitsData(DataBase):
    """scikit-learn's bundled handwritten digits: 1,797 grey 8x8 images, labels 0-9."""

    kind: Literal["digits"]
    resize: list[PositiveInt] | None = Field(None, min_length=2, max_length=2)  # [height, width]
    flatten: bool = False  # [1, H, W] -> [H * W]
    augment: Augment | None = None
    target: ScopedName | None = None  # the output the labels are for; default: the first loss's
    range: tuple[float, float] = (0.0, 1.0)  # pixel values scaled to [low, high] (e.g. [-1, 1] for a tanh GAN)
    classes: list[Annotated[int, Field(ge=0, le=9)]] | None = Field(None, min_length=1)  # keep only these digits (labels unchanged)


class SyntheticData(DataBase):
    """Random inputs shaped from the spec's inputs; targets from a fixed random linear teacher."""

    kind: Literal["synthetic"]
    samples: PositiveInt = 1024
    sizes: dict[Identifier, PositiveInt] = Field(default_factory=dict)  # symbolic dims besides batch
    high: PositiveInt | None = None  # integer inputs are drawn from [0, high); default: the embedding size
    augment: Augment | None = None


class NpzData(DataBase):
    """Arrays from one .npz file: `inputs` maps model inputs, `targets` model outputs, to array names."""

    kind: Literal["npz"]
    path: str
    inputs: dict[Identifier, str] | None = None  # default: arrays named like the inputs
    targets: dict[ScopedName, str] | None = None  # default: arrays named like the loss outputs
    augment: Augment | None = None


class NpyData(DataBase):
    """One .npy file per model input and per target."""

    kind: Literal["npy"]
    inputs: dict[Identifier, str] = Field(min_length=1)
    targets: dict[ScopedName, str] = Field(default_factory=dict)
    augment: Augment | None = None


class CsvData(DataBase):
    """A table: feature columns become the (single, [batch, features]) input, one column the target."""

    kind: Literal["csv"]
    path: str
    target: str | int  # column name (with a header) or index
    features: list[str | int] | None = None  # default: every other column
    header: bool = True
    delimiter: str = Field(",", min_length=1, max_length=1)


class TextData(DataBase):
    """A text file as token ids (characters or bytes), cut into windows for language modelling."""

    kind: Literal["text"]
    path: str
    tokenizer: Literal["char", "byte"] = "char"
    seq_len: PositiveInt
    stride: PositiveInt | None = None  # between training windows; default 1 (every offset)


class ImageFolderData(DataBase):
    """Images in class subfolders, `path/<class>/<image>` (PNG, JPEG, BMP, GIF), read with Pillow:
    class ids in sorted order of the folder names; each image converted to grey or RGB (the
    input's channels), resized to the input's height and width, scaled to `range`."""

    kind: Literal["image_folder"]
    path: str
    range: tuple[float, float] = (0.0, 1.0)
    augment: Augment | None = None
    target: ScopedName | None = None  # the output the labels are for; default: the first loss's


DataSpec = Annotated[
    Union[DigitsData, SyntheticData, NpzData, NpyData, CsvData, TextData, ImageFolderData], Field(discriminator="kind")
]

# ---------------------------------------------------------------------------------------
# Losses


class LossBase(StrictModel):
    output: ScopedName | None = None  # default: the model's only output
    weight: float = 1.0  # in a weighted sum of several losses


class MSELoss(LossBase):
    kind: Literal["mse"]


class L1Loss(LossBase):
    kind: Literal["l1"]


class SmoothL1Loss(LossBase):
    kind: Literal["smooth_l1"]
    beta: PositiveFloat = 1.0


class HuberLoss(LossBase):
    kind: Literal["huber"]
    delta: PositiveFloat = 1.0


class CrossEntropyLoss(LossBase):
    """Softmax cross-entropy over the last dimension of the output (logits); targets are class ids."""

    kind: Literal["cross_entropy"]
    label_smoothing: Fraction = 0.0
    ignore_index: int | None = None


class BinaryCrossEntropyLoss(LossBase):
    """Sigmoid + binary cross-entropy on logits (numerically stable); targets are 0/1 of the output's shape."""

    kind: Literal["binary_cross_entropy"]
    pos_weight: PositiveFloat | None = None


class NLLLoss(LossBase):
    """Negative log-likelihood of the output's log-probabilities (last dimension)."""

    kind: Literal["nll"]
    ignore_index: int | None = None


class KLDivLoss(LossBase):
    """KL(target || model): targets are probability rows of the output's shape."""

    kind: Literal["kl_div"]
    input: Literal["logits", "log_probs"] = "logits"
    log_target: bool = False


class NextTokenLoss(LossBase):
    """Language-model loss: logits at position t predict the token input at t + 1."""

    kind: Literal["next_token"]
    tokens: Identifier | None = None  # the token-id input; default: the only integer input
    ignore_index: int | None = None


class VAELoss(LossBase):
    """Negative ELBO per sample: reconstruction error of an input (summed over its elements)
    plus beta * KL(N(mu, exp(logvar)) || N(0, I)). `output` is the reconstruction."""

    kind: Literal["vae"]
    mu: ScopedName
    logvar: ScopedName
    input: Identifier | None = None  # the input reconstructed; default: the only float input
    reconstruction: Literal["bce_logits", "mse"] = "bce_logits"
    beta: NonNegativeFloat = 1.0


class CLIPLoss(LossBase):
    """Symmetric cross-entropy of a [batch, batch] matrix of pair logits: row i matches column i."""

    kind: Literal["clip"]


class GANLoss(LossBase):
    """Non-saturating GAN losses with alternating steps (Goodfellow et al. 2014): each training
    step makes `d_steps` discriminator updates, then one generator update. `fake` and `real`
    are the discriminator's logits on generated and on real samples; `noise` is the model
    input drawn from N(0, I) at every forward pass (the data feeds the other inputs).
    `output` is not used. See lbdlc/training/special.py."""

    kind: Literal["gan"]
    fake: ScopedName
    real: ScopedName
    noise: Identifier
    generator: list[str] = Field(default_factory=lambda: ["generator.*"], min_length=1)  # parameter name patterns
    discriminator: list[str] = Field(default_factory=lambda: ["discriminator.*"], min_length=1)
    d_steps: PositiveInt = 1  # discriminator updates per generator update
    real_label: Annotated[float, Field(gt=0, le=1)] = 1.0  # < 1: one-sided label smoothing


class TDTransitions(StrictModel):
    """Names of the transition arrays in the .npz file (the state is the model's input)."""

    action: str = "action"
    reward: str = "reward"
    next_state: str = "next_state"
    done: str = "done"


class TDLoss(LossBase):
    """DQN temporal-difference loss (Mnih et al. 2015): Q(s, a) of the output against
    y = r + gamma * (1 - done) * max_a' Q(s', a'; w-bar), where w-bar is a frozen copy of the
    weights refreshed every `target_sync` optimizer steps."""

    kind: Literal["td"]
    gamma: Annotated[float, Field(ge=0, le=1)] = 0.99
    target_sync: PositiveInt = 1000
    error: Literal["huber", "mse"] = "huber"
    delta: PositiveFloat = 1.0  # huber only
    transitions: TDTransitions = TDTransitions()


class MaskedLMLoss(LossBase):
    """BERT's masked-LM loss: positions of the token input are chosen with probability
    `mask_prob`; a chosen token becomes `mask_id` 80% of the time, a random token 10%, stays
    10%; cross-entropy of the output's logits at the chosen positions only."""

    kind: Literal["masked_lm"]
    tokens: Identifier | None = None  # the token-id input; default: the only integer input
    mask_prob: Annotated[float, Field(gt=0, lt=1)] = 0.15
    mask_id: NonNegativeInt | None = None  # default: the last id of the vocabulary (reserved)

    @property
    def ignore_index(self) -> int:
        return -100  # the label of positions that were not chosen


class TripletLoss(LossBase):
    """F.triplet_margin_loss of three embedding outputs: `output` (anchors), `positive`, `negative`."""

    kind: Literal["triplet"]
    positive: ScopedName
    negative: ScopedName
    margin: PositiveFloat = 1.0
    p: PositiveFloat = 2.0
    swap: bool = False


class ContrastiveLoss(LossBase):
    """Contrastive loss of pairs (Hadsell et al. 2006): with d = |output - other|_2 and a 0/1
    target y (1: similar), y * d^2 + (1 - y) * max(0, margin - d)^2, halved, mean over pairs."""

    kind: Literal["contrastive"]
    other: ScopedName
    margin: PositiveFloat = 1.0


LossSpec = Annotated[
    Union[MSELoss, L1Loss, SmoothL1Loss, HuberLoss, CrossEntropyLoss, BinaryCrossEntropyLoss, NLLLoss, KLDivLoss, NextTokenLoss,
          VAELoss, CLIPLoss, GANLoss, TDLoss, MaskedLMLoss, TripletLoss, ContrastiveLoss],
    Field(discriminator="kind"),
]
CLASS_LOSSES = ("cross_entropy", "nll", "next_token", "masked_lm")  # targets are class ids

# ---------------------------------------------------------------------------------------
# Optimizers


class ParamGroup(StrictModel):
    """Settings for the parameters whose names match one of `params` (fnmatch patterns)."""

    params: list[str] = Field(min_length=1)
    lr: PositiveFloat | None = None
    weight_decay: NonNegativeFloat | None = None  # adamw only
    l2: NonNegativeFloat | None = None


class OptimizerBase(StrictModel):
    lr: PositiveFloat
    l2: NonNegativeFloat = 0.0  # penalty l2/2 * |w|^2 added to the loss (coupled, "L2 regularisation")
    # Parameters without weight decay or L2: fnmatch patterns over parameter names, and the
    # words `biases`, `norms` (normalisation layers' parameters) and `embeddings`.
    no_decay: list[str] = Field(default_factory=list)
    groups: list[ParamGroup] = Field(default_factory=list)


class SGD(OptimizerBase):
    kind: Literal["sgd"]
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    nesterov: bool = False


class Adam(OptimizerBase):
    kind: Literal["adam"]
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    amsgrad: bool = False


class AdamW(OptimizerBase):
    """Adam with decoupled weight decay (Loshchilov & Hutter): w <- w - lr * weight_decay * w."""

    kind: Literal["adamw"]
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    weight_decay: NonNegativeFloat = 0.01
    amsgrad: bool = False


class RMSprop(OptimizerBase):
    kind: Literal["rmsprop"]
    alpha: Fraction = 0.99
    eps: PositiveFloat = 1e-8
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    centered: bool = False


class Adagrad(OptimizerBase):
    kind: Literal["adagrad"]
    lr_decay: NonNegativeFloat = 0.0
    eps: PositiveFloat = 1e-10
    initial_accumulator_value: NonNegativeFloat = 0.0


OptimizerSpec = Annotated[Union[SGD, Adam, AdamW, RMSprop, Adagrad], Field(discriminator="kind")]

# ---------------------------------------------------------------------------------------
# Learning-rate schedules: a factor of each group's lr per optimizer step. With `warmup`,
# the factor rises linearly from `warmup_start` to 1 over that many steps, and the schedule
# proper runs over the remaining steps.


class ScheduleBase(StrictModel):
    warmup: NonNegativeInt = 0
    warmup_start: Fraction = 0.0


class ConstantSchedule(ScheduleBase):
    kind: Literal["constant"]


class StepSchedule(ScheduleBase):
    """lr * gamma ** (step // step_size)."""

    kind: Literal["step"]
    step_size: PositiveInt
    gamma: PositiveFloat = 0.1


class ExponentialSchedule(ScheduleBase):
    """lr * gamma ** step."""

    kind: Literal["exponential"]
    gamma: Annotated[float, Field(gt=0, le=1)]


class CosineSchedule(ScheduleBase):
    """Half a cosine from lr down to min_lr over the run."""

    kind: Literal["cosine"]
    min_lr: NonNegativeFloat = 0.0


class LinearSchedule(ScheduleBase):
    """A straight line from lr down to min_lr over the run."""

    kind: Literal["linear"]
    min_lr: NonNegativeFloat = 0.0


ScheduleSpec = Annotated[
    Union[ConstantSchedule, StepSchedule, ExponentialSchedule, CosineSchedule, LinearSchedule], Field(discriminator="kind")
]

# ---------------------------------------------------------------------------------------
# Evaluation, early stopping, checkpoints, logging

METRICS = ("accuracy", "precision", "recall", "f1", "perplexity", "mse")
CLASS_METRICS = ("accuracy", "precision", "recall", "f1")


class Eval(StrictModel):
    every: PositiveInt | None = None  # steps; default: after each epoch (or at the end of a run in steps)
    metrics: list[Literal["accuracy", "precision", "recall", "f1", "perplexity", "mse"]] = Field(default_factory=list)
    output: ScopedName | None = None  # the output metrics are computed on; default: the first loss's
    batch_size: PositiveInt | None = None  # default: the training batch size


class EarlyStopping(StrictModel):
    """Stop when the validation `metric` has not improved for `patience` evaluations."""

    metric: Literal["loss", "accuracy", "precision", "recall", "f1", "perplexity", "mse"] = "loss"
    patience: PositiveInt = 3
    min_delta: NonNegativeFloat = 0.0


class Checkpoint(StrictModel):
    every: PositiveInt | None = None  # steps; default: after each epoch and at the end


class Distributed(StrictModel):
    """How train.py runs under torchrun: `ddp` keeps a replica of the model in every process
    and averages gradients; `fsdp` shards parameters, gradients and optimizer state over the
    processes (backends/train_fsdp.py), for models that do not fit one device."""

    strategy: Literal["ddp", "fsdp"] = "ddp"


class Log(StrictModel):
    every: PositiveInt = 10  # steps between progress lines (and rows of metrics.csv)
    tensorboard: bool = False  # also write TensorBoard events when tensorboard is installed


# ---------------------------------------------------------------------------------------
# Activation checkpointing (lbdlc/checkpointing.py, docs/training.md): recompute repeated
# blocks in backward instead of keeping their activations.

CHECKPOINT_POLICIES = ("none", "all", "sqrt", "selective")
CHECKPOINT_TAGS = ("<policy>", "<budget>", "<blocks>")  # union members; never keys of the data


def _policy_name(value):
    if isinstance(value, str) and value not in CHECKPOINT_POLICIES:
        close = did_you_mean(value, CHECKPOINT_POLICIES)
        raise ValueError(f"unknown checkpointing policy '{value}'" + (f" ({close})" if close else "")
                         + ": choose none, all, sqrt, selective, a mapping {budget: 2GiB}, or a list of blocks")
    return value


def _size_bytes(value):
    """'2GiB', '500MB', '1.5e9' or a number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a text like 2GiB")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError("a size must be positive")
        return int(value)
    from ..memory import parse_size

    try:
        return parse_size(str(value))
    except SpecError:
        raise ValueError(f"'{value}' is not a size: write e.g. 2GiB, 500MB or a number of bytes") from None


class CheckpointBudget(StrictModel):
    """Recompute as few FLOPs as possible such that the predicted peak memory of a training
    step (weights, gradients, optimizer state, activations) fits `budget`."""

    budget: Annotated[int, BeforeValidator(_size_bytes, json_schema_input_type=Union[str, int])]
    # Symbolic dimensions for the prediction (e.g. {seq: 1024}); default: from `data`.
    sizes: dict[Identifier, PositiveInt] = Field(default_factory=dict)


def _checkpointing_member(value) -> str:
    if isinstance(value, (dict, CheckpointBudget)):
        return "<budget>"
    if isinstance(value, list):
        return "<blocks>"
    return "<policy>"


CheckpointingSpec = Annotated[
    Union[
        Annotated[Literal["none", "all", "sqrt", "selective"], BeforeValidator(_policy_name), Tag("<policy>")],
        Annotated[CheckpointBudget, Tag("<budget>")],
        Annotated[list[ScopedName], Field(min_length=1), Tag("<blocks>")],
    ],
    Discriminator(_checkpointing_member),
]


class TrainSpec(StrictModel):
    """How to train the model: data, objective, optimizer, schedule and run options."""

    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms(True) and friends
    data: DataSpec
    batch_size: PositiveInt  # samples per optimizer step, over all processes and accumulation steps
    epochs: PositiveInt | None = None
    steps: PositiveInt | None = None
    loss: LossSpec | None = None
    losses: list[LossSpec] | None = Field(None, min_length=1)  # a weighted sum
    optimizer: OptimizerSpec
    schedule: ScheduleSpec | None = None  # default constant
    clip_grad_norm: PositiveFloat | None = None
    grad_accumulation: PositiveInt = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False  # torch.compile the model
    eval: Eval | None = None
    early_stopping: EarlyStopping | None = None
    checkpoint: Checkpoint | None = None
    log: Log = Log()
    # DistributedDataParallel(find_unused_parameters=...): default true exactly when some
    # trainable parameter cannot reach a loss (lbdlc/training/special.py).
    find_unused_parameters: bool | None = None
    distributed: Distributed = Distributed()  # ddp | fsdp under torchrun (backends/train_fsdp.py)
    checkpointing: CheckpointingSpec = "none"  # recompute repeated blocks in backward (lbdlc/checkpointing.py)

    def loss_list(self) -> list:
        return list(self.losses) if self.losses is not None else [self.loss] if self.loss is not None else []


# ---------------------------------------------------------------------------------------
# Errors at YAML positions. Pydantic's error paths name the selected `kind` of a union
# (`train.loss.cross_entropy.beta`); the data has no such key, so those parts are dropped.


def _data_path(raw, path: tuple) -> tuple:
    node, out = raw, []
    for part in path:
        if isinstance(node, dict) and part not in node and node.get("kind") == part:
            continue
        if part in CHECKPOINT_TAGS:  # a member of `checkpointing`'s union, not a key
            continue
        out.append(part)
        if isinstance(node, LocDict) and part in node:
            node = node[part]
        elif isinstance(node, LocList) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            node = None
    return tuple(out)


def _kind(model) -> str | None:
    return literal_tag(model, "kind")


def union_members(t) -> list[type[BaseModel]]:
    """The models of a `kind`-selected union annotation."""
    t = _strip(t)
    return [m for m in typing.get_args(t) if _kind(m)]


def _model_at(path: tuple):
    """The model (or union of models) reached by a Pydantic error path below `train`."""
    return model_at(TrainSpec, path, lambda members, part: next(
        (m for m in members if _kind(m) == part or any(getattr(x, "tag", None) == part for x in getattr(m, "__metadata__", ()))), None))


def _kinds_of(path: tuple) -> list[str]:
    return [_kind(m) for m in union_members(_model_at(path) or type(None))]


def located_error(err: dict, raw) -> SpecError:
    """A Pydantic error inside `train:` as a SpecError at its YAML position."""
    path, kind, msg = tuple(err["loc"]), err["type"], err["msg"]
    data_path = _data_path(raw, path)
    if kind == "extra_forbidden":
        key = data_path[-1]
        model = _model_at(path[1:-1])
        allowed = [n for n in model.model_fields] if isinstance(model, type) and issubclass(model, BaseModel) else []
        hint = did_you_mean(key, allowed) or (f"allowed keys here: {', '.join(allowed)}" if allowed else None)
        if key == "weight_decay" and _kind(model) in ("sgd", "adam", "rmsprop", "adagrad"):
            hint = (f"{_kind(model)} has no decoupled weight decay: write `l2: ...` for an L2 penalty in the loss, "
                    "or use `kind: adamw` for decoupled weight decay")
        where = f" in {_where(data_path[:-1], raw)}" if len(data_path) > 1 else ""
        return SpecError(f"unknown key '{key}'{where}", key_loc(raw, data_path) or loc_of(raw, data_path), hint)
    if kind == "missing":
        return SpecError(f"missing required key '{data_path[-1]}' in {_where(data_path[:-1], raw)}", loc_of(raw, data_path[:-1]))
    if kind == "union_tag_invalid":
        tag, kinds = err["ctx"]["tag"], _kinds_of(path[1:])
        return SpecError(f"unknown {_section(data_path)} kind '{tag}'", loc_of(raw, data_path + ("kind",)),
                         hint=did_you_mean(tag, kinds) or f"choose from {', '.join(kinds)}")
    if kind == "union_tag_not_found":
        kinds = _kinds_of(path[1:])
        return SpecError(f"{_where(data_path, raw)} needs a `kind`", loc_of(raw, data_path),
                         hint=f"e.g. `{{kind: {kinds[0]}, ...}}`; kinds: {', '.join(kinds)}" if kinds else None)
    if kind == "model_type" or kind == "model_attributes_type":
        return SpecError(f"{_where(data_path, raw)} is a mapping of options", loc_of(raw, data_path),
                         hint="e.g. `optimizer: {kind: adam, lr: 1e-3}`")
    value = node_at(raw, data_path)
    shown = f", got {value!r}" if value is not None and not isinstance(value, (dict, list)) else ""
    message = msg[len("Value error, "):] if msg.startswith("Value error, ") else msg
    name = next((str(p) for p in reversed(data_path) if not isinstance(p, int)), "train")
    return SpecError(f"{name}: {message[0].lower()}{message[1:]}{shown}", loc_of(raw, data_path))


def _section(data_path: tuple) -> str:
    names = [p for p in data_path if isinstance(p, str)]
    section = names[-1] if names else "train"
    return {"losses": "loss", "data": "data source"}.get(section, section)


def _where(data_path: tuple, raw) -> str:
    return "`" + ".".join(str(p) for p in data_path) + "`"


def allowed_unwritten(node, raw) -> list[str]:
    """Keys `--set` may add to a mapping inside `train:` (its model's fields)."""
    train = raw.get("train") if isinstance(raw, dict) else None
    if not isinstance(train, LocDict):
        return []
    path = _find(train, node, ())
    if path is None:
        return []
    model = TrainSpec
    cur = train
    for part in path:
        model = _model_at_data(model, cur, part)
        cur = cur[part]
        if model is None:
            return []
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _find(cur, target, path):
    if cur is target:
        return path
    if isinstance(cur, dict):
        items = cur.items()
    elif isinstance(cur, list):
        items = enumerate(cur)
    else:
        return None
    for k, v in items:
        found = _find(v, target, path + (k,))
        if found is not None:
            return found
    return None


def _model_at_data(model, cur, part):
    """Follow one data key from `model` (a model or container annotation)."""
    model = _strip(model)
    if isinstance(model, type) and issubclass(model, BaseModel):
        field = model.model_fields.get(part)
        if field is None:
            return None
        t = _strip(field.annotation)
        child = cur[part]
        members = union_members(t)
        if members and isinstance(child, dict):
            return next((m for m in members if _kind(m) == child.get("kind")), None)
        return t
    origin, args = typing.get_origin(model), typing.get_args(model)
    if origin is list:
        t = _strip(args[0])
        members = union_members(t)
        child = cur[part]
        if members and isinstance(child, dict):
            return next((m for m in members if _kind(m) == child.get("kind")), None)
        return t
    if origin is dict:
        return _strip(args[1])
    return None


# ---------------------------------------------------------------------------------------
# JSON Schema (for editors, `lbdlc schema`): the models above, where any value may also be
# written as an expression (`lr: "${base_lr / 10}"`), as everywhere in a spec.


def json_schema(defs: dict, expression: dict) -> dict:
    """The schema of `train:`; its definitions go into `defs` as Train<Model>."""
    schema = TrainSpec.model_json_schema(ref_template="#/$defs/Train{model}")
    for name, d in schema.pop("$defs", {}).items():
        defs[f"Train{name}"] = _with_expressions(d, expression)
    return {"anyOf": [_with_expressions(schema, expression), {"type": "null"}], "description": TrainSpec.__doc__}


def _with_expressions(schema: dict, expression: dict) -> dict:
    if "properties" in schema:
        schema["properties"] = {k: v if k == "kind" else {"anyOf": [v, expression], **({"default": v["default"]} if "default" in v else {})}
                                for k, v in schema["properties"].items()}
    return schema
