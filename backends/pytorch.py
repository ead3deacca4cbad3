"""PyTorch backend: a standalone, readable `model.py` (an nn.Module) generated from the IR.

Each op has an emitter returning the submodule to create (or None for stateless ops, which
become `F.*` calls) and the forward expression. Submodule names are the IR's node names, so
`state_dict()` keys are the IR's parameter names.
"""
from __future__ import annotations

import keyword
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lbdlc.errors import SpecError
from lbdlc.ir import Graph, Node, Value
from lbdlc.ops.rules import pair

from . import pytorch_blocks as blocks

# (node, input variable names) -> (submodule constructor or None, forward expression).
# A forward expression may use `{self}` for the node's submodule.
Emitter = Callable[[Node, list[str]], tuple[str | None, str]]


def _args(*positional, **keywords_with_defaults) -> str:
    """Positional args, then keyword args whose value differs from the given default."""
    parts = [str(p) for p in positional]
    for key, (value, default) in keywords_with_defaults.items():
        if value != default:
            parts.append(f"{key}={value!r}")
    return ", ".join(parts)


def _size(v):
    """Print (k, k) as k, the way people write kernel sizes."""
    a, b = pair(v)
    return a if a == b else (a, b)


def _linear(n, x):
    a = n.attrs
    return f"nn.Linear({_args(a.in_features, a.out_features, bias=(a.bias, True))})", f"{{self}}({x[0]})"


def _conv(module: str, transposed: bool = False):
    """nn.Conv1d/2d and nn.ConvTranspose1d/2d, writing only non-default arguments."""

    def emit(n, x):
        a = n.attrs
        extra = {"output_padding": (_size(a.output_padding), 0)} if transposed else {}
        args = _args(
            a.in_channels,
            a.out_channels,
            kernel_size=(_size(a.kernel_size), None),
            stride=(_size(a.stride), 1),
            padding=(_size(a.padding), 0),
            **extra,
            dilation=(_size(a.dilation), 1),
            groups=(a.groups, 1),
            bias=(a.bias, True),
        )
        return f"nn.{module}({args})", f"{{self}}({x[0]})"

    return emit


def _pool(fn):
    def emit(n, x):
        a = n.attrs
        stride = _size(a.stride) if a.stride is not None else None
        return None, f"F.{fn}({_args(x[0], kernel_size=(_size(a.kernel_size), None), stride=(stride, None), padding=(_size(a.padding), 0))})"

    return emit


def _batch_norm(n, x):
    a = n.attrs
    kind = "BatchNorm2d" if n.inputs[0].type.rank == 4 else "BatchNorm1d"
    return f"nn.{kind}({_args(a.num_features, eps=(a.eps, 1e-5), momentum=(a.momentum, 0.1))})", f"{{self}}({x[0]})"


def _layer_norm(n, x):
    a = n.attrs
    args = _args(a.normalized_shape, eps=(a.eps, 1e-5), elementwise_affine=(a.elementwise_affine, True), bias=(a.bias, True))
    return f"nn.LayerNorm({args})", f"{{self}}({x[0]})"


def _reshape(n, x):
    src = n.inputs[0].type.shape
    dims = []
    for k, d in enumerate(n.outputs[0].type.shape):
        if isinstance(d, int):
            dims.append(str(d))
        elif k < len(src) and d == src[k]:
            dims.append(f"{x[0]}.shape[{k}]")
        else:
            dims.append("-1")
    return None, f"{x[0]}.reshape({', '.join(dims)})"


def _attention(n, x):
    a = n.attrs
    key_bias = None if a.key_bias == a.bias else a.key_bias  # written only where k_proj differs (Whisper)
    args = _args(a.embed_dim, a.heads, causal=(a.causal, False), bias=(a.bias, True), dropout=(a.dropout, 0.0), key_bias=(key_bias, None))
    return f"MultiHeadAttention({args})", f"{{self}}({', '.join(x)})"


def _position_embedding(n, x):
    return f"PositionEmbedding({n.attrs.max_positions}, {n.attrs.embedding_dim})", f"{{self}}({x[0]})"


def _sinusoidal_position(n, x):
    a = n.attrs
    args = _args(a.embedding_dim, max_positions=(a.max_positions, 4096), base=(a.base, 10000.0), layout=(a.layout, "interleaved"))
    return f"SinusoidalPosition({args})", f"{{self}}({x[0]})"


def _upsample(n, x):
    a = n.attrs
    if a.size is not None:
        target = f"size={tuple(a.size)!r}"
    else:
        sh, sw = pair(a.scale_factor)
        target = f"scale_factor={float(sh)!r}" if sh == sw else f"scale_factor={(float(sh), float(sw))!r}"
    corners = f", align_corners={a.align_corners!r}" if a.mode == "bilinear" else ""
    return None, f"F.interpolate({x[0]}, {target}, mode={a.mode!r}{corners})"


def _group_norm(n, x):
    a = n.attrs
    return f"nn.GroupNorm({_args(a.num_groups, a.num_channels, eps=(a.eps, 1e-5), affine=(a.affine, True))})", f"{{self}}({x[0]})"


def _instance_norm(n, x):
    a = n.attrs
    kind = "InstanceNorm2d" if n.inputs[0].type.rank == 4 else "InstanceNorm1d"
    return f"nn.{kind}({_args(a.num_features, eps=(a.eps, 1e-5), affine=(a.affine, False))})", f"{{self}}({x[0]})"


def _rms_norm(n, x):
    a = n.attrs
    # eps always written out: nn.RMSNorm's default (None) means torch.finfo(dtype).eps.
    args = _args(a.normalized_shape, eps=(a.eps, None), elementwise_affine=(a.elementwise_affine, True))
    return f"nn.RMSNorm({args})", f"{{self}}({x[0]})"


def _select(n, x):
    d = n.attrs.dim % n.inputs[0].type.rank
    return None, f"{x[0]}[{':, ' * d}{n.attrs.index}]"


def _matmul(n, x):
    return None, f"{x[0]} @ {x[1]}.transpose(-2, -1)" if n.attrs.transpose_b else f"{x[0]} @ {x[1]}"


def _slice(n, x):
    a = n.attrs
    d = a.dim % n.inputs[0].type.rank
    bounds = f"{a.start or ''}:{'' if a.end is None else a.end}" + (f":{a.step}" if a.step != 1 else "")
    return None, f"{x[0]}[{':, ' * d}{bounds}]"


def _split(n, x):
    """x.chunk(parts, dim) or torch.split(x, sizes, dim): a tuple, unpacked into one variable per piece."""
    a = n.attrs
    if a.parts is not None:
        return None, f"{x[0]}.chunk({a.parts}, dim={a.dim})"
    return None, f"torch.split({x[0]}, {list(a.sizes)!r}, dim={a.dim})"


def _graph_conv(n, x):
    a = n.attrs
    args = _args(a.in_features, a.out_features, bias=(a.bias, True), normalize=(a.normalize, False))
    return f"GraphConv({args})", f"{{self}}({x[0]}, {x[1]})"


def _adaptive_avg_pool2d(n, x):
    oh, ow = pair(n.attrs.output_size)
    return None, f"F.adaptive_avg_pool2d({x[0]}, {oh if oh == ow else (oh, ow)})"


def _l2_normalize(n, x):
    return None, f"F.normalize({_args(x[0], dim=(n.attrs.dim, 1), eps=(n.attrs.eps, 1e-12))})"


def _learned_scale(n, x):
    a = n.attrs
    return f"LearnedScale({_args(scale=(a.scale, 1.0), log=(a.log, False))})", f"{{self}}({x[0]})"


def _argmax(n, x):
    return None, f"{x[0]}.argmax({_args(dim=(n.attrs.dim, None), keepdim=(n.attrs.keepdim, False))})"


def _timestep_embedding(n, x):
    a = n.attrs
    args = _args(a.embedding_dim, max_period=(a.max_period, 10000.0), flip_sin_to_cos=(a.flip_sin_to_cos, False),
                 downscale_freq_shift=(a.downscale_freq_shift, 1.0))
    return f"TimestepEmbedding({args})", f"{{self}}({x[0]})"


def _recurrent(module: str):
    """nn.RNN / nn.LSTM / nn.GRU; the op's output is the module's `output` (the whole sequence of
    last-layer hidden states), and batch_first is written out (torch.nn's default is false)."""

    def emit(n, x):
        a = n.attrs
        extra = {"nonlinearity": (a.nonlinearity, "tanh")} if module == "RNN" else {}
        args = _args(
            a.input_size, a.hidden_size, num_layers=(a.num_layers, 1), **extra, bias=(a.bias, True),
            batch_first=(a.batch_first, False), dropout=(a.dropout, 0.0), bidirectional=(a.bidirectional, False),
        )
        return f"nn.{module}({args})", f"{{self}}({x[0]})[0]"

    return emit


def _fused(core: Emitter) -> Emitter:
    """fused_linear / fused_conv2d: the layer's module (nn.Linear / nn.Conv2d, so parameter
    names stay those of the layer it came from), + residual, wrapped in the activation's call:
    `F.gelu(self.c_fc(x), approximate='tanh')`, `F.relu(self.conv3(x) + identity)`."""

    def emit(n, x):
        from lbdlc.ops.fused import activation_node

        module, expr = core(n, x[:1])
        if len(x) > 1:
            expr = f"{expr} + {x[1]}"
        act = activation_node(n)
        return module, expr if act is None else EMITTERS[act.op](act, [expr])[1]

    return emit


def _scaled_dot_product_attention(n, x):
    a = n.attrs
    dropout = f", dropout_p={a.dropout!r} if self.training else 0.0" if a.dropout else ""
    causal = ", is_causal=True" if a.causal else ""
    scale = f", scale={a.scale!r}" if a.scale is not None else ""
    return None, f"F.scaled_dot_product_attention({', '.join(x)}{dropout}{causal}{scale})"


def _linear_q(n, x):
    a = n.attrs
    return f"LinearQ({a.in_features}, {a.out_features}, {a.format!r}{'' if a.bias else ', bias=False'})", f"{{self}}({x[0]})"


def _lora_linear(n, x):
    a = n.attrs
    extra = ("" if a.bias else ", bias=False") + (f", dropout={a.dropout!r}" if a.dropout else "")
    return f"LoRALinear({a.in_features}, {a.out_features}, r={a.r}, scale={a.scale!r}{extra})", f"{{self}}({x[0]})"


def _embedding_q(n, x):
    a = n.attrs
    return f"EmbeddingQ({a.num_embeddings}, {a.embedding_dim}, {a.format!r})", f"{{self}}({x[0]})"


def _lora_linear_q(n, x):
    a = n.attrs
    extra = ("" if a.bias else ", bias=False") + (f", dropout={a.dropout!r}" if a.dropout else "")
    return f"LoRALinearQ({a.in_features}, {a.out_features}, r={a.r}, lora_scale={a.scale!r}, format={a.format!r}{extra})", f"{{self}}({x[0]})"


def _number(v: float) -> str:
    return repr(int(v)) if float(v).is_integer() else repr(v)


def _affine(n, x):
    """x * scale + shift, leaving out what is the identity."""
    a, expr = n.attrs, x[0]
    if a.scale != 1.0:
        expr = f"{expr} * {_number(a.scale)}"
    if a.shift != 0.0:
        expr = f"{expr} {'-' if a.shift < 0 else '+'} {_number(abs(a.shift))}"
    return None, expr



EMITTERS: dict[str, Emitter] = {
    "sub": lambda n, x: (None, f"{x[0]} - {x[1]}"),
    "div": lambda n, x: (None, f"{x[0]} / {x[1]}"),
    "sqrt": lambda n, x: (None, f"torch.sqrt({x[0]})"),
    "rsqrt": lambda n, x: (None, f"torch.rsqrt({x[0]})"),
    "erf": lambda n, x: (None, f"torch.erf({x[0]})"),
    "pow": lambda n, x: (None, f"{x[0]} ** {_number(n.attrs.exponent)}"),
    "affine": _affine,
    "lora_linear_q": _lora_linear_q,
    "embedding_q": _embedding_q,
    "lora_linear": _lora_linear,
    "linear_q": _linear_q,
    "fused_linear": _fused(_linear),
    "fused_conv2d": _fused(_conv("Conv2d")),
    "scaled_dot_product_attention": _scaled_dot_product_attention,
    "rnn": _recurrent("RNN"),
    "lstm": _recurrent("LSTM"),
    "gru": _recurrent("GRU"),
    "adaptive_avg_pool2d": _adaptive_avg_pool2d,
    "quick_gelu": lambda n, x: (None, f"{x[0]} * torch.sigmoid(1.702 * {x[0]})"),
    "l2_normalize": _l2_normalize,
    "learned_scale": _learned_scale,
    "argmax": _argmax,
    "select_at": lambda n, x: (None, f"{x[0]}[torch.arange({x[0]}.shape[0]), {x[1]}]"),
    "timestep_embedding": _timestep_embedding,
    "split": _split,
    "graph_conv": _graph_conv,
    "reparameterize": lambda n, x: (None, f"reparameterize({x[0]}, {x[1]}, self.training)"),
    "permute": lambda n, x: (None, f"{x[0]}.permute({', '.join(str(d) for d in n.attrs.dims)})"),
    "slice": _slice,
    "mean": lambda n, x: (None, f"{x[0]}.mean({_args(dim=(tuple(n.attrs.dims), None), keepdim=(n.attrs.keepdim, False))})"),
    "matmul": _matmul,
    "silu": lambda n, x: (None, f"F.silu({x[0]})"),
    "softplus": lambda n, x: (None, f"F.softplus({_args(x[0], beta=(n.attrs.beta, 1.0), threshold=(n.attrs.threshold, 20.0))})"),
    "log_softmax": lambda n, x: (None, f"F.log_softmax({x[0]}, dim={n.attrs.dim})"),
    "mul": lambda n, x: (None, " * ".join(x)),
    "transpose": lambda n, x: (None, f"{x[0]}.transpose({n.attrs.dims[0]}, {n.attrs.dims[1]})"),
    "select": _select,
    "cls_token": lambda n, x: (f"ClsToken({n.inputs[0].type.shape[2]})", f"{{self}}({x[0]})"),
    "conv1d": _conv("Conv1d"),
    "conv_transpose1d": _conv("ConvTranspose1d", transposed=True),
    "conv_transpose2d": _conv("ConvTranspose2d", transposed=True),
    "upsample": _upsample,
    "max_pool1d": _pool("max_pool1d"),
    "avg_pool1d": _pool("avg_pool1d"),
    "group_norm": _group_norm,
    "instance_norm": _instance_norm,
    "rms_norm": _rms_norm,
    "relu6": lambda n, x: (None, f"F.relu6({x[0]})"),
    "linear": _linear,
    "conv2d": _conv("Conv2d"),
    "max_pool2d": _pool("max_pool2d"),
    "avg_pool2d": _pool("avg_pool2d"),
    "global_avg_pool2d": lambda n, x: (None, f"F.adaptive_avg_pool2d({x[0]}, 1)"),
    "relu": lambda n, x: (None, f"F.relu({x[0]})"),
    "leaky_relu": lambda n, x: (None, f"F.leaky_relu({_args(x[0], negative_slope=(n.attrs.negative_slope, 0.01))})"),
    "gelu": lambda n, x: (None, f"F.gelu({_args(x[0], approximate=(n.attrs.approximate, 'none'))})"),
    "tanh": lambda n, x: (None, f"torch.tanh({x[0]})"),
    "sigmoid": lambda n, x: (None, f"torch.sigmoid({x[0]})"),
    "softmax": lambda n, x: (None, f"F.softmax({x[0]}, dim={n.attrs.dim})"),
    "dropout": lambda n, x: (f"nn.Dropout({_args(p=(n.attrs.p, 0.5))})", f"{{self}}({x[0]})"),
    "batch_norm": _batch_norm,
    "layer_norm": _layer_norm,
    "flatten": lambda n, x: (None, f"torch.flatten({_args(x[0], n.attrs.start_dim, end_dim=(n.attrs.end_dim, -1))})"),
    "reshape": _reshape,
    "add": lambda n, x: (None, " + ".join(x)),
    "concat": lambda n, x: (None, f"torch.cat([{', '.join(x)}], dim={n.attrs.dim})"),
    "embedding": lambda n, x: (f"nn.Embedding({n.attrs.num_embeddings}, {n.attrs.embedding_dim})", f"{{self}}({x[0]})"),
    "position_embedding": _position_embedding,
    "sinusoidal_position": _sinusoidal_position,
    "attention": _attention,
}

# Helper classes some emitters construct (op name -> source), written once into model.py
# when a graph uses that op, so the generated file stays standalone.
SUPPORT: dict[str, str] = {
    "lora_linear": '''
class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank correction (LoRA):
    y = x W^T + b + scale * B(A(dropout(x))), parameters named as PEFT names them."""

    def __init__(self, in_features: int, out_features: int, r: int, scale: float, bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scale
''',
    "learned_scale": '''
class LearnedScale(nn.Module):
    """Multiplies by one learned number: exp(weight) with log=True (CLIP's temperature, which
    stays positive while training), else weight itself. `scale` is the initial scale."""

    def __init__(self, scale: float = 1.0, log: bool = False) -> None:
        super().__init__()
        self.log = log
        value = torch.tensor(scale, dtype=torch.float64)
        self.weight = nn.Parameter((value.log() if log else value).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.weight.exp() if self.log else self.weight)
''',
    "timestep_embedding": '''
class TimestepEmbedding(nn.Module):
    """Sinusoidal features of timesteps (DDPM): [*] -> [*, dim] = [sin(t f), cos(t f)] with
    f_i = max_period^(-i / (dim/2 - downscale_freq_shift)); [cos, sin] with flip_sin_to_cos."""

    def __init__(self, dim: int, max_period: float = 10000.0, flip_sin_to_cos: bool = False, downscale_freq_shift: float = 1.0) -> None:
        super().__init__()
        half = dim // 2
        i = torch.arange(half, dtype=torch.float64)
        freqs = torch.exp(-torch.tensor(max_period, dtype=torch.float64).log() * i / (half - downscale_freq_shift))
        self.flip_sin_to_cos = flip_sin_to_cos
        self.register_buffer("freqs", freqs.float(), persistent=False)  # a constant: not in state_dict()

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angle = t.float().unsqueeze(-1) * self.freqs
        parts = [torch.cos(angle), torch.sin(angle)] if self.flip_sin_to_cos else [torch.sin(angle), torch.cos(angle)]
        return torch.cat(parts, dim=-1)
''',
    "graph_conv": '''
class GraphConv(nn.Module):
    """Graph convolution (Kipf & Welling, 2017): adj @ (x W^T) + b.

    x: [nodes, in] or [batch, nodes, in]; adj: [nodes, nodes] or [batch, nodes, nodes].
    With normalize=True, adj is the raw adjacency A (non-negative, no self-loops) and the
    layer uses D^-1/2 (A + I) D^-1/2, where D holds the row sums of A + I.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, normalize: bool = False) -> None:
        super().__init__()
        self.normalize = normalize
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        bound = in_features ** -0.5  # nn.Linear's initialisation
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)  # project the features first: [..., nodes, out]
        if self.normalize:
            # D^-1/2 (A + I) D^-1/2 y, without forming I: d * (A @ (d * y) + d * y)
            d = (adj.sum(-1, keepdim=True) + 1).rsqrt()
            y = d * (adj @ (d * y) + d * y)
        else:
            y = adj @ y
        return y if self.bias is None else y + self.bias
''',
    "reparameterize": '''
def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, training: bool) -> torch.Tensor:
    """The VAE's latent: a sample mu + exp(logvar / 2) * eps, eps ~ N(0, 1), while training
    (gradients reach mu and logvar through it); the mean mu at inference (eval mode)."""
    if not training:
        return mu
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
''',
    "cls_token": '''
class ClsToken(nn.Module):
    """Prepends a learned token to a [batch, seq, dim] sequence."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1)
''',
    "attention": '''
class MultiHeadAttention(nn.Module):
    """Multi-head attention, batch first: [batch, seq, dim] in and out.

    Self-attention on `x`, or cross-attention when `context` [batch, seq_kv, dim] is given.
    With causal=True, query position i attends to key positions j <= i.
    """

    def __init__(
        self, dim: int, heads: int, causal: bool = False, bias: bool = True, dropout: float = 0.0, key_bias: bool | None = None
    ) -> None:
        super().__init__()
        assert dim % heads == 0, "heads must divide dim"
        self.heads = heads
        self.causal = causal
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias if key_bias is None else key_bias)  # Whisper: no key bias
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        batch, seq, dim = x.shape
        seq_kv = context.shape[1]
        # Split the features into heads: (batch, seq, dim) -> (batch, heads, seq, head_dim).
        q = self.q_proj(x).view(batch, seq, self.heads, -1).transpose(1, 2)
        k = self.k_proj(context).view(batch, seq_kv, self.heads, -1).transpose(1, 2)
        v = self.v_proj(context).view(batch, seq_kv, self.heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=self.causal
        )
        y = y.transpose(1, 2).reshape(batch, seq, dim)  # the heads side by side again
        return self.out_proj(y)
''',
    "position_embedding": '''
class PositionEmbedding(nn.Module):
    """Learned absolute positions: adds weight[t] to position t of a [batch, seq, dim] input."""

    def __init__(self, max_positions: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_positions, dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight[: x.shape[1]]
''',
    "sinusoidal_position": '''
class SinusoidalPosition(nn.Module):
    """Fixed sine/cosine positions (Vaswani et al., 2017) added to a [batch, seq, dim] input:
    pe[t, 2i] = sin(t / base^(2i/dim)), pe[t, 2i+1] = cos(t / base^(2i/dim)).
    layout="sin_cos" (Whisper): pe[t] = [sin(t f), cos(t f)], f_i = base^(-i / (dim/2 - 1))."""

    def __init__(self, dim: int, max_positions: int = 4096, base: float = 10000.0, layout: str = "interleaved") -> None:
        super().__init__()
        t = torch.arange(max_positions, dtype=torch.float64).unsqueeze(1)
        if layout == "sin_cos":
            half = dim // 2
            freqs = torch.exp(-torch.tensor(base, dtype=torch.float64).log() * torch.arange(half, dtype=torch.float64) / (half - 1))
            pe = torch.cat([torch.sin(t * freqs), torch.cos(t * freqs)], dim=1)
        else:
            angle = t / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
            pe = torch.zeros(max_positions, dim, dtype=torch.float64)
            pe[:, 0::2] = torch.sin(angle)
            pe[:, 1::2] = torch.cos(angle[:, : dim // 2])
        self.register_buffer("pe", pe.float(), persistent=False)  # a constant: not in state_dict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[: x.shape[1]]
''',
}

# Block-quantized weights (lbdlc/quant_formats.py): a base class the three ops' classes share,
# written first; SUPPORT_NEEDS says which classes a class needs.
SUPPORT["block_quantized"] = '''
class BlockQuantized(nn.Module):
    """Rows stored block-quantized (blocks of 32 along each row) and dequantized on the fly:
    W = d * (q - z) + m. Formats: q8_0 (uint8 code + 128, z = 128), q4_0 (two 4-bit codes a
    byte, low nibble first, z = 8), q4_1 (z = 0, fp16 minimum m)."""

    ZERO_POINT = {"q8_0": 128, "q4_0": 8, "q4_1": 0}

    def __init__(self, rows: int, row_length: int, format: str = "q4_1") -> None:
        super().__init__()
        self.format = format
        blocks, code_bytes = row_length // 32, 32 if format == "q8_0" else 16
        self.register_buffer("qweight", torch.zeros(rows, blocks, code_bytes, dtype=torch.uint8))
        self.register_buffer("scale", torch.zeros(rows, blocks, dtype=torch.float16))
        if format == "q4_1":
            self.register_buffer("min", torch.zeros(rows, blocks, dtype=torch.float16))

    def dequantize_rows(self, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> torch.Tensor:
        if self.format != "q8_0":
            q = torch.stack([q & 15, q >> 4], dim=-1).flatten(-2)
        w = (q.float() - self.ZERO_POINT[self.format]) * scale.float().unsqueeze(-1)
        if minimum is not None:
            w = w + minimum.float().unsqueeze(-1)
        return w.flatten(-2)

    def dequantize(self) -> torch.Tensor:
        """The whole matrix, [rows, row_length]."""
        return self.dequantize_rows(self.qweight, self.scale, self.min if self.format == "q4_1" else None)
'''
SUPPORT["linear_q"] = '''
class LinearQ(BlockQuantized):
    """A linear layer whose weight is stored block-quantized (BlockQuantized)."""

    def __init__(self, in_features: int, out_features: int, format: str = "q4_1", bias: bool = True) -> None:
        super().__init__(out_features, in_features, format)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(), self.bias)
'''
SUPPORT["lora_linear_q"] = '''
class LoRALinearQ(LinearQ):
    """QLoRA: a frozen block-quantized linear layer plus a trainable full-precision low-rank
    correction: y = x W^T + b + lora_scale * B(A(dropout(x))), parameters named as PEFT names them."""

    def __init__(self, in_features: int, out_features: int, r: int, lora_scale: float, format: str = "q4_1",
                 bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__(in_features, out_features, format, bias)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.lora_scale = lora_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.lora_scale
'''
SUPPORT["embedding_q"] = '''
class EmbeddingQ(BlockQuantized):
    """A token table stored block-quantized (BlockQuantized): the ids' rows are gathered packed
    and dequantized. A linear layer tied to the table (an LM head) multiplies by
    `dequantize()`, the whole table."""

    def __init__(self, num_embeddings: int, embedding_dim: int, format: str = "q4_1") -> None:
        super().__init__(num_embeddings, embedding_dim, format)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dequantize_rows(self.qweight[ids], self.scale[ids], self.min[ids] if self.format == "q4_1" else None)
'''
SUPPORT_NEEDS = {"linear_q": ("block_quantized",), "embedding_q": ("block_quantized",),
                 "lora_linear_q": ("block_quantized", "linear_q")}
SUPPORT_FIRST = ("block_quantized", "linear_q")  # base classes, before the classes built on them


def _support_source(ops: set[str]) -> str:
    """The helper classes model.py needs for these ops (and the classes those build on)."""
    needed = {k for op in ops if op in SUPPORT for k in (op, *SUPPORT_NEEDS.get(op, ()))}
    order = [k for k in SUPPORT_FIRST if k in needed] + sorted(needed - set(SUPPORT_FIRST))
    return "".join(SUPPORT[k].strip() + "\n\n\n" for k in order)

_RESERVED = {"self", "torch", "nn", "F"}


def class_name(graph: Graph) -> str:
    return "".join(p[:1].upper() + p[1:] for p in graph.name.split("_") if p) or "Model"


def _variable_names(graph: Graph, chain: str = "x") -> dict[int, str]:
    """`chain` (x) for a value that only feeds the next node (a chain reads like hand-written
    code); the layer's own name for values that are reused later (skips, multiple outputs)."""
    users = graph.users()
    first = graph.nodes[0] if graph.nodes else None
    reserved = _RESERVED | {chain}
    # An input called like the chain variable keeps its name only if the chain never outlives it.
    names = {id(v): chain if v.name == chain and users.get(id(v)) == [first] else _safe(v.name, reserved)
             for v in graph.inputs}
    outputs = [id(v) for v in graph.outputs]
    last = len(graph.nodes) - 1
    for i, node in enumerate(graph.nodes):
        for v in node.outputs:
            consumers = users.get(id(v), [])
            feeds_next = (
                len(node.outputs) == 1
                and len(consumers) == 1
                and i < last
                and consumers[0] is graph.nodes[i + 1]
                and id(v) not in outputs
            )
            is_final = outputs == [id(v)] and i == last and not consumers
            names[id(v)] = chain if feeds_next or is_final else _safe(v.name, reserved)
    return names


def _safe(name: str, reserved: set[str] = _RESERVED | {"x"}) -> str:
    name = name.replace(".", "_")  # scoped names: layer1.0.residual -> layer1_0_residual
    if name[:1].isdigit():
        name = "_" + name
    return name + "_" if keyword.iskeyword(name) or name in reserved else name


# Scoped layer names (`layer1.0.conv1`) become nested containers, so that state_dict keys
# stay the IR's parameter names: digit keys 0..n-1 an nn.ModuleList, others an nn.ModuleDict.
_MODULE_DICT_ATTRS = set(dir(__import__("torch").nn.ModuleDict))


def _module_tree(entries: list[tuple[str, str]]) -> dict:
    tree: dict = {}
    for name, ctor in entries:
        *scopes, leaf = name.split(".")
        node = tree
        for part in scopes:
            node = node.setdefault(part, {})
        node[leaf] = ctor
    return tree


def _container(tree: dict, indent: str) -> str:
    inner = indent + "    "
    keys = list(tree)
    items = [(k, tree[k] if isinstance(tree[k], str) else _container(tree[k], inner)) for k in keys]
    if _is_list(tree):
        body = "".join(f"{inner}{value},\n" for _, value in items)
        return f"nn.ModuleList([\n{body}{indent}])"
    body = "".join(f"{inner}{k!r}: {value},\n" for k, value in items)
    return f"nn.ModuleDict({{\n{body}{indent}}})"


def _tied_call(node: Node, x: list[str]) -> str:
    """A layer that shares another layer's weight calls it functionally, so the shared
    tensor appears once in state_dict (as the IR names it)."""
    if node.op == "linear_q" and not node.attrs.bias:  # an LM head tied to a quantized token table (EmbeddingQ)
        owner = node.params["qweight"].rsplit(".", 1)[0]
        return f"F.linear({x[0]}, {{self:{owner}}}.dequantize())  # weight tied to {owner}'s quantized table"
    if node.op != "linear" or node.attrs.bias:
        raise SpecError("the PyTorch backend ties weights of bias-free linear layers only", node.origin,
                        hint="set `bias: false` on the tied layer")
    owner, attr = node.params["weight"].rsplit(".", 1)
    return f"F.linear({x[0]}, {{self:{owner}}}.{attr})  # weight tied to {node.params['weight']}"


def _is_list(tree: dict) -> bool:
    return list(tree) == [str(k) for k in range(len(tree))]


def _access(name: str, tree: dict) -> str:
    """`self.layer1[0].conv1` for the submodule of a scoped layer name (`tree` from _module_tree)."""
    first, *rest = name.split(".")
    path, node = f"self.{first}", tree[first]
    for part in rest:
        container, node = node, node[part]
        if _is_list(container):
            path += f"[{part}]"
        elif part.isidentifier() and part not in _MODULE_DICT_ATTRS and not keyword.iskeyword(part):
            path += f".{part}"
        else:
            path += f"[{part!r}]"
    return path


# A pseudo-op of the outer module's view: one block instance, or a loop over a repetition.
CALL = "<block call>"


@dataclass(frozen=True)
class _Call:
    modules: tuple[tuple[str, str], ...]  # (dotted name, constructor) of each instance
    loop: str | None = None  # loop variable, for a chained repetition
    root: str | None = None  # the repetition's name (`h`), for a loop
    checkpointed: tuple[tuple[int, int], ...] = ()  # block ranges recomputed in backward (lbdlc.checkpointing)
    note: str = ""  # where the spec asks for it
    selective: bool = False  # recompute selectively (SELECTIVE_SUPPORT's policy)


def _checkpointed_loop(call: _Call, loop: str, target: str, extra: list[str], taken: set[str]) -> list[str]:
    """A loop whose block ranges `call.checkpointed` run under torch.utils.checkpoint: their
    activations are recomputed in backward; the other blocks run as a plain loop."""
    n, args, ranges = len(call.modules), ", ".join([target] + extra), list(call.checkpointed)
    kw = "use_reentrant=False" + (", context_fn=keep_products" if call.selective else "")
    start, stop = ("start", "stop") if not {"start", "stop"} & taken else ("start_", "stop_")

    def part(a: int, b: int) -> str:  # the slice of the ModuleList
        return "" if (a, b) == (0, n) else f"[{a}:{b}]" if a and b < n else f"[{a}:]" if a else f"[:{b}]"

    lines, pos = [], 0
    while pos < n:
        run = []
        while ranges and ranges[0][0] == pos:
            run.append(ranges.pop(0))
            pos = run[-1][1]
        if run and all(b == a + 1 for a, b in run):  # one block per checkpoint
            if len(run) == 1:
                lines.append(f"{target} = checkpoint({{self:{call.root}}}[{run[0][0]}], {args}, {kw})  # {call.note}")
            else:
                lines.append(f"for {loop} in {{self:{call.root}}}{part(run[0][0], run[-1][1])}:  # {call.note}")
                lines.append(f"    {target} = checkpoint({loop}, {args}, {kw})")
        elif len(run) == 1:
            a, b = run[0]
            lines.append(f"{target} = checkpoint(run_blocks, {{self:{call.root}}}{part(a, b)}, {args}, {kw})  # {call.note}")
        elif run:
            pairs = ", ".join(f"({a}, {b})" for a, b in run)
            lines.append(f"for {start}, {stop} in ({pairs}):  # {call.note}")
            lines.append(f"    {target} = checkpoint(run_blocks, {{self:{call.root}}}[{start}:{stop}], {args}, {kw})")
        if run:
            continue
        end = ranges[0][0] if ranges else n
        lines.append(f"for {loop} in {{self:{call.root}}}{part(pos, end)}:")
        lines.append(f"    {target} = {loop}({args})")
        pos = end
    return lines


CHECKPOINT_SUPPORT = '''
def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
    """The blocks in order, each reading the previous one's output (and the same `args`).
    Under torch.utils.checkpoint only the inputs are kept for backward, and the blocks'
    activations are recomputed when backward reaches them (the random state of dropout is
    replayed, so the gradients are those of the plain loop)."""
    for block in blocks:
        x = block(x, *args)
    return x
'''


SELECTIVE_SUPPORT = '''
# Selective recomputation: inside a checkpoint, the outputs of these kernels are kept for
# backward; every other op (pointwise, normalization, dropout) is recomputed from them.
KEPT_KERNELS = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default, torch.ops.aten.convolution.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def keep_kernel_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT_KERNELS else CheckpointPolicy.PREFER_RECOMPUTE


def keep_products():
    return create_selective_checkpoint_contexts(keep_kernel_outputs)
'''


def _emit(node: Node, x: list[str]) -> tuple[str | None, str]:
    if node.op not in EMITTERS:
        raise SpecError(f"the PyTorch backend cannot emit op '{node.op}'", node.origin)
    module, expr = EMITTERS[node.op](node, x)
    if any(full != f"{node.name}.{local}" for local, full in node.params.items()):
        module, expr = None, _tied_call(node, x)
    return module, expr


def _module_signature(module) -> list:
    """What a built submodule is: types, configuration and parameter shapes, all the way down."""
    simple = (int, float, bool, str, tuple, type(None))
    return [
        (name, type(m).__name__, m.extra_repr(),
         sorted((k, repr(v)) for k, v in vars(m).items() if not k.startswith("_") and isinstance(v, simple)),
         [(k, tuple(t.shape)) for k, t in m.named_parameters(recurse=False)],
         [(k, tuple(t.shape)) for k, t in m.named_buffers(recurse=False)])
        for name, m in module.named_modules()
    ]


_NAMESPACE: dict = {}


def _built(constructor: str, arguments: dict) -> list:
    """Build a constructor expression of our own generated code on the meta device (no
    memory), to check a block class against the flat code it replaces."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    if not _NAMESPACE:
        _NAMESPACE.update(torch=torch, nn=nn, F=F)
        for source in SUPPORT.values():
            exec(source, _NAMESPACE)  # our own helper classes, as written into model.py
    with torch.device("meta"):
        return _module_signature(eval(constructor, _NAMESPACE, dict(arguments)))


def _body(view: Graph, spec_file: str, module_attrs: set[str], chain: str = "x"):
    """__init__ lines, forward lines and variable names of one module (the model or a block class)."""
    var = _variable_names(view, chain)
    taken = set(var.values())
    modules, forward_lines = [], []
    for node in view.nodes:
        x = [var[id(v)] for v in node.inputs]
        targets = ", ".join(var[id(v)] for v in node.outputs)
        if node.op == CALL:
            call: _Call = node.attrs
            modules += list(call.modules)
            if call.loop:
                loop = call.loop if call.loop not in taken else call.loop + "_"
                if targets != x[0]:
                    forward_lines.append(f"{targets} = {x[0]}")
                if call.checkpointed:
                    forward_lines += _checkpointed_loop(call, loop, targets, x[1:], taken)
                    continue
                forward_lines.append(f"for {loop} in {{self:{call.root}}}:")
                forward_lines.append(f"    {targets} = {loop}({', '.join([targets] + x[1:])})")
            else:
                forward_lines.append(f"{targets} = {{self:{call.modules[0][0]}}}({', '.join(x)})")
            continue
        module, expr = _emit(node, x)
        if module is not None:
            top = node.name.split(".")[0]
            if top in module_attrs:
                raise SpecError(
                    f"the layer name '{top}' clashes with an attribute of torch.nn.Module",
                    node.origin,
                    hint="rename the layer",
                )
            where = f"  # {Path(spec_file).name}:{node.origin.line}" if node.origin else ""
            modules.append((node.name, f"{module}{where}" if "." not in node.name else module))
            expr = expr.replace("{self}", "{self:" + node.name + "}")  # filled once the tree is known
        forward_lines.append(f"{targets} = {expr}")

    tree = _module_tree(modules)
    init_lines = [
        f"self.{name} = {value}" if isinstance(value, str) else f"self.{name} = {_container(value, '        ')}"
        for name, value in tree.items()
    ]
    forward_lines = [re.sub(r"\{self:([^}]+)\}", lambda m: _access(m.group(1), tree), line) for line in forward_lines]
    return init_lines, forward_lines, var


def _returns(count: int) -> str:
    return "torch.Tensor" if count == 1 else "tuple[" + ", ".join(["torch.Tensor"] * count) + "]"


def _class_source(cls: blocks.BlockClass, spec_file: str, module_attrs: set[str]) -> str:
    markers = blocks.markers_for(cls)
    view = blocks.relative_view(cls.instances[0], cls.exprs, markers)
    first_users = view.users().get(id(view.inputs[0]), [])
    chain = "x" if view.inputs[0].name == "x" and first_users == view.nodes[:1] else "h"
    init_lines, forward_lines, var = _body(view, spec_file, module_attrs, chain)
    init_lines = [blocks.fill(line, markers) for line in init_lines]
    forward_lines = [blocks.fill_forward(line, markers) for line in forward_lines]
    init_lines = [f"self.{name} = {name}" for name in blocks.forward_args(cls, forward_lines)] + init_lines
    args = "".join(f", {name}: {kind}" for name, kind in cls.args)
    signature = ", ".join(f"{var[id(v)]}: torch.Tensor" for v in view.inputs)
    results = ", ".join(var[id(v)] for v in view.outputs)
    where = f" ({Path(spec_file).name}:{cls.defined.line})" if cls.defined else ""
    scope = cls.instances[0].scope
    what = f"The block `{scope.block}`" if scope and scope.block else f"One repetition of `{cls.instances[0].prefix.rsplit('.', 1)[0]}`"
    doc = (cls.description or what) + where
    body_init = "\n".join("        " + line for line in ["super().__init__()"] + init_lines)
    body_forward = "\n".join("        " + line for line in forward_lines)
    return (
        f"class {cls.name}(nn.Module):\n"
        f'    """{doc}"""\n\n'
        f"    def __init__(self{args}) -> None:\n{body_init}\n\n"
        f"    def forward(self, {signature}) -> {_returns(len(view.outputs))}:\n{body_forward}\n"
        f"        return {results}\n\n\n"
    )


def _outer_view(graph: Graph, plan: blocks.Plan, checkpointed: dict | None = None, note: str = "",
                selective: bool = False) -> Graph:
    """The model's own graph with each block instance (or chained repetition) as one call;
    `checkpointed`: repetition -> block ranges recomputed in backward (`selective`ly)."""
    starts = {inst.start: inst for inst in plan.instances}
    nodes, i = [], 0
    while i < len(graph.nodes):
        inst = starts.get(i)
        if inst is None:
            nodes.append(graph.nodes[i])
            i += 1
            continue
        members = plan.loops.get(id(inst), [inst])
        modules = tuple((m.prefix, blocks.class_constructor(plan.class_of[id(m)], m)) for m in members)
        root = inst.prefix.rsplit(".", 1)[0] if len(members) > 1 else None
        loop = None
        if root is not None:
            last = root.split(".")[-1]
            singular = last[:-1] if last.endswith("s") else ""
            loop = singular if singular.isidentifier() and not keyword.iskeyword(singular) else "block"
        ranges = tuple((checkpointed or {}).get(root, ())) if root is not None else ()
        nodes.append(Node(CALL, inst.prefix, list(members[0].inputs), list(members[-1].outputs),
                          _Call(modules, loop, root, ranges, note, selective)))
        i = members[-1].start + len(members[-1].nodes)
    return Graph(graph.name, graph.inputs, nodes, graph.outputs, graph.params)


def generate(graph: Graph, spec_file: str, description: str | None, lbdlc_version: str, checkpointing=None) -> str:
    """The source of model.py; `checkpointing`: a lbdlc.checkpointing.Plan (blocks recomputed in backward)."""
    import torch.nn as nn

    module_attrs = set(dir(nn.Module))
    cls = class_name(graph)
    support_classes = set(re.findall(r"^class (\w+)", "\n".join(SUPPORT.values()), re.M))
    plan = blocks.plan(graph, _emit, _built, {cls, "Model"} | support_classes)
    ranges = checkpointing.by_root() if checkpointing is not None else {}
    where = f" ({Path(spec_file).name}:{checkpointing.line})" if ranges and checkpointing.line else ""
    selective = checkpointing is not None and checkpointing.selective
    outer = _outer_view(graph, plan, ranges, f"recomputed{' selectively' if selective else ''} in backward{where}", selective)
    init_lines, forward_lines, var = _body(outer, spec_file, module_attrs)
    recomputed = [r for n in outer.nodes if n.op == CALL for r in n.attrs.checkpointed]
    ckpt_import = "from torch.utils.checkpoint import checkpoint\n" if recomputed else ""
    ckpt_support = CHECKPOINT_SUPPORT.strip() + "\n\n\n" if any(b > a + 1 for a, b in recomputed) else ""
    if recomputed and selective:
        ckpt_import = "from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts\n"
        ckpt_support += SELECTIVE_SUPPORT.strip() + "\n\n\n"
    signature = ", ".join(f"{var[id(v)]}: torch.Tensor" for v in graph.inputs)
    results = [var[id(v)] for v in graph.outputs]
    shapes = "\n".join(f"        {v.name}: {v.type} {v.type.dtype}" for v in graph.inputs)
    out_shapes = "\n".join(f"        {v.name}: {v.type} {v.type.dtype}" for v in graph.outputs)
    body_init = "\n".join("        " + line for line in init_lines) or "        pass"
    body_forward = "\n".join("        " + line for line in forward_lines)
    title = f"{cls}: {description}" if description else cls
    support = _support_source({n.op for n in graph.nodes})
    block_classes = "".join(_class_source(c, spec_file, module_attrs) for c in plan.classes)
    return f'''"""{title}

Generated by lbdlc {lbdlc_version} from {Path(spec_file).name}. Needs only PyTorch.

    model = {cls}()
    model.load_state_dict(safetensors.torch.load_file("weights.safetensors"))
"""
import torch
import torch.nn.functional as F
from torch import nn
{ckpt_import}

{support}{ckpt_support}{block_classes}class {cls}(nn.Module):
    """Inputs:
{shapes}
    Outputs:
{out_shapes}
    """

    def __init__(self) -> None:
        super().__init__()
{body_init}

    def forward(self, {signature}) -> {_returns(len(results))}:
{body_forward}
        return {", ".join(results)}


Model = {cls}
'''


def write(graph: Graph, out_dir: Path, spec_file: str, description: str | None, lbdlc_version: str, checkpointing=None) -> list[Path]:
    path = out_dir / "model.py"
    path.write_text(generate(graph, spec_file, description, lbdlc_version, checkpointing), encoding="utf-8")
    return [path]
