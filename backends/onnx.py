"""ONNX backend: the IR emitted directly with onnx.helper (no tracing), opset 18 to 23.

Initializers carry the IR's parameter names. Symbolic dimensions become `dim_param`s, so
one file serves every batch size. Training-only buffers (`num_batches_tracked`) are left out.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lbdlc.errors import SpecError
from lbdlc.ir import Graph, Node, TensorType
from lbdlc.ops.rules import axis, pair

DEFAULT_OPSET, MIN_OPSET, MAX_OPSET = 20, 18, 23
# ONNX Runtime 1.31 reads IR version <= 13; onnx 1.23 would write 14 by default.
IR_VERSION = {18: 8, 19: 9, 20: 10, 21: 10, 22: 10, 23: 11}

ONNX_DTYPES = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
    "int64": TensorProto.INT64,
    "int32": TensorProto.INT32,
    "bool": TensorProto.BOOL,
}


class Emission:
    """The graph being built: nodes, initializers, and fresh names scoped by IR node."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counter = 0

    def add(self, op_type: str, inputs: list[str], output: str, scope: str, **attrs) -> str:
        self._counter += 1
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=f"{scope}/{op_type}_{self._counter}", **attrs))
        return output

    def temp(self, scope: str, what: str) -> str:
        self._counter += 1
        return f"{scope}/{what}_{self._counter}"

    def const(self, scope: str, what: str, array: np.ndarray) -> str:
        name = self.temp(scope, what)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name


# (emission, node, input names, output name) -> None; adds nodes producing `out`.
Emitter = Callable[[Emission, Node, list[str], str], None]


def _unary(op_type: str, **fixed) -> Emitter:
    return lambda e, n, x, out: e.add(op_type, x[:1], out, n.name, **fixed)


def _linear(e, n, x, out):
    w = n.params["weight"]
    b = [n.params["bias"]] if "bias" in n.params else []
    if n.inputs[0].type.rank == 2:
        e.add("Gemm", [x[0], w, *b], out, n.name, transB=1)
        return
    wt = e.add("Transpose", [w], e.temp(n.name, "weight_t"), n.name, perm=[1, 0])
    if not b:
        e.add("MatMul", [x[0], wt], out, n.name)
        return
    y = e.add("MatMul", [x[0], wt], e.temp(n.name, "matmul"), n.name)
    e.add("Add", [y, b[0]], out, n.name)


def _conv2d(e, n, x, out):
    a = n.attrs
    ph, pw = pair(a.padding)
    inputs = [x[0], n.params["weight"]] + ([n.params["bias"]] if "bias" in n.params else [])
    e.add(
        "Conv", inputs, out, n.name,
        kernel_shape=list(pair(a.kernel_size)), strides=list(pair(a.stride)),
        pads=[ph, pw, ph, pw], dilations=list(pair(a.dilation)), group=a.groups,
    )


def _pool(op_type: str, **fixed) -> Emitter:
    def emit(e, n, x, out):
        a = n.attrs
        ph, pw = pair(a.padding)
        stride = a.stride if a.stride is not None else a.kernel_size
        e.add(op_type, x[:1], out, n.name, kernel_shape=list(pair(a.kernel_size)), strides=list(pair(stride)), pads=[ph, pw, ph, pw], **fixed)

    return emit


def _gelu(e, n, x, out):
    approximate = n.attrs.approximate
    if e.opset >= 20:
        e.add("Gelu", x[:1], out, n.name, approximate=approximate)
        return
    f32 = lambda v: np.array(v, dtype=np.float32)  # noqa: E731
    s = n.name
    if approximate == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = e.add("Mul", [e.add("Mul", [x[0], x[0]], e.temp(s, "x2"), s), x[0]], e.temp(s, "x3"), s)
        inner = e.add("Add", [x[0], e.add("Mul", [cube, e.const(s, "c", f32(0.044715))], e.temp(s, "cx3"), s)], e.temp(s, "inner"), s)
        t = e.add("Tanh", [e.add("Mul", [inner, e.const(s, "k", f32(math.sqrt(2 / math.pi)))], e.temp(s, "scaled"), s)], e.temp(s, "tanh"), s)
    else:  # 0.5 x (1 + erf(x / sqrt 2))
        t = e.add("Erf", [e.add("Div", [x[0], e.const(s, "sqrt2", f32(math.sqrt(2)))], e.temp(s, "scaled"), s)], e.temp(s, "erf"), s)
    one_plus = e.add("Add", [t, e.const(s, "one", f32(1.0))], e.temp(s, "one_plus"), s)
    half_x = e.add("Mul", [x[0], e.const(s, "half", f32(0.5))], e.temp(s, "half_x"), s)
    e.add("Mul", [half_x, one_plus], out, s)


def _batch_norm(e, n, x, out):
    p = n.params
    e.add("BatchNormalization", [x[0], p["weight"], p["bias"], p["running_mean"], p["running_var"]], out, n.name, epsilon=n.attrs.eps)


def _layer_norm(e, n, x, out):
    a = n.attrs
    if a.elementwise_affine:
        scale = n.params["weight"]
    else:
        scale = e.const(n.name, "ones", np.ones(a.normalized_shape, np.float32))
    bias = [n.params["bias"]] if "bias" in n.params else []
    e.add("LayerNormalization", [x[0], scale, *bias], out, n.name, axis=-1, epsilon=a.eps)


def reshape_target(src: tuple, dst: tuple) -> list[int]:
    """A Reshape shape tensor: fixed sizes, 0 to copy a symbolic dim in place, one -1 for the rest."""
    target = []
    for k, d in enumerate(dst):
        if isinstance(d, int):
            target.append(d)
        elif k < len(src) and d == src[k]:
            target.append(0)
        else:
            target.append(-1)
    if target.count(-1) > 1:
        raise ValueError(f"cannot express the reshape {list(src)} -> {list(dst)} with one inferred dimension")
    return target


def _reshape_to_output(e, n, x, out):
    target = reshape_target(n.inputs[0].type.shape, n.outputs[0].type.shape)
    e.add("Reshape", [x[0], e.const(n.name, "shape", np.array(target, np.int64))], out, n.name)


def _flatten(e, n, x, out):
    rank = n.inputs[0].type.rank
    if axis(n.attrs.end_dim, rank) == rank - 1:  # ONNX Flatten always ends at the last dim ...
        if axis(n.attrs.start_dim, rank) == 1 or rank == 2:  # ... and makes 2-D output
            e.add("Flatten", x[:1], out, n.name, axis=axis(n.attrs.start_dim, rank))
            return
    _reshape_to_output(e, n, x, out)


def _add(e, n, x, out):
    acc = x[0]
    for k, term in enumerate(x[1:], start=1):
        acc = e.add("Add", [acc, term], out if k == len(x) - 1 else e.temp(n.name, "sum"), n.name)


def _embedding(e, n, x, out):
    e.add("Gather", [n.params["weight"], x[0]], out, n.name, axis=0)


def _add_positions(e, n, x, table, out):
    """out = x + table[:seq], with seq read from x at run time (it is usually symbolic)."""
    s = n.name
    seq = e.add("Shape", [x[0]], e.temp(s, "seq"), s, start=1, end=2)
    zero = e.const(s, "start", np.array([0], np.int64))
    rows = e.add("Slice", [table, zero, seq, e.const(s, "axes", np.array([0], np.int64))], e.temp(s, "rows"), s)
    e.add("Add", [x[0], rows], out, s)


def _sinusoidal_position(e, n, x, out):
    from lbdlc.ops.attention import sinusoidal_table

    a = n.attrs
    table = e.const(n.name, "pe", sinusoidal_table(a.max_positions, a.embedding_dim, a.base, a.layout))
    _add_positions(e, n, x, table, out)


def _project(e, n, proj: str, x: str, out: str | None = None) -> str:
    """x W^T + b for one of attention's projections (`q_proj`, ...)."""
    s = n.name
    wt = e.add("Transpose", [n.params[f"{proj}.weight"]], e.temp(s, f"{proj}_weight_t"), s, perm=[1, 0])
    bias = n.params.get(f"{proj}.bias")
    y = e.add("MatMul", [x, wt], out if bias is None and out else e.temp(s, proj), s)
    if bias is not None:
        y = e.add("Add", [y, bias], out or e.temp(s, f"{proj}_bias"), s)
    return y


def _attention(e, n, x, out):
    """Opset 23: the native Attention op. Below: MatMul/Softmax with heads split by Reshape and
    Transpose, and for `causal` an additive mask built from the run-time lengths:
    Trilu(upper, k=1) of a [seq, seq_kv] ConstantOfShape(-inf), i.e. -inf above the diagonal."""
    a, s = n.attrs, n.name
    heads, head_dim = a.heads, a.embed_dim // a.heads
    query, context = x[0], x[-1]
    q, k, v = (_project(e, n, p, src) for p, src in (("q_proj", query), ("k_proj", context), ("v_proj", context)))
    if e.opset >= 23:
        y = e.add("Attention", [q, k, v], e.temp(s, "attention"), s, q_num_heads=heads, kv_num_heads=heads, is_causal=int(a.causal))
    else:
        split = e.const(s, "split_heads", np.array([0, 0, heads, head_dim], np.int64))  # [batch, seq, heads, head_dim]

        def heads_of(t, what, perm):
            return e.add("Transpose", [e.add("Reshape", [t, split], e.temp(s, what), s)], e.temp(s, f"{what}_t"), s, perm=perm)

        qh = heads_of(q, "q_heads", [0, 2, 1, 3])  # [batch, heads, seq, head_dim]
        kt = heads_of(k, "k_heads", [0, 2, 3, 1])  # [batch, heads, head_dim, seq_kv]
        vh = heads_of(v, "v_heads", [0, 2, 1, 3])  # [batch, heads, seq_kv, head_dim]
        scale = e.const(s, "scale", np.array(1 / math.sqrt(head_dim), np.float32))
        scores = e.add("Mul", [e.add("MatMul", [qh, kt], e.temp(s, "qk"), s), scale], e.temp(s, "scores"), s)
        if a.causal:
            lengths = [e.add("Shape", [t], e.temp(s, what), s, start=1, end=2) for t, what in ((query, "seq"), (context, "seq_kv"))]
            size = e.add("Concat", lengths, e.temp(s, "mask_shape"), s, axis=0)
            minus_inf = helper.make_tensor("value", TensorProto.FLOAT, [1], [-math.inf])
            full = e.add("ConstantOfShape", [size], e.temp(s, "minus_inf"), s, value=minus_inf)
            mask = e.add("Trilu", [full, e.const(s, "k", np.array(1, np.int64))], e.temp(s, "causal_mask"), s, upper=1)
            scores = e.add("Add", [scores, mask], e.temp(s, "masked"), s)
        probs = e.add("Softmax", [scores], e.temp(s, "probs"), s, axis=-1)
        mixed = e.add("Transpose", [e.add("MatMul", [probs, vh], e.temp(s, "pv"), s)], e.temp(s, "pv_t"), s, perm=[0, 2, 1, 3])
        y = e.add("Reshape", [mixed, e.const(s, "merge_heads", np.array([0, 0, a.embed_dim], np.int64))], e.temp(s, "merged"), s)
    _project(e, n, "out_proj", y, out)


def _conv1d(e, n, x, out):
    a = n.attrs
    inputs = [x[0], n.params["weight"]] + ([n.params["bias"]] if "bias" in n.params else [])
    e.add(
        "Conv", inputs, out, n.name,
        kernel_shape=[a.kernel_size], strides=[a.stride], pads=[a.padding, a.padding], dilations=[a.dilation], group=a.groups,
    )


def _conv_transpose(e, n, x, out):
    """ConvTranspose: the same output size as PyTorch's, with pads on both ends and output_padding at the end."""
    a = n.attrs
    one = n.inputs[0].type.rank == 3
    dims = (lambda v: [v]) if one else (lambda v: list(pair(v)))
    pads = dims(a.padding)
    inputs = [x[0], n.params["weight"]] + ([n.params["bias"]] if "bias" in n.params else [])
    e.add(
        "ConvTranspose", inputs, out, n.name,
        kernel_shape=dims(a.kernel_size), strides=dims(a.stride), pads=pads + pads,
        output_padding=dims(a.output_padding), dilations=dims(a.dilation), group=a.groups,
    )


def _pool1d(op_type: str, **fixed) -> Emitter:
    def emit(e, n, x, out):
        a = n.attrs
        stride = a.stride if a.stride is not None else a.kernel_size
        e.add(op_type, x[:1], out, n.name, kernel_shape=[a.kernel_size], strides=[stride], pads=[a.padding, a.padding], **fixed)

    return emit


def _upsample(e, n, x, out):
    """Resize over axes 2 and 3. nearest: asymmetric coordinates, floor (PyTorch's 'nearest');
    bilinear: half_pixel (align_corners=False) or align_corners."""
    a, s = n.attrs, n.name
    if a.size is not None:
        inputs = [x[0], "", "", e.const(s, "sizes", np.array(a.size, np.int64))]
    else:
        inputs = [x[0], "", e.const(s, "scales", np.array(pair(a.scale_factor), np.float32))]
    if a.mode == "nearest":
        modes = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    else:
        modes = {"mode": "linear", "coordinate_transformation_mode": "align_corners" if a.align_corners else "half_pixel"}
    e.add("Resize", inputs, out, s, axes=[2, 3], **modes)


def _channel_affine(e, n, y, out, rank):
    """y · weight + bias with [C] parameters broadcast over [N, C, *]."""
    s, c = n.name, n.inputs[0].type.shape[1]
    shape = e.const(s, "channel_shape", np.array([c] + [1] * (rank - 2), np.int64))
    w = e.add("Reshape", [n.params["weight"], shape], e.temp(s, "weight_c"), s)
    b = e.add("Reshape", [n.params["bias"], shape], e.temp(s, "bias_c"), s)
    e.add("Add", [e.add("Mul", [y, w], e.temp(s, "scaled"), s), b], out, s)


def _group_norm(e, n, x, out):
    """Opset 21+: GroupNormalization with per-channel scale and bias. Below (opset 18's
    GroupNormalization takes per-group scale and bias, and was deprecated for it): the
    channels reshaped to [N, G, -1], InstanceNormalization per group, reshaped back, and
    the per-channel affine map."""
    a, s = n.attrs, n.name
    c, g, rank = a.num_channels, a.num_groups, n.inputs[0].type.rank
    if e.opset >= 21:
        scale = n.params["weight"] if a.affine else e.const(s, "ones", np.ones(c, np.float32))
        bias = n.params["bias"] if a.affine else e.const(s, "zeros", np.zeros(c, np.float32))
        e.add("GroupNormalization", [x[0], scale, bias], out, s, num_groups=g, epsilon=a.eps)
        return
    grouped = e.add("Reshape", [x[0], e.const(s, "groups", np.array([0, g, -1], np.int64))], e.temp(s, "grouped"), s)
    ones, zeros = e.const(s, "ones", np.ones(g, np.float32)), e.const(s, "zeros", np.zeros(g, np.float32))
    normed = e.add("InstanceNormalization", [grouped, ones, zeros], e.temp(s, "normed"), s, epsilon=a.eps)
    shape = e.add("Shape", [x[0]], e.temp(s, "shape"), s)
    if not a.affine:
        e.add("Reshape", [normed, shape], out, s)
        return
    _channel_affine(e, n, e.add("Reshape", [normed, shape], e.temp(s, "ungrouped"), s), out, rank)


def _instance_norm(e, n, x, out):
    a, s = n.attrs, n.name
    scale = n.params["weight"] if a.affine else e.const(s, "ones", np.ones(a.num_features, np.float32))
    bias = n.params["bias"] if a.affine else e.const(s, "zeros", np.zeros(a.num_features, np.float32))
    e.add("InstanceNormalization", [x[0], scale, bias], out, s, epsilon=a.eps)


def _rms_norm(e, n, x, out):
    """Opset 23: RMSNormalization. Below: x / sqrt(mean(x·x, last dim) + eps) · weight."""
    a, s = n.attrs, n.name
    weight = n.params.get("weight")
    if e.opset >= 23:
        scale = weight or e.const(s, "ones", np.ones(a.normalized_shape, np.float32))
        e.add("RMSNormalization", [x[0], scale], out, s, axis=-1, epsilon=a.eps)
        return
    square = e.add("Mul", [x[0], x[0]], e.temp(s, "square"), s)
    mean = e.add("ReduceMean", [square, e.const(s, "axes", np.array([-1], np.int64))], e.temp(s, "mean_square"), s, keepdims=1)
    shifted = e.add("Add", [mean, e.const(s, "eps", np.array(a.eps, np.float32))], e.temp(s, "plus_eps"), s)
    rms = e.add("Sqrt", [shifted], e.temp(s, "rms"), s)
    if weight is None:
        e.add("Div", [x[0], rms], out, s)
        return
    e.add("Mul", [e.add("Div", [x[0], rms], e.temp(s, "normed"), s), weight], out, s)


def _transpose(e, n, x, out):
    from lbdlc.ops.sequence import permutation

    e.add("Transpose", x[:1], out, n.name, perm=permutation(n.attrs, n.inputs[0].type.rank))


def _select(e, n, x, out):
    index = e.const(n.name, "index", np.array(n.attrs.index, np.int64))  # a scalar index drops the dim
    e.add("Gather", [x[0], index], out, n.name, axis=n.attrs.dim % n.inputs[0].type.rank)


def _cls_token(e, n, x, out):
    s = n.name
    batch = e.add("Shape", x[:1], e.temp(s, "batch"), s, start=0, end=1)
    rest = e.const(s, "rest", np.array([1, n.inputs[0].type.shape[2]], np.int64))
    shape = e.add("Concat", [batch, rest], e.temp(s, "shape"), s, axis=0)
    tokens = e.add("Expand", [n.params["token"], shape], e.temp(s, "tokens"), s)
    e.add("Concat", [tokens, x[0]], out, s, axis=1)


def _silu(e, n, x, out):
    e.add("Mul", [x[0], e.add("Sigmoid", x[:1], e.temp(n.name, "sigmoid"), n.name)], out, n.name)


def _softplus(e, n, x, out):
    """PyTorch's softplus: ONNX Softplus has neither beta nor the linear region."""
    s, a = n.name, n.attrs
    beta = e.const(s, "beta", np.array(a.beta, np.float32))
    scaled = e.add("Mul", [x[0], beta], e.temp(s, "scaled"), s)
    smooth = e.add("Div", [e.add("Softplus", [scaled], e.temp(s, "softplus"), s), beta], e.temp(s, "smooth"), s)
    linear = e.add("Greater", [scaled, e.const(s, "threshold", np.array(a.threshold, np.float32))], e.temp(s, "linear"), s)
    e.add("Where", [linear, x[0], smooth], out, s)


def _mul(e, n, x, out):
    acc = x[0]
    for k, term in enumerate(x[1:], start=1):
        acc = e.add("Mul", [acc, term], out if k == len(x) - 1 else e.temp(n.name, "product"), n.name)


def _matmul(e, n, x, out):
    """MatMul; with transpose_b the second input's last two dims are swapped first."""
    y = x[1]
    if n.attrs.transpose_b:
        rank = n.inputs[1].type.rank
        perm = list(range(rank - 2)) + [rank - 1, rank - 2]
        y = e.add("Transpose", [y], e.temp(n.name, "b_t"), n.name, perm=perm)
    e.add("MatMul", [x[0], y], out, n.name)


def _slice(e, n, x, out):
    """Slice with the layer's own bounds (ONNX counts negative ones from the end, like Python);
    an open end is INT64_MAX, which ONNX clamps to the size."""
    a, s = n.attrs, n.name
    end = np.iinfo(np.int64).max if a.end is None else a.end
    inputs = [x[0]] + [e.const(s, what, np.array([v], np.int64)) for what, v in
                       (("starts", a.start), ("ends", end), ("axes", a.dim % n.inputs[0].type.rank), ("steps", a.step))]
    e.add("Slice", inputs, out, s)


def _split(e, n, x, out):
    """Split with a sizes initializer when every piece has a fixed size; `num_outputs` (opset
    18+) for equal pieces of a symbolic size (2*batch into two). One ONNX output per IR output."""
    from lbdlc.ops.tensor import split_sizes

    a, s, t = n.attrs, n.name, n.inputs[0].type
    sizes = split_sizes(a, t)
    if all(isinstance(size, int) for size in sizes):
        inputs, attrs = [x[0], e.const(s, "sizes", np.array(sizes, np.int64))], {}
    else:
        inputs, attrs = [x[0]], {"num_outputs": len(sizes)}
    e.nodes.append(helper.make_node("Split", inputs, [v.name for v in n.outputs], name=e.temp(s, "Split"),
                                    axis=axis(a.dim, t.rank), **attrs))


def _graph_conv(e, n, x, out):
    """adj @ (x W^T) + b; with normalize, D^-1/2 (A + I) D^-1/2 as d * (A @ (d * y) + d * y),
    d = 1 / sqrt(rowsum(A) + 1)."""
    s, adj = n.name, x[1]
    bias = n.params.get("bias")
    wt = e.add("Transpose", [n.params["weight"]], e.temp(s, "weight_t"), s, perm=[1, 0])
    y = e.add("MatMul", [x[0], wt], e.temp(s, "projected"), s)
    last = out if bias is None else e.temp(s, "aggregated")
    if n.attrs.normalize:
        rows = e.add("ReduceSum", [adj, e.const(s, "axes", np.array([-1], np.int64))], e.temp(s, "row_sums"), s, keepdims=1)
        degree = e.add("Add", [rows, e.const(s, "one", np.array(1.0, np.float32))], e.temp(s, "degree"), s)
        d = e.add("Reciprocal", [e.add("Sqrt", [degree], e.temp(s, "sqrt_degree"), s)], e.temp(s, "d"), s)
        dy = e.add("Mul", [d, y], e.temp(s, "dy"), s)
        summed = e.add("Add", [e.add("MatMul", [adj, dy], e.temp(s, "a_dy"), s), dy], e.temp(s, "a_plus_i_dy"), s)
        y = e.add("Mul", [d, summed], last, s)
    else:
        y = e.add("MatMul", [adj, y], last, s)
    if bias is not None:
        e.add("Add", [y, bias], out, s)


# PyTorch's gate blocks (rows of W_ih, W_hh and the biases) in ONNX's order: LSTM i,f,g,o ->
# i,o,f,c (c = g); GRU r,z,n -> z,r,h; RNN has one block.
_ONNX_GATE_ORDER = {"lstm": [0, 3, 1, 2], "gru": [1, 0, 2], "rnn": [0]}


def _gates_reordered(e, s: str, op: str, tensor: str, hidden: int) -> str:
    """A PyTorch-layout parameter [G·H, ...] with its gate blocks in ONNX's order."""
    order = _ONNX_GATE_ORDER[op]
    if len(order) == 1:
        return tensor
    blocks = [e.temp(s, "gate") for _ in order]
    e.nodes.append(helper.make_node("Split", [tensor, e.const(s, "gate_sizes", np.array([hidden] * len(order), np.int64))],
                                    blocks, name=e.temp(s, "Split"), axis=0))
    return e.add("Concat", [blocks[k] for k in order], e.temp(s, "onnx_gates"), s, axis=0)


def _recurrent(e, n, x, out):
    """The native LSTM / GRU / RNN ops, one per stacked layer, both directions in one op
    (`direction: bidirectional`). Their W, R and B inputs are derived in the graph from the
    PyTorch-named initializers (gates reordered, directions stacked, B = [b_ih, b_hh]); ONNX
    Runtime folds them once at load. ONNX Runtime runs only layout 0, [seq, batch, ...], so a
    batch-first input is transposed; Y [seq, D, batch, H] becomes [seq, batch, D·H]. GRU uses
    linear_before_reset=1: r·(W_hn h + b_hn), PyTorch's form."""
    a, s, op = n.attrs, n.name, n.op
    h = a.hidden_size
    directions = ["", "_reverse"] if a.bidirectional else [""]
    y = e.add("Transpose", x[:1], e.temp(s, "seq_first"), s, perm=[1, 0, 2]) if a.batch_first else x[0]
    zero = e.const(s, "axis0", np.array([0], np.int64))
    for layer in range(a.num_layers):
        stacked = {}
        for what in ("weight_ih", "weight_hh", "bias"):
            per_direction = []
            for suffix in directions:
                if what == "bias":
                    if not a.bias:
                        continue
                    parts = [_gates_reordered(e, s, op, n.params[f"bias_{k}_l{layer}{suffix}"], h) for k in ("ih", "hh")]
                    t = e.add("Concat", parts, e.temp(s, f"bias_l{layer}{suffix}"), s, axis=0)
                else:
                    t = _gates_reordered(e, s, op, n.params[f"{what}_l{layer}{suffix}"], h)
                per_direction.append(e.add("Unsqueeze", [t, zero], e.temp(s, f"{what}_l{layer}{suffix}"), s))
            if per_direction:
                stacked[what] = per_direction[0] if len(per_direction) == 1 else e.add(
                    "Concat", per_direction, e.temp(s, f"{what}_l{layer}"), s, axis=0)
        attrs = {"hidden_size": h, "direction": "bidirectional" if a.bidirectional else "forward"}
        if op == "gru":
            attrs["linear_before_reset"] = 1
        if op == "rnn":
            attrs["activations"] = [a.nonlinearity.capitalize()] * len(directions)
        states = e.add(op.upper(), [y, stacked["weight_ih"], stacked["weight_hh"], stacked.get("bias", "")],
                       e.temp(s, f"Y_l{layer}"), s, **attrs)  # [seq, D, batch, H]
        last = layer == a.num_layers - 1 and not a.batch_first
        target = out if last else e.temp(s, f"output_l{layer}")
        if a.bidirectional:
            t = e.add("Transpose", [states], e.temp(s, f"directions_l{layer}"), s, perm=[0, 2, 1, 3])
            y = e.add("Reshape", [t, e.const(s, "merge_directions", np.array([0, 0, 2 * h], np.int64))], target, s)
        else:
            y = e.add("Squeeze", [states, e.const(s, "direction_axis", np.array([1], np.int64))], target, s)
    if a.batch_first:
        e.add("Transpose", [y], out, s, perm=[1, 0, 2])


def _adaptive_avg_pool2d(e, n, x, out):
    """An AveragePool with kernel = stride = input / output (the op's shape rule makes it divide)."""
    from lbdlc.ops.vision import adaptive_window

    kh, kw = adaptive_window(n.attrs, n.inputs[0].type)
    e.add("AveragePool", x[:1], out, n.name, kernel_shape=[kh, kw], strides=[kh, kw])


def _quick_gelu(e, n, x, out):
    s = n.name
    scaled = e.add("Mul", [x[0], e.const(s, "k", np.array(1.702, np.float32))], e.temp(s, "scaled"), s)
    e.add("Mul", [x[0], e.add("Sigmoid", [scaled], e.temp(s, "sigmoid"), s)], out, s)


def _l2_normalize(e, n, x, out):
    """x / max(ReduceL2(x), eps), as F.normalize."""
    a, s = n.attrs, n.name
    norm = e.add("ReduceL2", [x[0], e.const(s, "axes", np.array([a.dim], np.int64))], e.temp(s, "norm"), s, keepdims=1)
    clamped = e.add("Max", [norm, e.const(s, "eps", np.array(a.eps, np.float32))], e.temp(s, "clamped"), s)
    e.add("Div", [x[0], clamped], out, s)


def _learned_scale(e, n, x, out):
    w = n.params["weight"]
    scale = e.add("Exp", [w], e.temp(n.name, "scale"), n.name) if n.attrs.log else w
    e.add("Mul", [x[0], scale], out, n.name)


def _select_at(e, n, x, out):
    """GatherND with batch_dims=1: positions [batch] become indices [batch, 1]."""
    s = n.name
    index = e.add("Unsqueeze", [x[1], e.const(s, "axes", np.array([-1], np.int64))], e.temp(s, "index"), s)
    e.add("GatherND", [x[0], index], out, s, batch_dims=1)


def _timestep_embedding(e, n, x, out):
    from lbdlc.ops.multimodal import timestep_frequencies

    a, s = n.attrs, n.name
    t = x[0]
    if n.inputs[0].type.dtype != "float32":
        t = e.add("Cast", [t], e.temp(s, "t_float"), s, to=TensorProto.FLOAT)
    freqs = e.const(s, "freqs", timestep_frequencies(a.embedding_dim // 2, a.max_period, a.downscale_freq_shift))
    column = e.add("Unsqueeze", [t, e.const(s, "axes", np.array([-1], np.int64))], e.temp(s, "t_column"), s)
    angle = e.add("Mul", [column, freqs], e.temp(s, "angle"), s)
    sin, cos = (e.add(op, [angle], e.temp(s, op.lower()), s) for op in ("Sin", "Cos"))
    e.add("Concat", [cos, sin] if a.flip_sin_to_cos else [sin, cos], out, s, axis=-1)


def _fused(core: Emitter) -> Emitter:
    """fused_linear / fused_conv2d: the layer (Gemm, or MatMul + Add, or Conv with its bias),
    then Add of the residual and the activation, the patterns ONNX Runtime's optimizer fuses
    (Conv + activation into FusedConv, MatMul + Add into Gemm, Add + Gelu into BiasGelu)."""

    def emit(e, n, x, out):
        from lbdlc.ops.fused import activation_node

        act = activation_node(n)
        y = out if act is None and len(x) == 1 else e.temp(n.name, "core")
        core(e, n, x[:1], y)
        if len(x) > 1:
            y = e.add("Add", [y, x[1]], out if act is None else e.temp(n.name, "residual"), n.name)
        if act is not None:
            EMITTERS[act.op](e, act, [y], out)

    return emit


def _scaled_dot_product_attention(e, n, x, out):
    """Opset 23 and rank 3 or 4: the native Attention op (rank 3 as one head). Otherwise
    MatMul with k transposed, Mul by the scale, the causal mask (as in `_attention`), Softmax, MatMul."""
    from lbdlc.ops.fused import default_scale

    a, s = n.attrs, n.name
    rank, scale = n.inputs[0].type.rank, default_scale(n)
    if e.opset >= 23 and rank in (3, 4):
        heads = {"q_num_heads": 1, "kv_num_heads": 1} if rank == 3 else {}
        e.add("Attention", x, out, s, scale=scale, is_causal=int(a.causal), **heads)
        return
    q, k, v = x
    kt = e.add("Transpose", [k], e.temp(s, "k_t"), s, perm=list(range(rank - 2)) + [rank - 1, rank - 2])
    scores = e.add("MatMul", [q, kt], e.temp(s, "qk"), s)
    if scale != 1.0:
        scores = e.add("Mul", [scores, e.const(s, "scale", np.array(scale, np.float32))], e.temp(s, "scores"), s)
    if a.causal:
        lengths = [e.add("Shape", [t], e.temp(s, what), s, start=rank - 2, end=rank - 1) for t, what in ((q, "seq"), (k, "seq_kv"))]
        size = e.add("Concat", lengths, e.temp(s, "mask_shape"), s, axis=0)
        minus_inf = helper.make_tensor("value", TensorProto.FLOAT, [1], [-math.inf])
        full = e.add("ConstantOfShape", [size], e.temp(s, "minus_inf"), s, value=minus_inf)
        mask = e.add("Trilu", [full, e.const(s, "k", np.array(1, np.int64))], e.temp(s, "causal_mask"), s, upper=1)
        scores = e.add("Add", [scores, mask], e.temp(s, "masked"), s)
    probs = e.add("Softmax", [scores], e.temp(s, "probs"), s, axis=-1)
    e.add("MatMul", [probs, v], out, s)


def _linear_q(e, n, x, out):
    """linear_q: com.microsoft MatMulNBits for Q4_0 and Q8_0 (inputs of rank 2 or 3); else
    (Q4_1, whose minimum is no integer zero point) the weight dequantized in the graph (codes
    split into nibbles with float arithmetic, W̄ = d·(q − z) + m), then Gemm or MatMul."""
    a, s = n.attrs, n.name
    from lbdlc.ops.quant import ZERO_POINT
    nb = a.in_features // 32
    if a.format in ("q4_0", "q8_0") and n.inputs[0].type.rank in (2, 3):
        # ONNX Runtime's MatMulNBits reads these blocks as they are: codes low nibble first,
        # scales [N, k_blocks], default zero point 2^(bits-1) (8 for Q4_0, 128 for Q8_0).
        scales = e.add("Cast", [n.params["scale"]], e.temp(s, "scale"), s, to=TensorProto.FLOAT)
        bits = 4 if a.format == "q4_0" else 8
        y = out if "bias" not in n.params else e.temp(s, "matmul")
        e.add("MatMulNBits", [x[0], n.params["qweight"], scales], y, s, domain="com.microsoft",
              K=a.in_features, N=a.out_features, bits=bits, block_size=32)
        if "bias" in n.params:
            e.add("Add", [y, n.params["bias"]], out, s)
        return
    f32 = lambda v: e.const(s, "c", np.array(v, dtype=np.float32))  # noqa: E731
    axes = e.const(s, "axes", np.array([-1], dtype=np.int64))
    q = e.add("Cast", [n.params["qweight"]], e.temp(s, "codes"), s, to=TensorProto.FLOAT)
    if a.format != "q8_0":
        hi = e.add("Floor", [e.add("Div", [q, f32(16.0)], e.temp(s, "div"), s)], e.temp(s, "hi"), s)
        lo = e.add("Sub", [q, e.add("Mul", [hi, f32(16.0)], e.temp(s, "mul"), s)], e.temp(s, "lo"), s)
        pairs = e.add("Concat", [e.add("Unsqueeze", [lo, axes], e.temp(s, "lo1"), s), e.add("Unsqueeze", [hi, axes], e.temp(s, "hi1"), s)],
                      e.temp(s, "pairs"), s, axis=-1)
        q = e.add("Reshape", [pairs, e.const(s, "shape", np.array([a.out_features, nb, 32], np.int64))], e.temp(s, "q"), s)
    w = e.add("Sub", [q, f32(ZERO_POINT[a.format])], e.temp(s, "centered"), s)
    d = e.add("Cast", [n.params["scale"]], e.temp(s, "scale"), s, to=TensorProto.FLOAT)
    w = e.add("Mul", [w, e.add("Unsqueeze", [d, axes], e.temp(s, "scale1"), s)], e.temp(s, "scaled"), s)
    if "min" in n.params:
        m = e.add("Cast", [n.params["min"]], e.temp(s, "min"), s, to=TensorProto.FLOAT)
        w = e.add("Add", [w, e.add("Unsqueeze", [m, axes], e.temp(s, "min1"), s)], e.temp(s, "shifted"), s)
    w = e.add("Reshape", [w, e.const(s, "shape", np.array([a.out_features, a.in_features], np.int64))], e.temp(s, "weight"), s)
    b = [n.params["bias"]] if "bias" in n.params else []
    if n.inputs[0].type.rank == 2:
        e.add("Gemm", [x[0], w, *b], out, s, transB=1)
        return
    wt = e.add("Transpose", [w], e.temp(s, "weight_t"), s, perm=[1, 0])
    if not b:
        e.add("MatMul", [x[0], wt], out, s)
        return
    e.add("Add", [e.add("MatMul", [x[0], wt], e.temp(s, "matmul"), s), b[0]], out, s)


def _with_adapters(base_emitter):
    """lora_linear / lora_linear_q: the base layer's emission (linear's Gemm or MatMul,
    linear_q's quantized kernel), plus scale·(x Aᵀ) Bᵀ."""

    def emit(e, n, x, out):
        s = n.name
        base = e.temp(s, "base")
        base_emitter(e, n, x, base)
        at = e.add("Transpose", [n.params["lora_A.weight"]], e.temp(s, "lora_A_t"), s, perm=[1, 0])
        bt = e.add("Transpose", [n.params["lora_B.weight"]], e.temp(s, "lora_B_t"), s, perm=[1, 0])
        h = e.add("MatMul", [x[0], at], e.temp(s, "lora_down"), s)
        d = e.add("MatMul", [h, bt], e.temp(s, "lora_up"), s)
        d = e.add("Mul", [d, e.const(s, "lora_scale", np.array(n.attrs.scale, np.float32))], e.temp(s, "lora_scaled"), s)
        e.add("Add", [base, d], out, s)

    return emit


def _embedding_q(e, n, x, out):
    """embedding_q: the ids' rows of the packed codes, scales (and minimums) gathered, then
    dequantized with float arithmetic as linear_q's Q4_1 path does: W̄ = d·(q − z) + m."""
    a, s = n.attrs, n.name
    from lbdlc.ops.quant import ZERO_POINT
    f32 = lambda v: e.const(s, "c", np.array(v, dtype=np.float32))  # noqa: E731
    axes = e.const(s, "axes", np.array([-1], dtype=np.int64))
    gather = lambda p: e.add("Gather", [n.params[p], x[0]], e.temp(s, p), s, axis=0)  # noqa: E731
    lead = e.add("Shape", [x[0]], e.temp(s, "lead"), s)
    q = e.add("Cast", [gather("qweight")], e.temp(s, "codes"), s, to=TensorProto.FLOAT)
    if a.format != "q8_0":
        hi = e.add("Floor", [e.add("Div", [q, f32(16.0)], e.temp(s, "div"), s)], e.temp(s, "hi"), s)
        lo = e.add("Sub", [q, e.add("Mul", [hi, f32(16.0)], e.temp(s, "mul"), s)], e.temp(s, "lo"), s)
        pairs = e.add("Concat", [e.add("Unsqueeze", [lo, axes], e.temp(s, "lo1"), s), e.add("Unsqueeze", [hi, axes], e.temp(s, "hi1"), s)],
                      e.temp(s, "pairs"), s, axis=-1)
        blocks = e.const(s, "blocks", np.array([a.embedding_dim // 32, 32], np.int64))
        q = e.add("Reshape", [pairs, e.add("Concat", [lead, blocks], e.temp(s, "block_shape"), s, axis=0)], e.temp(s, "q"), s)
    w = e.add("Sub", [q, f32(ZERO_POINT[a.format])], e.temp(s, "centered"), s)
    d = e.add("Cast", [gather("scale")], e.temp(s, "scale_f"), s, to=TensorProto.FLOAT)
    w = e.add("Mul", [w, e.add("Unsqueeze", [d, axes], e.temp(s, "scale1"), s)], e.temp(s, "scaled"), s)
    if "min" in n.params:
        m = e.add("Cast", [gather("min")], e.temp(s, "min_f"), s, to=TensorProto.FLOAT)
        w = e.add("Add", [w, e.add("Unsqueeze", [m, axes], e.temp(s, "min1"), s)], e.temp(s, "shifted"), s)
    dim = e.const(s, "dim", np.array([a.embedding_dim], np.int64))
    e.add("Reshape", [w, e.add("Concat", [lead, dim], e.temp(s, "out_shape"), s, axis=0)], out, s)


def _affine(e, n, x, out):
    """x * scale + shift as Mul and Add of scalar constants (an Identity when both are trivial)."""
    a, s, y = n.attrs, n.name, x[0]
    if a.scale == 1.0 and a.shift == 0.0:
        e.add("Identity", [y], out, s)
        return
    if a.scale != 1.0:
        y = e.add("Mul", [y, e.const(s, "scale", np.array(a.scale, np.float32))], out if a.shift == 0.0 else e.temp(s, "scaled"), s)
    if a.shift != 0.0:
        e.add("Add", [y, e.const(s, "shift", np.array(a.shift, np.float32))], out, s)



EMITTERS: dict[str, Emitter] = {
    "sub": lambda e, n, x, out: e.add("Sub", x[:2], out, n.name),
    "div": lambda e, n, x, out: e.add("Div", x[:2], out, n.name),
    "sqrt": _unary("Sqrt"),
    "rsqrt": lambda e, n, x, out: e.add("Reciprocal", [e.add("Sqrt", x[:1], e.temp(n.name, "sqrt"), n.name)], out, n.name),
    "erf": _unary("Erf"),
    "pow": lambda e, n, x, out: e.add("Pow", [x[0], e.const(n.name, "exponent", np.array(n.attrs.exponent, np.float32))], out, n.name),
    "affine": _affine,
    "lora_linear_q": _with_adapters(_linear_q),
    "embedding_q": _embedding_q,
    "lora_linear": _with_adapters(_linear),
    "linear_q": _linear_q,
    "fused_linear": _fused(_linear),
    "fused_conv2d": _fused(_conv2d),
    "scaled_dot_product_attention": _scaled_dot_product_attention,
    "adaptive_avg_pool2d": _adaptive_avg_pool2d,
    "quick_gelu": _quick_gelu,
    "l2_normalize": _l2_normalize,
    "learned_scale": _learned_scale,
    "argmax": lambda e, n, x, out: e.add("ArgMax", x[:1], out, n.name, axis=n.attrs.dim, keepdims=int(n.attrs.keepdim)),
    "select_at": _select_at,
    "timestep_embedding": _timestep_embedding,
    "rnn": _recurrent,
    "lstm": _recurrent,
    "gru": _recurrent,
    "split": _split,
    "graph_conv": _graph_conv,
    "reparameterize": _unary("Identity"),  # inference artifact: the latent is the mean mu
    "permute": lambda e, n, x, out: e.add("Transpose", x[:1], out, n.name, perm=[d % n.inputs[0].type.rank for d in n.attrs.dims]),
    "slice": _slice,
    "mean": lambda e, n, x, out: e.add("ReduceMean", [x[0], e.const(n.name, "axes", np.array(n.attrs.dims, np.int64))], out, n.name, keepdims=int(n.attrs.keepdim)),
    "matmul": _matmul,
    "silu": _silu,
    "softplus": _softplus,
    "log_softmax": lambda e, n, x, out: e.add("LogSoftmax", x[:1], out, n.name, axis=n.attrs.dim),
    "mul": _mul,
    "transpose": _transpose,
    "select": _select,
    "cls_token": _cls_token,
    "conv1d": _conv1d,
    "conv_transpose1d": _conv_transpose,
    "conv_transpose2d": _conv_transpose,
    "upsample": _upsample,
    "max_pool1d": _pool1d("MaxPool"),
    "avg_pool1d": _pool1d("AveragePool", count_include_pad=1),
    "group_norm": _group_norm,
    "instance_norm": _instance_norm,
    "rms_norm": _rms_norm,
    "relu6": lambda e, n, x, out: e.add("Clip", [x[0], e.const(n.name, "min", np.array(0, np.float32)), e.const(n.name, "max", np.array(6, np.float32))], out, n.name),
    "linear": _linear,
    "conv2d": _conv2d,
    "max_pool2d": _pool("MaxPool"),
    "avg_pool2d": _pool("AveragePool", count_include_pad=1),
    "global_avg_pool2d": _unary("GlobalAveragePool"),
    "relu": _unary("Relu"),
    "leaky_relu": lambda e, n, x, out: e.add("LeakyRelu", x[:1], out, n.name, alpha=n.attrs.negative_slope),
    "gelu": _gelu,
    "tanh": _unary("Tanh"),
    "sigmoid": _unary("Sigmoid"),
    "softmax": lambda e, n, x, out: e.add("Softmax", x[:1], out, n.name, axis=n.attrs.dim),
    "dropout": _unary("Identity"),  # inference artifact: dropout is the identity
    "batch_norm": _batch_norm,
    "layer_norm": _layer_norm,
    "flatten": _flatten,
    "reshape": _reshape_to_output,
    "add": _add,
    "concat": lambda e, n, x, out: e.add("Concat", x, out, n.name, axis=n.attrs.dim),
    "embedding": _embedding,
    "position_embedding": lambda e, n, x, out: _add_positions(e, n, x, n.params["weight"], out),
    "sinusoidal_position": _sinusoidal_position,
    "attention": _attention,
}

def _value_info(name: str, t: TensorType) -> onnx.ValueInfoProto:
    dims = [d if isinstance(d, int) else str(d) if d.is_Symbol else None for d in t.shape]
    return helper.make_tensor_value_info(name, ONNX_DTYPES[t.dtype], dims)


def to_onnx(graph: Graph, weights: dict, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise SpecError(f"opset {opset} is not supported", hint=f"choose an opset from {MIN_OPSET} to {MAX_OPSET}")
    e = Emission(opset)
    for node in graph.nodes:
        if node.op not in EMITTERS:
            raise SpecError(f"the ONNX backend cannot emit op '{node.op}'", node.origin)
        try:
            EMITTERS[node.op](e, node, [v.name for v in node.inputs], node.outputs[0].name)
        except ValueError as exc:
            raise SpecError(f"the ONNX backend cannot emit layer '{node.name}': {exc}", node.origin) from None
    initializers = [
        numpy_helper.from_array(np.ascontiguousarray(weights[name].numpy()), name)
        for name in graph.inference_params()
    ]
    onnx_graph = helper.make_graph(
        e.nodes,
        graph.name,
        [_value_info(v.name, v.type) for v in graph.inputs],
        [_value_info(v.name, v.type) for v in graph.outputs],
        initializer=initializers + e.initializers,
    )
    model = helper.make_model(
        onnx_graph,
        opset_imports=[helper.make_opsetid("", opset)]
        + ([helper.make_opsetid("com.microsoft", 1)] if any(n.domain == "com.microsoft" for n in e.nodes) else []),
        producer_name="lbdlc",
        ir_version=IR_VERSION[opset],
    )
    return model


def write(graph: Graph, weights: dict, out_dir: Path, opset: int = DEFAULT_OPSET) -> list[Path]:
    model = to_onnx(graph, weights, opset)
    path = out_dir / "model.onnx"
    if model.ByteSize() > 2**31 - 1024:  # protobuf's 2 GB limit: weights go to a side file
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data")
        return [path, out_dir / "model.onnx.data"]
    onnx.save_model(model, path)
    return [path]
