"""Training memory, predicted from the IR alone (nothing is allocated).

For a batch size, values of the other symbolic dimensions (`seq`), a precision, an
optimizer and a device type, `estimate(graph, config)` gives the bytes of

- weights (parameters and buffers), gradients (trainable parameters), optimizer state
  (Adam/AdamW: 2 per trainable value, +1 with amsgrad; SGD: 1 with momentum, else 0;
  RMSprop: 1, +1 with momentum, +1 centered; Adagrad: 1; plus a 4-byte step counter per
  tensor for the adaptive ones);
- activations saved for backward, per layer, as PyTorch's autograd saves them for the code
  the PyTorch backend generates (`SAVES` below says what each op keeps), counted once per
  storage: a tensor two layers save counts once, a view counts as its base;
- the peak of one training step: the largest of (weights + optimizer state + gradients
  computed so far + activations still saved + the current op's transient) over a walk of
  the forward and backward passes, and of the optimizer step.

With a checkpointing plan (`lbdlc.checkpointing`), a recomputed segment keeps only its
inputs through the forward pass (what `torch.utils.checkpoint(..., use_reentrant=False)`
stores); in backward its activations come back for the time of its own backward.

Mixed precision (`bf16`, `fp16`: autocast): outputs of matmul-like ops (linear, conv,
attention, matmul) are 2-byte, their float32 inputs are saved as 2-byte copies (attention:
one per projection), so are their weight matrices; on CUDA the ops autocast runs in float32
(norms, softmax) give 4-byte outputs; other ops keep their input's width (float32 wins a
mix). Weights, gradients and optimizer state stay float32. Measured under CPU bf16 autocast
this is exact on lenet, resnet50 and gpt2; fp16 and CUDA follow the same rules unmeasured.

Device rules differ in a few places: dropout saves a float mask on CPU and a bool mask on
CUDA; attention with dropout runs PyTorch's math path on CPU (the weights and masks are
saved) and the fused kernel on CUDA. The CPU rules are calibrated against
`measure_saved` (tests/test_memory.py); the CUDA rules follow PyTorch's kernels and are
not measured by this project's tests.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from . import ops
from .errors import SpecError
from .ir import Graph, Node, Value

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4, "bool": 1, "uint8": 1, "int8": 1}
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class OptimizerInfo:
    kind: str = "adam"
    momentum: float = 0.0
    centered: bool = False
    amsgrad: bool = False

    @property
    def states(self) -> int:
        """Float tensors the optimizer keeps per trainable parameter."""
        if self.kind in ("adam", "adamw"):
            return 2 + int(self.amsgrad)
        if self.kind == "sgd":
            return int(self.momentum > 0)
        if self.kind == "rmsprop":
            return 1 + int(self.momentum > 0) + int(self.centered)
        if self.kind == "adagrad":
            return 1
        raise ValueError(self.kind)

    @property
    def step_counter(self) -> bool:  # Adam, AdamW, RMSprop, Adagrad keep `step` as a 4-byte tensor
        return self.kind in ("adam", "adamw", "rmsprop", "adagrad")

    @classmethod
    def of(cls, spec) -> OptimizerInfo:
        """From a `train.optimizer` model (lbdlc.training.schema)."""
        return cls(spec.kind, getattr(spec, "momentum", 0.0), getattr(spec, "centered", False), getattr(spec, "amsgrad", False))


@dataclass(frozen=True)
class MemoryConfig:
    batch: int
    sizes: tuple[tuple[str, int], ...] = ()  # other symbolic dimensions: (("seq", 128),)
    precision: str = "fp32"
    optimizer: OptimizerInfo = OptimizerInfo()
    device: str = "cuda"
    dropout: bool = True  # dropout active (training mode)

    def symbols(self) -> dict[str, int]:
        return {"batch": self.batch, **dict(self.sizes)}


def parse_size(text: str) -> int:
    """'24GiB', '500MB', '2e9' -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    t = text.strip().lower().replace(" ", "")
    number = t.rstrip("kmgtib")
    try:
        return int(float(number) * units[t[len(number):]])
    except (ValueError, KeyError):
        raise SpecError(f"'{text}' is not a size", hint="e.g. 24GiB, 500MB or a number of bytes") from None


def human_size(n: float) -> str:
    """Bytes for people: 1.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


# ---------------------------------------------------------------------------------------
# What autograd saves. A rule returns references: ("in", k) the storage of input k, ("out", k)
# that of output k, ("new", tag, elements, bytes per element) a tensor the op makes inside.


class _Ctx:
    def __init__(self, config: MemoryConfig, node: Node, numel: Callable[[Value], int], width: Callable[[Value], int]):
        self.config, self.node, self.numel, self.width = config, node, numel, width

    @property
    def cpu(self) -> bool:
        return self.config.device == "cpu"

    @property
    def half(self) -> bool:
        return self.config.precision != "fp32"

    def value(self, d) -> int:
        """A dimension at this configuration."""
        if isinstance(d, int):
            return d
        symbols = self.config.symbols()
        return int(d.subs({s: symbols[str(s)] for s in d.free_symbols}))

    def act(self) -> int:  # bytes per element of a float activation the op makes
        return 2 if self.half else 4

    def n_in(self, k: int = 0) -> int:
        return self.numel(self.node.inputs[k])

    def n_out(self, k: int = 0) -> int:
        return self.numel(self.node.outputs[k])


def _inputs(*ks):
    return lambda c: [("in", k) for k in ks]


def _output(c):
    return [("out", 0)]


def _nothing(c):
    return []


def _norm_stats(c, rows: int):
    return [("new", "mean", rows, 4), ("new", "rstd", rows, 4)]


def _layer_norm(c):
    shape = c.node.attrs.normalized_shape
    inner = 1
    for d in (shape if isinstance(shape, (list, tuple)) else [shape]):
        inner *= d
    return [("in", 0)] + _norm_stats(c, c.n_in() // inner)


def _rms_norm(c):
    shape = c.node.attrs.normalized_shape
    inner = 1
    for d in (shape if isinstance(shape, (list, tuple)) else [shape]):
        inner *= d
    rows = c.n_in() // inner
    # CPU: the composite (x * rstd, then * weight) keeps the normalised x; CUDA's fused kernel only rstd.
    extra = [("new", "normalized", c.n_in(), c.width(c.node.inputs[0]))] if c.cpu else []
    return [("in", 0), ("new", "rstd", rows, 4)] + extra


def _batch_norm(c):
    return [("in", 0)] + _norm_stats(c, c.node.attrs.num_features)


def _group_norm(c):
    return [("in", 0)] + _norm_stats(c, _batch(c, c.node.inputs[0]) * c.node.attrs.num_groups)


def _instance_norm(c):
    shape = c.node.inputs[0].type.shape
    rows = c.n_in() // max(1, _spatial(c, shape))
    return [("in", 0)] + _norm_stats(c, rows)


def _spatial(c, shape) -> int:
    n = 1
    for d in shape[2:]:
        n *= d if isinstance(d, int) else c.value(d)
    return n


def _dropout_mask(c, elements: int, width: int):
    if not c.config.dropout:
        return []
    return [("new", "mask", elements, width if c.cpu else 1)]  # CPU: x * mask (float); CUDA: a bool mask


def _dropout(c):
    if c.node.attrs.p == 0:
        return []
    return _dropout_mask(c, c.n_in(), c.width(c.node.inputs[0]))


def _max_pool(c):
    return [("in", 0), ("new", "indices", c.n_out(), 8)]


def _adaptive_avg_pool(c):
    size = c.node.attrs.output_size
    return [] if size in (1, (1, 1), [1, 1]) else [("in", 0)]


def _attention(c):
    """The generated MultiHeadAttention: q/k/v projections, F.scaled_dot_product_attention, out_proj."""
    a, node = c.node.attrs, c.node
    q_rows = c.n_in(0) // a.embed_dim  # batch * seq
    kv = node.inputs[-1]
    kv_rows = c.numel(kv) // a.embed_dim
    seq_q = q_rows // _batch(c, node.inputs[0])
    seq_kv = kv_rows // _batch(c, kv)
    batch = q_rows // seq_q
    act = c.act()
    refs = [("in", 0)] + ([("in", 1)] if len(node.inputs) == 2 else [])
    if c.half:  # autocast casts the input for each projection that reads it (q; k and v)
        refs = []
        for k, proj in [(0, "q"), (len(node.inputs) - 1, "k"), (len(node.inputs) - 1, "v")]:
            v = node.inputs[k]
            refs.append(("new", f"in{k}@16:{proj}", c.numel(v), 2) if c.width(v) == 4 else ("in", k))
    weights = batch * a.heads * seq_q * seq_kv  # elements of the attention matrix
    if a.dropout and c.config.dropout and c.cpu:
        # CPU math path (in float32, also under autocast): q and k scaled by sqrt(scale) (copies),
        # v, the softmax, its dropout mask and the dropped weights; the output comes back as a
        # copy for out_proj.
        refs += [("new", "q_scaled", q_rows * a.embed_dim, 4), ("new", "k_scaled", kv_rows * a.embed_dim, 4),
                 ("new", "v", kv_rows * a.embed_dim, 4),
                 ("new", "softmax", weights, 4), ("new", "mask", weights, 4), ("new", "dropped", weights, 4),
                 ("new", "y", q_rows * a.embed_dim, act)]
    else:
        # Fused kernel (flash on CPU and for 16-bit CUDA, memory-efficient for fp32 CUDA): q, k, v,
        # the output (laid out so that out_proj reads it as a view) and the log-sum-exp per row.
        lse_rows = seq_q if c.cpu or c.half else -(-seq_q // 32) * 32
        refs += [("new", "q", q_rows * a.embed_dim, act), ("new", "k", kv_rows * a.embed_dim, act),
                 ("new", "v", kv_rows * a.embed_dim, act), ("new", "y", q_rows * a.embed_dim, act),
                 ("new", "logsumexp", batch * a.heads * lse_rows, 4)]
    return refs


def _inner_grads(c) -> int:
    """Gradients an op's backward makes inside it, beyond those of its inputs."""
    node = c.node
    if node.op != "attention":
        return 0
    a, act = node.attrs, c.act()
    q, kv = c.n_in(0), c.numel(node.inputs[-1])
    extra = q + 2 * kv  # of q, k, v
    if a.dropout and c.config.dropout and c.cpu:  # the math path: of the weights, before and after dropout
        seq_q = q // a.embed_dim // _batch(c, node.inputs[0])
        seq_kv = kv // a.embed_dim // _batch(c, node.inputs[-1])
        extra += 2 * _batch(c, node.inputs[0]) * a.heads * seq_q * seq_kv
    return extra * act


def _batch(c, v: Value) -> int:
    d = v.type.shape[0]
    return d if isinstance(d, int) else c.value(d)


def _dim(c, v: Value, k: int) -> int:
    d = v.type.shape[k]
    return d if isinstance(d, int) else c.value(d)


def _sdpa(c):
    a, node = c.node.attrs, c.node
    q, k = node.inputs[0], node.inputs[1]
    rows_q = c.numel(q) // q.type.shape[-1]
    seq_q = q.type.shape[-2]
    seq_q = seq_q if isinstance(seq_q, int) else c.value(seq_q)
    seq_k = k.type.shape[-2]
    seq_k = seq_k if isinstance(seq_k, int) else c.value(seq_k)
    weights = rows_q // seq_q * seq_q * seq_k
    act = c.act()
    if a.dropout and c.config.dropout and c.cpu:
        return [("new", "q_scaled", c.numel(q), act), ("new", "k_scaled", c.numel(k), act), ("in", 2),
                ("new", "softmax", weights, act), ("new", "mask", weights, act), ("new", "dropped", weights, act)]
    return [("in", 0), ("in", 1), ("in", 2), ("out", 0), ("new", "logsumexp", rows_q, 4)]


def _lora_linear(c):
    a = c.node.attrs
    rows = c.n_in() // a.in_features
    refs = [("new", "a_out", rows * a.r, c.act())]
    if a.dropout and c.config.dropout:
        return refs + _dropout_mask(c, c.n_in(), c.width(c.node.inputs[0])) + [("new", "dropped", c.n_in(), c.width(c.node.inputs[0]))]
    return refs + [("in", 0)]


def _linear_q(c):
    a = c.node.attrs
    return [("in", 0), ("new", "weight", a.in_features * a.out_features, 4)]


def _graph_conv(c):
    return [("in", 0), ("in", 1), ("new", "xw", c.n_out(), c.act())]


def _recurrent(c):
    """nn.RNN/LSTM/GRU (an approximation): input, output, and per layer and direction the
    gate pre-activations and hidden states of every step."""
    a = c.node.attrs
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[c.node.op]
    dirs = 2 if a.bidirectional else 1
    steps_batch = c.n_in() // a.input_size
    per_layer = steps_batch * a.hidden_size * dirs * (gates + 2)
    return [("in", 0), ("out", 0), ("new", "workspace", per_layer * a.num_layers, 4)]


def _reparameterize(c):
    return [("new", "std", c.n_out(), c.act()), ("new", "eps", c.n_out(), c.act())]


def _fused(c):
    """fused_linear / fused_conv2d: the layer keeps its input, the activation what it keeps alone."""
    from .ops.fused import activation_node

    refs = [("in", 0)]
    act = activation_node(c.node)
    if act is None:
        return refs
    if act.op in ("relu", "sigmoid", "tanh"):
        return refs + [("out", 0)]
    return refs + [("new", "pre_activation", c.n_out(), c.act())]


SAVES: dict[str, Callable] = {
    "linear": _inputs(0), "conv1d": _inputs(0), "conv2d": _inputs(0),
    "conv_transpose1d": _inputs(0), "conv_transpose2d": _inputs(0),
    "fused_linear": _fused, "fused_conv2d": _fused,
    "linear_q": _linear_q, "lora_linear": _lora_linear, "graph_conv": _graph_conv,
    "relu": _output, "sigmoid": _output, "tanh": _output, "softmax": _output, "log_softmax": _output,
    "gelu": _inputs(0), "silu": _inputs(0), "leaky_relu": _inputs(0), "softplus": _inputs(0), "relu6": _inputs(0),
    "quick_gelu": lambda c: [("in", 0), ("new", "sigmoid", c.n_in(), c.width(c.node.inputs[0]))],
    "mul": _inputs(0, 1), "matmul": _inputs(0, 1),
    "layer_norm": _layer_norm, "rms_norm": _rms_norm, "batch_norm": _batch_norm,
    "group_norm": _group_norm, "instance_norm": _instance_norm,
    "l2_normalize": lambda c: [("in", 0), ("new", "norm", c.n_in() // _dim(c, c.node.inputs[0], c.node.attrs.dim), 4)],
    "dropout": _dropout,
    "max_pool1d": _max_pool, "max_pool2d": _max_pool,
    "avg_pool1d": _inputs(0), "avg_pool2d": _inputs(0), "adaptive_avg_pool2d": _adaptive_avg_pool,
    "embedding": _inputs(0),
    "attention": _attention, "scaled_dot_product_attention": _sdpa,
    "learned_scale": _inputs(0), "reparameterize": _reparameterize,
    "select_at": lambda c: [("new", "rows", _batch(c, c.node.inputs[0]), 8)],
    "rnn": _recurrent, "lstm": _recurrent, "gru": _recurrent,
}
# Ops whose backward needs nothing kept (sums, concatenations, views, shape-only ops, constants).
for _op in ("add", "concat", "reshape", "flatten", "transpose", "permute", "select", "slice", "split", "mean",
            "global_avg_pool2d", "upsample", "position_embedding", "sinusoidal_position", "cls_token",
            "argmax", "timestep_embedding"):
    SAVES[_op] = _nothing
# Arithmetic primitives (tests/specs/primitive_ops.yaml): what their backward formulas read.
SAVES.update({
    "sub": _nothing, "affine": _nothing,  # scalar scale and shift: nothing kept
    "div": _inputs(0, 1), "pow": _inputs(0), "erf": _inputs(0),
    "sqrt": _output, "rsqrt": _output,
    "embedding_q": _nothing,  # frozen packed buffers: no gradient
})
# QLoRA (lora_linear_q): LoRA's adapter path, and the dequantized base weight as linear_q keeps it.
SAVES["lora_linear_q"] = lambda c: _lora_linear(c) + [("new", "weight", c.node.attrs.in_features * c.node.attrs.out_features, 4)]


# What selective recomputation keeps of an op (checkpointing `selective`: the generated
# policy saves the outputs of matrix products, convolutions and attention kernels, and
# recomputes everything else): the outputs of those kernels inside the op.
def _cached_attention(c):
    return [r for r in _attention(c) if r[0] == "new" and r[1] in ("q", "k", "v", "y", "logsumexp", "softmax", "dropped")] + [("out", 0)]


def _cached_pre_activation(c):  # the product before the activation (a separate tensor)
    from .ops.fused import activation_node

    return [("out", 0)] if activation_node(c.node) is None else [("new", "pre_activation", c.n_out(), c.act())]


CACHED: dict[str, Callable] = {
    "linear": _output, "conv1d": _output, "conv2d": _output, "conv_transpose1d": _output, "conv_transpose2d": _output,
    "matmul": _output, "lora_linear": _output, "linear_q": _output, "lora_linear_q": _output, "graph_conv": _output,
    "fused_linear": _cached_pre_activation, "fused_conv2d": _cached_pre_activation,
    "attention": _cached_attention, "scaled_dot_product_attention": lambda c: [("out", 0), ("new", "logsumexp", c.n_out() // c.node.outputs[0].type.shape[-1], 4)],
}

# Outputs that alias their input's storage (views), and ops that autocast runs in 16 bits / float32.
VIEWS = {"reshape", "flatten", "transpose", "permute", "select", "slice", "split"}
NON_CONTIGUOUS = {"transpose", "permute"}
HALF_OPS = {"linear", "conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d", "fused_linear", "fused_conv2d",
            "matmul", "attention", "scaled_dot_product_attention", "lora_linear", "linear_q", "lora_linear_q", "graph_conv",
            "rnn", "lstm", "gru"}
# Ops whose output is float32 under autocast: CUDA's float32 list, and (both devices) ops
# whose output comes from float32 parameters; on the CPU other ops keep their input's width.
FLOAT32_OPS = {"layer_norm", "group_norm", "rms_norm", "softmax", "log_softmax", "softplus", "l2_normalize"}
FLOAT32_PARAM_OPS = {"embedding", "position_embedding", "sinusoidal_position", "timestep_embedding"}


# ---------------------------------------------------------------------------------------
# Storages, and what each node saves


@dataclass
class Analysis:
    """Per-node facts the estimate and the planner share (at one configuration)."""

    config: MemoryConfig
    saves: dict[str, list[tuple[str, int]]]  # node name -> [(storage key, bytes)] it keeps
    out_bytes: dict[str, int]  # node name -> bytes of its outputs
    in_bytes: dict[str, int]  # node name -> bytes of its float inputs
    flops: dict[str, int]  # node name -> forward FLOPs at this configuration
    grads: dict[str, int]  # node name -> bytes of gradients of the trainable parameters it owns
    storage: dict[int, tuple[str, int]]  # id(value) -> its storage (key, bytes)
    trainable: dict[str, bool]  # parameter name -> trainable
    grad_bytes: dict[str, int] = field(default_factory=dict)  # node name -> gradients live while its backward runs
    cached: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # node name -> what selective recomputation keeps


def _value_numel(v: Value, symbols: dict[str, int]) -> int:
    n = 1
    for d in v.type.shape:
        if isinstance(d, int):
            n *= d
            continue
        missing = sorted(str(s) for s in d.free_symbols if str(s) not in symbols)
        if missing:
            raise SpecError(
                f"the memory estimate needs a value for the dimension '{missing[0]}' (in {v.name}: {v.type})",
                hint=f"give it on the command line: --{missing[0]} N" if missing[0] in ("batch", "seq")
                else f"--size {missing[0]}=N",
            )
        n *= int(d.subs({s: symbols[str(s)] for s in d.free_symbols}))
    return n


def trainable_params(graph: Graph) -> dict[str, bool]:
    """Parameter name -> trainable (buffers and LoRA's frozen base weights are not)."""
    out = {name: not p.buffer for name, p in graph.params.items()}
    for n in graph.nodes:
        if n.op in ("lora_linear", "lora_linear_q"):  # the frozen base (lora_linear_q's is buffers, and the bias)
            for local in ("weight", "bias"):
                if local in n.params:
                    out[n.params[local]] = False
    for name in getattr(graph, "frozen", ()):  # a fine-tune's `freeze:` (lbdlc/finetune.py's training_graph)
        out[name] = False
    return out


def analyse(graph: Graph, config: MemoryConfig) -> Analysis:
    if config.precision not in PRECISIONS:
        raise SpecError(f"unknown precision '{config.precision}'", hint=f"choose from {', '.join(PRECISIONS)}")
    if config.device not in DEVICES:
        raise SpecError(f"unknown device type '{config.device}'", hint=f"choose from {', '.join(DEVICES)}")
    symbols = config.symbols()
    numel: dict[int, int] = {}
    width: dict[int, int] = {}  # bytes per element as the generated module holds the value
    storage: dict[int, tuple[str, int]] = {}
    contiguous: dict[int, bool] = {}
    grad: dict[int, bool] = {}
    half = config.precision != "fp32"
    float32_ops = FLOAT32_PARAM_OPS | (FLOAT32_OPS if config.device == "cuda" else set())
    trainable = trainable_params(graph)

    def num(v: Value) -> int:
        if id(v) not in numel:
            numel[id(v)] = _value_numel(v, symbols)
        return numel[id(v)]

    for v in graph.inputs:
        width[id(v)] = DTYPE_BYTES.get(v.type.dtype, 4)
        storage[id(v)] = (v.name, num(v) * width[id(v)])
        contiguous[id(v)], grad[id(v)] = True, False

    saves: dict[str, list[tuple[str, int]]] = {}
    cached: dict[str, list[tuple[str, int]]] = {}
    out_bytes, in_bytes, flops, grads, grad_bytes = {}, {}, {}, {}, {}
    for node in graph.nodes:
        if node.op not in SAVES:
            raise SpecError(f"the memory estimate has no rule for op '{node.op}'", node.origin)
        float_in = [v for v in node.inputs if v.type.dtype.startswith(("float", "bfloat"))]
        for k, v in enumerate(node.outputs):
            if not v.type.dtype.startswith(("float", "bfloat")):
                w = DTYPE_BYTES.get(v.type.dtype, 4)
            elif half and node.op in HALF_OPS:
                w = 2
            elif half and node.op in float32_ops:
                w = 4
            elif float_in:
                w = max(width[id(u)] for u in float_in)
            else:
                w = 2 if half and node.op not in float32_ops else 4
            width[id(v)] = w
            src = node.inputs[0] if node.inputs else None
            leading = node.op in ("select", "slice", "split") and node.attrs.dim % src.type.rank == 0 if src is not None else False
            identity = node.op == "dropout" and (node.attrs.p == 0 or not config.dropout)  # returns its input
            if identity or node.op in VIEWS and (contiguous[id(src)] or node.op not in ("reshape", "flatten")):
                storage[id(v)] = storage[id(src)]  # a view of its input
                contiguous[id(v)] = contiguous[id(src)] and (identity or node.op in ("reshape", "flatten") or leading)
            else:  # a new tensor (reshape of a non-contiguous tensor copies)
                storage[id(v)] = (f"{node.name}:{k}", num(v) * w)
                contiguous[id(v)] = True
            has_params = any(trainable.get(p, False) for p in node.params.values())
            grad[id(v)] = v.type.dtype.startswith(("float", "bfloat")) and (has_params or any(grad[id(u)] for u in node.inputs))
        ctx = _Ctx(config, node, num, lambda v: width[id(v)])
        kept: list[tuple[str, int]] = []

        def resolve(refs, node=node) -> list[tuple[str, int]]:  # ("in", k) / ("out", k) / ("new", tag, elements, width) -> storages
            out = []
            for ref in refs:
                if ref[0] == "in":
                    v = node.inputs[ref[1]]
                    if half and node.op in HALF_OPS and width[id(v)] == 4 and v.type.dtype == "float32":
                        out.append((f"{node.name}:in{ref[1]}@16", num(v) * 2))  # autocast's 16-bit copy
                    else:
                        out.append(storage[id(v)])
                elif ref[0] == "out":
                    out.append(storage[id(node.outputs[ref[1]])])
                else:
                    _, tag, elements, per = ref
                    out.append((f"{node.name}:{tag}", elements * per))
            return out

        needs_grad = any(grad[id(u)] for u in node.inputs) or any(trainable.get(p, False) for p in node.params.values())
        cached[node.name] = resolve(CACHED[node.op](ctx)) if node.op in CACHED else []
        if needs_grad:
            kept += resolve(SAVES[node.op](ctx))
            if half and node.op in HALF_OPS:  # autocast's 16-bit copies of the weight matrices
                for full in node.params.values():
                    prm = graph.params[full]
                    if len(prm.shape) >= 2 and prm.dtype == "float32":
                        kept.append((f"{full}@16", prm.numel * 2))
        saves[node.name] = kept
        out_bytes[node.name] = sum(num(v) * width[id(v)] for v in node.outputs)
        in_bytes[node.name] = sum(num(v) * width[id(v)] for v in float_in)
        # Backward through the node holds the gradient of its outputs and makes those of its
        # inputs (an attention layer also those of q, k, v and, on the math path, of its weights).
        grad_bytes[node.name] = out_bytes[node.name] + sum(num(v) * width[id(v)] for v in float_in if grad[id(v)]) \
            + _inner_grads(ctx)
        op = ops.get(node.op)
        f = op.flops(node.attrs, [v.type for v in node.inputs], [v.type for v in node.outputs])
        flops[node.name] = f if isinstance(f, int) else int(f.subs({s: symbols.get(str(s), 1) for s in f.free_symbols}))
        grads[node.name] = 0
    owner: dict[str, str] = {}  # parameter -> the last node using it: its gradient is complete there... first in backward
    for node in graph.nodes:
        for p in node.params.values():
            owner[p] = node.name
    for p, name in owner.items():
        if trainable.get(p):
            prm = graph.params[p]
            grads[name] += prm.numel * DTYPE_BYTES.get(prm.dtype, 4)
    # Gradients of values that skip over a node (the residual stream) wait while it runs backward.
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    last_use: dict[int, int] = {}
    for i, n in enumerate(graph.nodes):
        for v in n.inputs:
            last_use[id(v)] = i
    for v in graph.outputs:
        last_use[id(v)] = len(graph.nodes)  # read by the loss
    crossing = [0] * (len(graph.nodes) + 1)
    for n in graph.nodes:
        for v in n.outputs:
            first, last = index[id(n)] + 1, last_use.get(id(v), 0)
            if grad.get(id(v)) and last > first:
                crossing[first] += num(v) * width[id(v)]
                crossing[last] -= num(v) * width[id(v)]
    running = 0
    for i, n in enumerate(graph.nodes):
        running += crossing[i]
        grad_bytes[n.name] += running
    return Analysis(config, saves, out_bytes, in_bytes, flops, grads, storage, trainable, grad_bytes, cached)


# ---------------------------------------------------------------------------------------
# The estimate


@dataclass
class LayerMemory:
    name: str
    op: str
    saved: int  # bytes this layer is the first to keep for backward
    recomputed: bool  # in a checkpointed segment: kept only while its segment's backward runs
    line: int | None


@dataclass
class MemoryReport:
    name: str
    config: MemoryConfig
    weights: int  # parameters and buffers
    grads: int
    optimizer: int
    activations: int  # saved for backward at the end of the forward pass (the model, not the loss)
    loss: int  # what the loss keeps for backward (approximate; see loss_bytes)
    peak: int
    peak_at: str  # where the peak happens
    layers: list[LayerMemory]
    trainable: int  # trainable parameter count
    checkpointing: object = None  # lbdlc.checkpointing.Plan, if any
    without_checkpointing: int | None = None  # activations with no checkpointing (when a plan is set)

    def fits(self, limit: int) -> bool:
        return self.peak <= limit

    def to_json(self) -> dict:
        c = self.config
        return {
            "name": self.name,
            "batch": c.batch,
            "sizes": dict(c.sizes),
            "precision": c.precision,
            "device": c.device,
            "optimizer": {"kind": c.optimizer.kind, "states_per_param": c.optimizer.states},
            "trainable_params": self.trainable,
            "bytes": {"weights": self.weights, "grads": self.grads, "optimizer": self.optimizer,
                      "activations": self.activations, "loss": self.loss, "peak": self.peak},
            "peak_at": self.peak_at,
            "layers": [vars(layer) for layer in self.layers],
            "checkpointing": self.checkpointing.to_json() if self.checkpointing is not None else None,
        }


@dataclass
class _Unit:
    """A plain node, or a checkpointed segment, in forward order."""

    name: str
    nodes: list[Node]
    inputs: list[Value] = field(default_factory=list)  # a segment's inputs (what checkpoint keeps)
    segment: bool = False
    selective: bool = False  # a segment recomputed selectively (keeps what `Analysis.cached` says)


def _units(graph: Graph, segments) -> list[_Unit]:
    by_start = {id(s.nodes[0]): s for s in segments or []}
    units, i = [], 0
    while i < len(graph.nodes):
        s = by_start.get(id(graph.nodes[i]))
        if s is None:
            units.append(_Unit(graph.nodes[i].name, [graph.nodes[i]]))
            i += 1
        else:
            units.append(_Unit(s.name, list(s.nodes), list(s.inputs), True, getattr(s, "selective", False)))
            i += len(s.nodes)
    return units


def saved_bytes(a: Analysis, graph: Graph, segments=None) -> int:
    """Activation bytes kept at the end of the forward pass, with `segments` recomputed."""
    keys: dict[str, int] = {}
    for u in _units(graph, segments):
        for key, b in _kept(a, u):
            keys.setdefault(key, b)
    return sum(keys.values())


def _kept(a: Analysis, u: _Unit) -> list[tuple[str, int]]:
    if u.segment:
        inputs = [a.storage[id(v)] for v in u.inputs]
        return inputs + [kb for n in u.nodes for kb in a.cached[n.name]] if u.selective else inputs
    return a.saves[u.nodes[0].name]


def _internal(a: Analysis, u: _Unit, outside: set[str]) -> int:
    keys: dict[str, int] = {}
    for n in u.nodes:
        for key, b in a.saves[n.name]:
            if key not in outside:
                keys.setdefault(key, b)
    return sum(keys.values())


def _transient(a: Analysis, nodes: list[Node]) -> int:
    return max((a.grad_bytes[n.name] for n in nodes), default=0)


def timeline_peak(a: Analysis, graph: Graph, segments, persistent: int, grads_total: int, optimizer_transient: int,
                  loss: int, outputs: int) -> tuple[int, str, int]:
    """(peak bytes, where, activations at the end of forward) over one training step."""
    units = _units(graph, segments)
    charged: dict[str, int] = {}  # storage key -> bytes, charged to the first unit keeping it
    first_of: list[list[tuple[str, int]]] = []
    for u in units:
        mine = []
        for key, b in _kept(a, u):
            if key not in charged:
                charged[key] = b
                mine.append((key, b))
        first_of.append(mine)
    total = sum(charged.values())
    peak, where = 0, ""
    # Forward: what is kept so far plus the op's inputs and outputs.
    running = 0
    for u, mine in zip(units, first_of):
        running += sum(b for _, b in mine)
        here = persistent + running + max(a.out_bytes[n.name] + a.in_bytes[n.name] for n in u.nodes)
        if here > peak:
            peak, where = here, f"forward, {u.name}"
    end_forward = persistent + total + loss + outputs
    if end_forward > peak:
        peak, where = end_forward, "end of forward"
    # The loss's backward: the gradient of the outputs (its own temporaries take the place of
    # what the loss released).
    loss_backward = end_forward + outputs
    if loss_backward > peak:
        peak, where = loss_backward, "backward, loss"
    # Backward, last unit first: gradients accumulate while kept activations are released.
    # A recomputed segment first brings back its activations, then releases them node by node.
    live, grads = total, 0
    kept_keys = set(charged)
    for u, mine in zip(reversed(units), reversed(first_of)):
        inner: list[tuple[Node, int]] = []  # (node, bytes it is the first in the segment to keep)
        if u.segment:
            seen = set(kept_keys)
            for n in u.nodes:
                fresh = 0
                for key, b in a.saves[n.name]:
                    if key not in seen:
                        seen.add(key)
                        fresh += b
                inner.append((n, fresh))
        else:
            inner = [(u.nodes[0], 0)]
        inner_live = sum(b for _, b in inner)
        for n, fresh in reversed(inner):
            here = persistent + live + inner_live + loss + grads + a.grads[n.name] + _transient(a, [n])
            if here > peak:
                peak, where = here, f"backward, {n.name}" + (f" (recomputed in {u.name})" if u.segment else "")
            grads += a.grads[n.name]
            inner_live -= fresh
        live -= sum(b for _, b in mine)
    step = persistent + grads_total + optimizer_transient
    if step > peak:
        peak, where = step, "optimizer step"
    return peak, where, total


def loss_bytes(graph: Graph, a: Analysis, losses) -> int:
    """What the loss keeps for backward, from the `train:` losses (an approximation): softmax
    losses their log-probabilities (and the int64 targets), regression losses input and target."""
    by_name = {v.name: v for v in graph.outputs}
    total = 0
    for spec in losses or []:
        out = by_name.get(getattr(spec, "output", None) or (graph.outputs[0].name if graph.outputs else ""))
        if out is None:
            continue
        key = a.storage.get(id(out))
        elements = key[1] // 4 if key else 0
        w = 4
        if spec.kind in ("cross_entropy", "next_token", "kl_div", "clip"):
            classes = out.type.shape[-1] if isinstance(out.type.shape[-1], int) else 1
            rows = elements // max(1, classes)
            total += elements * w * (2 if spec.kind == "clip" else 1) + rows * 8
        elif spec.kind == "nll":
            total += elements // max(1, out.type.shape[-1] if isinstance(out.type.shape[-1], int) else 1) * 8
        else:  # mse, l1, smooth_l1, huber, binary_cross_entropy, vae: input and target
            total += 2 * elements * w
    return total


def estimate(graph: Graph, config: MemoryConfig, segments=None, losses=None, plan=None, analysis: Analysis | None = None) -> MemoryReport:
    """The memory of one training step of `graph` at `config`; `segments` (or `plan.segments`)
    are recomputed in backward; `losses` are `train:` loss specs."""
    if plan is not None:
        segments = plan.segments
    a = analysis if analysis is not None else analyse(graph, config)
    trainable = a.trainable
    weights = sum(p.numel * DTYPE_BYTES.get(p.dtype, 4) for p in graph.params.values())
    train_params = [p for n, p in graph.params.items() if trainable.get(n)]
    grads = sum(p.numel * DTYPE_BYTES.get(p.dtype, 4) for p in train_params)
    opt = config.optimizer
    optimizer = opt.states * sum(p.numel * 4 for p in train_params) + (4 * len(train_params) if opt.step_counter else 0)
    # The optimizer step's temporaries: foreach kernels (CUDA's default) make one list of
    # parameter-sized tensors; CPU's per-tensor loop two temporaries of one tensor at a time,
    # while one of the previous tensor's is still referenced (measured: 3x one of 4 equal
    # tensors, 2x a single one).
    sizes = [p.numel * 4 for p in train_params]
    loop = max((2 * b + (sizes[k - 1] if k else 0) for k, b in enumerate(sizes)), default=0)
    opt_transient = 0 if opt.states == 0 else (grads if config.device == "cuda" else loop)
    loss = loss_bytes(graph, a, losses)
    outputs = sum(a.storage[id(v)][1] for v in graph.outputs)
    peak, where, activations = timeline_peak(a, graph, segments, weights + optimizer, grads, opt_transient, loss, outputs)
    recomputed = {n.name for s in segments or [] for n in s.nodes}
    first: dict[str, str] = {}
    for u in _units(graph, segments):
        for key, _ in _kept(a, u):
            first.setdefault(key, u.name if u.segment else u.nodes[0].name)
    per_node: dict[str, int] = {}
    seen: set[str] = set()
    for u in _units(graph, segments):
        for key, b in _kept(a, u):
            if key not in seen:
                seen.add(key)
                per_node[u.name] = per_node.get(u.name, 0) + b
    layers = []
    for n in graph.nodes:
        if n.name in recomputed:
            seg = next(s for s in segments if n in s.nodes)
            saved = per_node.get(seg.name, 0) if n is seg.nodes[0] else 0
        else:
            saved = per_node.get(n.name, 0)
        layers.append(LayerMemory(n.name, n.op, saved, n.name in recomputed, n.origin.line if n.origin else None))
    return MemoryReport(graph.name, config, weights, grads, optimizer, activations, loss, peak, where, layers,
                        sum(p.numel for p in train_params), plan,
                        saved_bytes(a, graph) if segments else None)


# ---------------------------------------------------------------------------------------
# Measurement (for tests and benchmarks; needs torch)


@contextlib.contextmanager
def _packed(module):
    """While active: the storages autograd packs for backward (saved_tensors_hooks), once each,
    as address -> bytes, leaving out the module's parameters and buffers."""
    import torch

    params = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    kept: dict[int, int] = {}
    holders = []

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.nbytes():
            kept.setdefault(s.data_ptr(), s.nbytes())
        holders.append(t)  # keep the storage alive, so its address is not reused
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield kept
    holders.clear()


def measure_saved(module, *inputs, loss_fn=None) -> int:
    """Bytes autograd keeps for backward after `module(*inputs)` (and `loss_fn(output)` when
    given): every tensor packed by `torch.autograd.graph.saved_tensors_hooks`, once per
    storage, leaving out the module's parameters and buffers."""
    with _packed(module) as kept:
        out = module(*inputs)
        if loss_fn is not None:
            out = loss_fn(out)
    return sum(kept.values())


def measure_kept(module, *inputs) -> int:
    """Bytes `module(*inputs)` keeps for backward, including the kernel outputs a selective
    checkpoint policy caches, which saved_tensors_hooks (`measure_saved`) does not see: the
    storages packed by the hooks (the inputs among them) together with every storage the
    forward created that is still alive beside its outputs, once per storage."""
    import torch

    meter = PeakMeter()
    with _packed(module) as packed, meter:
        out = module(*inputs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    result = {t.untyped_storage().data_ptr() for t in outs if isinstance(t, torch.Tensor)}
    alive = {key: n for key, n in meter.sizes.items() if key not in result}
    return sum((packed | alive).values())


class PeakMeter:
    """Live bytes of tensors created by PyTorch ops while active (a TorchDispatchMode), and their
    high-water mark: a measured peak on any device, including the CPU, whose allocator keeps no
    statistics. Storages that existed before (weights, inputs) and views are not counted."""

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        meter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                meter._record(out, args, kwargs)
                return out

        self._torch, self._mode = torch, _Mode()
        self.live = self.peak = 0
        self._seen: set[int] = set()
        self.sizes: dict[int, int] = {}  # live storage -> bytes

    def _record(self, out, args, kwargs):
        import weakref

        from torch.utils._pytree import tree_flatten

        torch = self._torch
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            s = t.untyped_storage()
            key, n = s.data_ptr(), s.nbytes()
            if n == 0 or key in inputs or key in self._seen:
                continue
            self._seen.add(key)
            self.sizes[key] = n
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(s, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        if key in self._seen:
            self._seen.discard(key)
            self.sizes.pop(key, None)
            self.live -= n

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)
