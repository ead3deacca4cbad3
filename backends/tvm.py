"""TVM backend: the IR lowered directly to Relax with BlockBuilder, fused by the "zero"
pipeline, compiled with `tvm.compile` and exported as a shared library.

The library's `main` takes the graph inputs followed by the inference parameters in
`Graph.inference_params()` order (recorded in the manifest as `parameter_order`), so one
library serves any weights; symbolic dimensions stay symbolic (one build, any batch size).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import sympy

from lbdlc.errors import SpecError
from lbdlc.ir import Graph, Node
from lbdlc.ops.rules import axis, pair

LIBRARY = "model.tvm.so"


def _tvm():
    import tvm
    from tvm import relax, tirx

    return tvm, relax, tirx


class Lowering:
    """State while emitting one Relax function: the BlockBuilder and the symbolic dims."""

    def __init__(self, bb, symbols: dict[str, object]):
        self.bb = bb
        self.symbols = symbols

    def emit(self, expr):
        return self.bb.emit(expr)

    def prim(self, d):
        """An IR dimension (int or sympy expression) as a TIR expression over the input symbols."""
        _, _, tirx = _tvm()
        if isinstance(d, int):
            return d
        d = sympy.sympify(d)
        if d.is_Integer:
            return int(d)
        if d.is_Symbol:
            return self.symbols[str(d)]
        if d.is_Add or d.is_Mul:
            terms = [self.prim(a) for a in d.args]
            acc = terms[0]
            for t in terms[1:]:
                acc = acc + t if d.is_Add else acc * t
            return acc
        if isinstance(d, sympy.floor) and d.args[0].is_Mul:
            num, den = sympy.fraction(d.args[0])
            return tirx.floordiv(self.prim(num), self.prim(den))
        raise ValueError(f"cannot express the dimension {d} in TVM")


# (lowering, node, input Relax exprs, parameter Relax vars by local name) -> output Relax expr
Emitter = Callable[[Lowering, Node, list, dict], object]


def _R():
    from tvm.relax import op

    return op


def _linear(L, n, x, p):
    return L.emit(_R().linear(x[0], p["weight"], p.get("bias")))


def _conv2d(L, n, x, p):
    R, a = _R(), n.attrs
    ph, pw = pair(a.padding)
    y = L.emit(
        R.nn.conv2d(
            x[0], p["weight"], strides=pair(a.stride), padding=(ph, pw, ph, pw),
            dilation=pair(a.dilation), groups=a.groups, data_layout="NCHW", kernel_layout="OIHW",
        )
    )
    if "bias" in p:
        y = L.emit(R.add(y, R.reshape(p["bias"], (1, a.out_channels, 1, 1))))
    return y


def _pool(kind: str, **fixed) -> Emitter:
    def emit(L, n, x, p):
        a = n.attrs
        ph, pw = pair(a.padding)
        stride = a.stride if a.stride is not None else a.kernel_size
        fn = getattr(_R().nn, kind)
        return L.emit(fn(x[0], pool_size=pair(a.kernel_size), strides=pair(stride), padding=(ph, pw, ph, pw), layout="NCHW", **fixed))

    return emit


def _batch_norm(L, n, x, p):
    from tvm import relax

    out = L.emit(
        _R().nn.batch_norm(x[0], p["weight"], p["bias"], p["running_mean"], p["running_var"], axis=1, epsilon=n.attrs.eps, training=False)
    )
    return L.emit(relax.TupleGetItem(out, 0))


def _layer_norm(L, n, x, p):
    from tvm import relax

    size = n.attrs.normalized_shape
    gamma = p.get("weight", relax.const(np.ones(size, np.float32)))
    beta = p.get("bias", relax.const(np.zeros(size, np.float32)))
    return L.emit(_R().nn.layer_norm(x[0], gamma, beta, axes=[-1], epsilon=n.attrs.eps))


def _gelu(L, n, x, p):
    R = _R()
    return L.emit(R.nn.gelu_tanh(x[0]) if n.attrs.approximate == "tanh" else R.nn.gelu(x[0]))


def _reshape_to_output(L, n, x, p):
    return L.emit(_R().reshape(x[0], [L.prim(d) for d in n.outputs[0].type.shape]))


def _add(L, n, x, p):
    acc = x[0]
    for term in x[1:]:
        acc = L.emit(_R().add(acc, term))
    return acc


def _add_positions(L, n, x, table):
    """x + table[:seq] with a symbolic seq: take(table, arange(seq)) has the static shape
    [seq, dim] (a strided_slice gives min(seq, rows), and match_cast makes FuseTIR crash in
    TVM 0.27). mode="clip" keeps a seq beyond max_positions memory-safe (the last row repeats);
    PyTorch and ONNX Runtime raise there instead."""
    R = _R()
    positions = R.arange(0, L.prim(n.inputs[0].type.shape[1]), 1, "int64")
    return L.emit(R.add(x[0], L.emit(R.take(table, positions, axis=0, mode="clip"))))


def _sinusoidal_position(L, n, x, p):
    from tvm import relax

    from lbdlc.ops.attention import sinusoidal_table

    a = n.attrs
    return _add_positions(L, n, x, relax.const(sinusoidal_table(a.max_positions, a.embedding_dim, a.base, a.layout)))


def _attention(L, n, x, p):
    """Projections with R.linear, then R.nn.attention on [batch, seq, heads, head_dim]
    (legalized for any target; causal is its top-left-aligned mask), heads merged, out_proj."""
    R, a = _R(), n.attrs
    heads, head_dim = a.heads, a.embed_dim // a.heads
    batch, seq = (L.prim(d) for d in n.inputs[0].type.shape[:2])
    seq_kv = L.prim(n.inputs[-1].type.shape[1])

    def project(proj, src, length):
        y = L.emit(R.linear(src, p[f"{proj}.weight"], p.get(f"{proj}.bias")))
        return L.emit(R.reshape(y, [batch, length, heads, head_dim]))

    q = project("q_proj", x[0], seq)
    k = project("k_proj", x[-1], seq_kv)
    v = project("v_proj", x[-1], seq_kv)
    y = L.emit(R.nn.attention(q, k, v, causal_mask="TopLeft" if a.causal else None))
    y = L.emit(R.reshape(y, [batch, seq, a.embed_dim]))
    return L.emit(R.linear(y, p["out_proj.weight"], p.get("out_proj.bias")))


def _add_channel_bias(L, y, p, channels: int, rank: int):
    if "bias" not in p:
        return y
    return L.emit(_R().add(y, _R().reshape(p["bias"], (1, channels) + (1,) * (rank - 2))))


def _conv1d(L, n, x, p):
    R, a = _R(), n.attrs
    y = L.emit(
        R.nn.conv1d(
            x[0], p["weight"], strides=a.stride, padding=(a.padding, a.padding),
            dilation=a.dilation, groups=a.groups, data_layout="NCW", kernel_layout="OIW",
        )
    )
    return _add_channel_bias(L, y, p, a.out_channels, 3)


def _conv_transpose(L, n, x, p):
    """Weights in PyTorch's layout, [in, out/groups, k...] = IOW / IOHW; TVM legalizes a
    dilation by dilating the kernel."""
    R, a = _R(), n.attrs
    if n.inputs[0].type.rank == 3:
        y = R.nn.conv1d_transpose(
            x[0], p["weight"], strides=a.stride, padding=(a.padding, a.padding), output_padding=a.output_padding,
            dilation=a.dilation, groups=a.groups, data_layout="NCW", kernel_layout="IOW",
        )
    else:
        ph, pw = pair(a.padding)
        y = R.nn.conv2d_transpose(
            x[0], p["weight"], strides=pair(a.stride), padding=(ph, pw, ph, pw), output_padding=pair(a.output_padding),
            dilation=pair(a.dilation), groups=a.groups, data_layout="NCHW", kernel_layout="IOHW",
        )
    return _add_channel_bias(L, L.emit(y), p, a.out_channels, n.inputs[0].type.rank)


def _pool1d(kind: str, **fixed) -> Emitter:
    def emit(L, n, x, p):
        a = n.attrs
        stride = a.stride if a.stride is not None else a.kernel_size
        fn = getattr(_R().nn, kind)
        return L.emit(fn(x[0], pool_size=(a.kernel_size,), strides=(stride,), padding=(a.padding, a.padding), layout="NCW", **fixed))

    return emit


def _upsample(L, n, x, p):
    """resize2d to the output size: nearest = asymmetric + floor (PyTorch's 'nearest');
    bilinear = half_pixel, or align_corners."""
    a = n.attrs
    size = [L.prim(d) for d in n.outputs[0].type.shape[2:]]
    if a.mode == "nearest":
        modes = {"method": "nearest_neighbor", "coordinate_transformation_mode": "asymmetric", "rounding_method": "floor"}
    else:
        modes = {"method": "linear", "coordinate_transformation_mode": "align_corners" if a.align_corners else "half_pixel"}
    return L.emit(_R().image.resize2d(x[0], size, layout="NCHW", **modes))


def _channel_gamma_beta(p, channels: int):
    from tvm import relax

    gamma = p.get("weight", relax.const(np.ones(channels, np.float32)))
    beta = p.get("bias", relax.const(np.zeros(channels, np.float32)))
    return gamma, beta


def _group_norm(L, n, x, p):
    a, rank = n.attrs, n.inputs[0].type.rank
    gamma, beta = _channel_gamma_beta(p, a.num_channels)
    return L.emit(_R().nn.group_norm(x[0], gamma, beta, num_groups=a.num_groups, channel_axis=1, axes=list(range(2, rank)), epsilon=a.eps))


def _instance_norm(L, n, x, p):
    a, rank = n.attrs, n.inputs[0].type.rank
    gamma, beta = _channel_gamma_beta(p, a.num_features)
    return L.emit(_R().nn.instance_norm(x[0], gamma, beta, channel_axis=1, axes=list(range(2, rank)), epsilon=a.eps))


def _rms_norm(L, n, x, p):
    from tvm import relax

    a = n.attrs
    weight = p.get("weight", relax.const(np.ones(a.normalized_shape, np.float32)))
    return L.emit(_R().nn.rms_norm(x[0], weight, axes=[-1], epsilon=a.eps))


def _transpose(L, n, x, p):
    from lbdlc.ops.sequence import permutation

    return L.emit(_R().permute_dims(x[0], permutation(n.attrs, n.inputs[0].type.rank)))


def _select(L, n, x, p):
    from tvm import relax

    index = relax.const(np.array(n.attrs.index, np.int64))  # 0-d: take drops the axis
    return L.emit(_R().take(x[0], index, axis=n.attrs.dim % n.inputs[0].type.rank, mode="clip"))


def _cls_token(L, n, x, p):
    batch, _, dim = n.inputs[0].type.shape
    tokens = L.emit(_R().broadcast_to(p["token"], [L.prim(batch), 1, dim]))
    return L.emit(_R().concat([tokens, x[0]], axis=1))


def _mul(L, n, x, p):
    acc = x[0]
    for term in x[1:]:
        acc = L.emit(_R().multiply(acc, term))
    return acc


def _matmul(L, n, x, p):
    y = x[1]
    if n.attrs.transpose_b:
        rank = n.inputs[1].type.rank
        y = L.emit(_R().permute_dims(y, list(range(rank - 2)) + [rank - 1, rank - 2]))
    return L.emit(_R().matmul(x[0], y))


def _slice(L, n, x, p):
    """strided_slice with bounds made non-negative by the shape rule (expressions of a
    symbolic size); the rule has checked them against fixed sizes."""
    from lbdlc.ops.tensor import slice_bounds

    a = n.attrs
    d = a.dim % n.inputs[0].type.rank
    begin, end, _ = slice_bounds(a, n.inputs[0].type.shape[d])
    return L.emit(_R().strided_slice(x[0], axes=[d], begin=[L.prim(begin)], end=[L.prim(end)], strides=[a.step], assume_inbound=True))


def _split(L, n, x, p):
    """R.split at the pieces' start offsets (or into equal sections); one Relax value per output."""
    from tvm import relax

    from lbdlc.ops.tensor import split_sizes

    a, t = n.attrs, n.inputs[0].type
    sizes = split_sizes(a, t)
    if a.parts is not None:
        where = a.parts
    else:
        where = [sum(sizes[:k]) for k in range(1, len(sizes))]
    pieces = L.emit(_R().split(x[0], where, axis=axis(a.dim, t.rank)))
    return [L.emit(relax.TupleGetItem(pieces, k)) for k in range(len(sizes))]


def _graph_conv(L, n, x, p):
    """adj @ (x W^T) + b; with normalize, d * (A @ (d * y) + d * y), d = rsqrt(rowsum(A) + 1)."""
    from tvm import relax

    R, adj = _R(), x[1]
    y = L.emit(R.linear(x[0], p["weight"]))
    if n.attrs.normalize:
        rows = L.emit(R.sum(adj, axis=[-1], keepdims=True))
        d = L.emit(R.rsqrt(L.emit(R.add(rows, relax.const(1.0, "float32")))))
        dy = L.emit(R.multiply(d, y))
        y = L.emit(R.multiply(d, L.emit(R.add(L.emit(R.matmul(adj, dy)), dy))))
    else:
        y = L.emit(R.matmul(adj, y))
    return L.emit(R.add(y, p["bias"])) if "bias" in p else y


def _f32(value):
    from tvm import relax

    return relax.const(np.array(value, np.float32))


def _quick_gelu(L, n, x, p):
    R = _R()
    return L.emit(R.multiply(x[0], L.emit(R.sigmoid(L.emit(R.multiply(x[0], _f32(1.702)))))))


def _l2_normalize(L, n, x, p):
    """x / max(sqrt(sum(x·x)), eps), as F.normalize."""
    R, a = _R(), n.attrs
    d = axis(a.dim, n.inputs[0].type.rank)
    norm = L.emit(R.sqrt(L.emit(R.sum(L.emit(R.multiply(x[0], x[0])), axis=[d], keepdims=True))))
    return L.emit(R.divide(x[0], L.emit(R.maximum(norm, _f32(a.eps)))))


def _learned_scale(L, n, x, p):
    scale = L.emit(_R().exp(p["weight"])) if n.attrs.log else p["weight"]
    return L.emit(_R().multiply(x[0], scale))


def _select_at(L, n, x, p):
    R = _R()
    return L.emit(R.gather_nd(x[0], L.emit(R.expand_dims(x[1], [-1])), batch_dims=1))


def _timestep_embedding(L, n, x, p):
    from tvm import relax

    from lbdlc.ops.multimodal import timestep_frequencies

    R, a = _R(), n.attrs
    t = x[0] if n.inputs[0].type.dtype == "float32" else L.emit(R.astype(x[0], "float32"))
    freqs = relax.const(timestep_frequencies(a.embedding_dim // 2, a.max_period, a.downscale_freq_shift))
    angle = L.emit(R.multiply(L.emit(R.expand_dims(t, [-1])), freqs))
    sin, cos = L.emit(R.sin(angle)), L.emit(R.cos(angle))
    return L.emit(R.concat([cos, sin] if a.flip_sin_to_cos else [sin, cos], axis=-1))


def _recurrence_te(pre, w_hh, b_hh, *, op: str, hidden: int, reverse: bool, relu: bool = False):
    """One layer, one direction of an RNN/LSTM/GRU over a sequence of any (symbolic) length, as
    a TE extern whose TIR body is a serial loop over time (the way TVM's own cumsum is written).
    Relax itself has no loop op, only recursion through `If`, and its ops' shapes could not
    grow with the step; an unrolled loop would need a fixed sequence length.

    pre: [batch, seq, G·H] = x W_ih^T + b_ih, computed beforehand for all steps by one matmul.
    Each step: hid = h W_hh^T + b_hh (PyTorch's gate order), then the gates and the new state.
    Outputs: the states [batch, seq, H], and scratch buffers for h, hid (and c for the LSTM).
    """
    from tvm import te, tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    batch, seq, rows = pre.shape
    H = hidden

    def sigmoid(v):
        return 1.0 / (1.0 + tirx.exp(-v))

    def body(ins, outs):
        pre_, w, bias = (T.buffer_proxy(b) for b in ins)
        y, h, hid, *cell = (T.buffer_proxy(b) for b in outs)
        zero = tirx.const(0.0, pre.dtype)
        with IRBuilder() as ib:
            with T.serial(0, 1):  # a parent frame for the statements below (it is simplified away)
                with T.parallel(0, batch * H) as i:
                    h[i // H, i % H] = zero
                    if cell:
                        cell[0][i // H, i % H] = zero
                with T.serial(0, seq) as step:
                    t = seq - 1 - step if reverse else step
                    with T.parallel(0, batch * rows) as i:
                        b, j = i // rows, i % rows
                        hid[b, j] = bias[j]
                        with T.serial(0, H) as k:
                            hid[b, j] = hid[b, j] + w[j, k] * h[b, k]
                    with T.parallel(0, batch * H) as i:
                        b, j = i // H, i % H

                        def gate(g):  # input and hidden parts of gate block g
                            return pre_[b, t, g * H + j], hid[b, g * H + j]

                        if op == "lstm":
                            c = cell[0]
                            i_, f, g, o = (sum(gate(k)) for k in range(4))
                            c[b, j] = sigmoid(f) * c[b, j] + sigmoid(i_) * tirx.tanh(g)
                            h[b, j] = sigmoid(o) * tirx.tanh(c[b, j])
                        elif op == "gru":
                            r, z = sigmoid(sum(gate(0))), sigmoid(sum(gate(1)))
                            x_n, h_n = gate(2)
                            n = tirx.tanh(x_n + r * h_n)
                            h[b, j] = (1.0 - z) * n + z * h[b, j]
                        else:
                            v = sum(gate(0))
                            h[b, j] = tirx.Max(v, zero) if relu else tirx.tanh(v)
                        y[b, t, j] = h[b, j]
            return ib.get()

    shapes = [(batch, seq, H), (batch, H), (batch, rows)] + ([(batch, H)] if op == "lstm" else [])
    return te.extern(shapes, [pre, w_hh, b_hh], body, dtype=[pre.dtype] * len(shapes), name=f"{op}_recurrence")


def _recurrent(L, n, x, p):
    """Per layer and direction: one matmul for the input projections of all steps, then the
    recurrence (`_recurrence_te`); directions concatenated on the feature axis, as PyTorch."""
    from tvm import relax

    R, a = _R(), n.attrs
    rows = {"rnn": 1, "lstm": 4, "gru": 3}[n.op] * a.hidden_size
    y = x[0] if a.batch_first else L.emit(R.permute_dims(x[0], [1, 0, 2]))
    for layer in range(a.num_layers):
        outs = []
        for suffix in ("", "_reverse")[: 2 if a.bidirectional else 1]:
            pre = L.emit(R.linear(y, p[f"weight_ih_l{layer}{suffix}"], p.get(f"bias_ih_l{layer}{suffix}")))
            b_hh = p.get(f"bias_hh_l{layer}{suffix}", relax.const(np.zeros(rows, n.inputs[0].type.dtype)))
            states = L.emit(L.bb.call_te(
                _recurrence_te, pre, p[f"weight_hh_l{layer}{suffix}"], b_hh, op=n.op, hidden=a.hidden_size,
                reverse=bool(suffix), relu=getattr(a, "nonlinearity", "tanh") == "relu",
                primfunc_name_hint=f"{n.op}_recurrence",
            ))
            outs.append(L.emit(relax.TupleGetItem(states, 0)))
        y = outs[0] if len(outs) == 1 else L.emit(R.concat(outs, axis=2))
    return y if a.batch_first else L.emit(R.permute_dims(y, [1, 0, 2]))


def _fused(core: Emitter) -> Emitter:
    """fused_linear / fused_conv2d: the layer, + residual, activation; FuseOps puts the
    elementwise tail into the matmul's or the convolution's PrimFunc."""

    def emit(L, n, x, p):
        from lbdlc.ops.fused import activation_node

        y = core(L, n, x[:1], p)
        if len(x) > 1:
            y = L.emit(_R().add(y, x[1]))
        act = activation_node(n)
        return y if act is None else EMITTERS[act.op](L, act, [y], {})

    return emit


def _scaled_dot_product_attention(L, n, x, p):
    """R.nn.attention on [batch, seq, heads, head_dim]: the leading dims of q, k, v become one
    batch dim and a single head (a reshape, no data movement), and the result is reshaped back."""
    from tvm import tirx

    from lbdlc.ir import numel
    from lbdlc.ops.fused import default_scale

    R, a = _R(), n.attrs
    lead = n.inputs[0].type.shape[:-2]
    batch = L.prim(numel(lead)) if lead else 1
    q, k, v = (L.emit(R.reshape(t, [batch, L.prim(v_.type.shape[-2]), 1, L.prim(v_.type.shape[-1])]))
               for t, v_ in zip(x, n.inputs))
    y = L.emit(R.nn.attention(q, k, v, scale=tirx.FloatImm("float32", default_scale(n)), causal_mask="TopLeft" if a.causal else None))
    return L.emit(R.reshape(y, [L.prim(d) for d in n.outputs[0].type.shape]))


def _linear_q(L, n, x, p):
    """linear_q: a dequantize (nibbles split, W̄ = d·(q − z) + m) feeding R.linear; the
    dequantize depends on parameters only, so it is one fused elementwise kernel."""
    R, a = _R(), n.attrs
    from lbdlc.ops.quant import ZERO_POINT
    nb = a.in_features // 32
    from tvm import relax

    f32 = lambda v: relax.const(np.float32(v), "float32")  # noqa: E731
    q = L.emit(R.astype(p["qweight"], "float32"))
    if a.format != "q8_0":
        hi = L.emit(R.floor(R.divide(q, f32(16.0))))
        lo = L.emit(R.subtract(q, R.multiply(hi, f32(16.0))))
        q = L.emit(R.reshape(R.concat([R.expand_dims(lo, -1), R.expand_dims(hi, -1)], axis=-1), (a.out_features, nb, 32)))
    w = L.emit(R.multiply(R.subtract(q, f32(float(ZERO_POINT[a.format]))), R.expand_dims(R.astype(p["scale"], "float32"), -1)))
    if "min" in p:
        w = L.emit(R.add(w, R.expand_dims(R.astype(p["min"], "float32"), -1)))
    w = L.emit(R.reshape(w, (a.out_features, a.in_features)))
    return L.emit(R.linear(x[0], w, p.get("bias")))


def _lora_linear(L, n, x, p):
    """lora_linear: R.linear for the base, plus scale·(x Aᵀ) Bᵀ."""
    from tvm import relax

    R = _R()
    base = L.emit(R.linear(x[0], p["weight"], p.get("bias")))
    up = L.emit(R.linear(L.emit(R.linear(x[0], p["lora_A.weight"])), p["lora_B.weight"]))
    return L.emit(R.add(base, R.multiply(up, relax.const(np.float32(n.attrs.scale), "float32"))))


def _embedding_q(L, n, x, p):
    """embedding_q: take the ids' rows of the packed codes, scales (and minimums), then the
    dequantize of linear_q on those rows: W̄ = d·(q − z) + m."""
    R, a = _R(), n.attrs
    from lbdlc.ops.quant import ZERO_POINT
    from tvm import relax

    f32 = lambda v: relax.const(np.float32(v), "float32")  # noqa: E731
    take = lambda t: L.emit(R.take(t, x[0], axis=0, mode="clip"))  # noqa: E731
    lead = [L.prim(d) for d in n.inputs[0].type.shape]
    q = L.emit(R.astype(take(p["qweight"]), "float32"))
    if a.format != "q8_0":
        hi = L.emit(R.floor(R.divide(q, f32(16.0))))
        lo = L.emit(R.subtract(q, R.multiply(hi, f32(16.0))))
        q = L.emit(R.reshape(R.concat([R.expand_dims(lo, -1), R.expand_dims(hi, -1)], axis=-1), lead + [a.embedding_dim // 32, 32]))
    w = L.emit(R.multiply(R.subtract(q, f32(float(ZERO_POINT[a.format]))), R.expand_dims(R.astype(take(p["scale"]), "float32"), -1)))
    if "min" in p:
        w = L.emit(R.add(w, R.expand_dims(R.astype(take(p["min"]), "float32"), -1)))
    return L.emit(R.reshape(w, [L.prim(d) for d in n.outputs[0].type.shape]))


def _lora_linear_q(L, n, x, p):
    """lora_linear_q (QLoRA): linear_q's dequantize + R.linear for the frozen base, plus scale·(x Aᵀ) Bᵀ."""
    from tvm import relax

    R = _R()
    base = _linear_q(L, n, x, p)
    up = L.emit(R.linear(L.emit(R.linear(x[0], p["lora_A.weight"])), p["lora_B.weight"]))
    return L.emit(R.add(base, R.multiply(up, relax.const(np.float32(n.attrs.scale), "float32"))))


def _affine(L, n, x, p):
    """x * scale + shift with scalar constants (the identity parts left out)."""
    R, a, y = _R(), n.attrs, x[0]
    if a.scale != 1.0:
        y = L.emit(R.multiply(y, _f32(a.scale)))
    if a.shift != 0.0:
        y = L.emit(R.add(y, _f32(a.shift)))
    return y



EMITTERS: dict[str, Emitter] = {
    "sub": lambda L, n, x, p: L.emit(_R().subtract(x[0], x[1])),
    "div": lambda L, n, x, p: L.emit(_R().divide(x[0], x[1])),
    "sqrt": lambda L, n, x, p: L.emit(_R().sqrt(x[0])),
    "rsqrt": lambda L, n, x, p: L.emit(_R().rsqrt(x[0])),
    "erf": lambda L, n, x, p: L.emit(_R().erf(x[0])),
    "pow": lambda L, n, x, p: L.emit(_R().power(x[0], _f32(n.attrs.exponent))),
    "affine": _affine,
    "lora_linear_q": _lora_linear_q,
    "embedding_q": _embedding_q,
    "lora_linear": _lora_linear,
    "linear_q": _linear_q,
    "fused_linear": _fused(_linear),
    "fused_conv2d": _fused(_conv2d),
    "scaled_dot_product_attention": _scaled_dot_product_attention,
    "rnn": _recurrent,
    "lstm": _recurrent,
    "gru": _recurrent,
    "adaptive_avg_pool2d": lambda L, n, x, p: L.emit(_R().nn.adaptive_avg_pool2d(x[0], tuple(pair(n.attrs.output_size)), layout="NCHW")),
    "quick_gelu": _quick_gelu,
    "l2_normalize": _l2_normalize,
    "learned_scale": _learned_scale,
    "argmax": lambda L, n, x, p: L.emit(_R().argmax(x[0], axis=axis(n.attrs.dim, n.inputs[0].type.rank), keepdims=n.attrs.keepdim)),
    "select_at": _select_at,
    "timestep_embedding": _timestep_embedding,
    "split": _split,  # several outputs: returns a list, one per IR output
    "graph_conv": _graph_conv,
    "reparameterize": lambda L, n, x, p: x[0],  # inference artifact: the latent is the mean mu
    "permute": lambda L, n, x, p: L.emit(_R().permute_dims(x[0], [d % n.inputs[0].type.rank for d in n.attrs.dims])),
    "slice": _slice,
    "mean": lambda L, n, x, p: L.emit(_R().mean(x[0], axis=[axis(d, n.inputs[0].type.rank) for d in n.attrs.dims], keepdims=n.attrs.keepdim)),
    "matmul": _matmul,
    "silu": lambda L, n, x, p: L.emit(_R().nn.silu(x[0])),
    "softplus": lambda L, n, x, p: L.emit(_R().nn.softplus(x[0], beta=n.attrs.beta, threshold=n.attrs.threshold)),
    "log_softmax": lambda L, n, x, p: L.emit(_R().nn.log_softmax(x[0], axis=axis(n.attrs.dim, n.inputs[0].type.rank))),
    "mul": _mul,
    "transpose": _transpose,
    "select": _select,
    "cls_token": _cls_token,
    "conv1d": _conv1d,
    "conv_transpose1d": _conv_transpose,
    "conv_transpose2d": _conv_transpose,
    "upsample": _upsample,
    "max_pool1d": _pool1d("max_pool1d"),
    "avg_pool1d": _pool1d("avg_pool1d", count_include_pad=True),  # PyTorch's default
    "group_norm": _group_norm,
    "instance_norm": _instance_norm,
    "rms_norm": _rms_norm,
    "relu6": lambda L, n, x, p: L.emit(_R().clip(x[0], 0.0, 6.0)),
    "linear": _linear,
    "conv2d": _conv2d,
    "max_pool2d": _pool("max_pool2d"),
    "avg_pool2d": _pool("avg_pool2d", count_include_pad=True),  # PyTorch's default; TVM's is False
    "global_avg_pool2d": lambda L, n, x, p: L.emit(_R().mean(x[0], axis=[2, 3], keepdims=True)),
    "relu": lambda L, n, x, p: L.emit(_R().nn.relu(x[0])),
    "leaky_relu": lambda L, n, x, p: L.emit(_R().nn.leakyrelu(x[0], alpha=n.attrs.negative_slope)),
    "gelu": _gelu,
    "tanh": lambda L, n, x, p: L.emit(_R().tanh(x[0])),
    "sigmoid": lambda L, n, x, p: L.emit(_R().sigmoid(x[0])),
    "softmax": lambda L, n, x, p: L.emit(_R().nn.softmax(x[0], axis=axis(n.attrs.dim, n.inputs[0].type.rank))),
    "dropout": lambda L, n, x, p: x[0],  # inference artifact: dropout is the identity
    "batch_norm": _batch_norm,
    "layer_norm": _layer_norm,
    "flatten": _reshape_to_output,
    "reshape": _reshape_to_output,
    "add": _add,
    "concat": lambda L, n, x, p: L.emit(_R().concat(x, axis=axis(n.attrs.dim, n.inputs[0].type.rank))),
    # mode="clip": an id outside the vocabulary reads the nearest row instead of crashing the process
    "embedding": lambda L, n, x, p: L.emit(_R().take(p["weight"], x[0], axis=0, mode="clip")),
    "position_embedding": lambda L, n, x, p: _add_positions(L, n, x, p["weight"]),
    "sinusoidal_position": _sinusoidal_position,
    "attention": _attention,
}


def to_relax(graph: Graph):
    """An IRModule whose `main(inputs..., params...)` computes the graph."""
    tvm, relax, tirx = _tvm()
    symbols = {name: tirx.Var(name, "int64") for name in graph.symbols()}
    bb = relax.BlockBuilder()
    L = Lowering(bb, symbols)
    env: dict[int, object] = {}
    args = []
    for v in graph.inputs:
        var = relax.Var(v.name, relax.TensorType([L.prim(d) for d in v.type.shape], v.type.dtype))
        env[id(v)] = var
        args.append(var)
    param_vars = {}
    for name in graph.inference_params():
        p = graph.params[name]
        param_vars[name] = relax.Var(name, relax.TensorType(list(p.shape), p.dtype))
        args.append(param_vars[name])
    with bb.function("main", args, attrs={"num_input": len(graph.inputs)}):
        with bb.dataflow():
            for node in graph.nodes:
                if node.op not in EMITTERS:
                    raise SpecError(f"the TVM backend cannot emit op '{node.op}'", node.origin)
                local = {k: param_vars[full] for k, full in node.params.items() if full in param_vars}
                try:
                    result = EMITTERS[node.op](L, node, [env[id(v)] for v in node.inputs], local)
                    if len(node.outputs) > 1:  # multi-output ops (split) return one value per output
                        env.update((id(v), r) for v, r in zip(node.outputs, result))
                    else:
                        env[id(node.outputs[0])] = result
                except ValueError as exc:
                    raise SpecError(f"the TVM backend cannot emit layer '{node.name}': {exc}", node.origin) from None
            results = [env[id(v)] for v in graph.outputs]
            out = bb.emit_output(results[0] if len(results) == 1 else relax.Tuple(results))
        bb.emit_func_output(out)
    return bb.finalize()


def _slots_read(expr, buffer) -> set[int] | None:
    """Heap slots of `buffer` that a TIR expression loads; None if it holds a node we do not know."""
    tvm, _, tirx = _tvm()
    if isinstance(expr, tvm.ir.TensorLoad):  # what tirx.BufferLoad builds
        if expr.source.same_as(buffer) and len(expr.indices) == 1 and isinstance(expr.indices[0], tirx.IntImm):
            return {int(expr.indices[0].value)}
        return None
    if isinstance(expr, (tirx.IntImm, tirx.FloatImm, tirx.Var)):
        return set()
    children = [getattr(expr, f) for f in ("a", "b", "value", "condition", "true_value", "false_value") if hasattr(expr, f)]
    if not children:
        return None
    found: set[int] = set()
    for child in children:
        sub = _slots_read(child, buffer)
        if sub is None:
            return None
        found |= sub
    return found


def canonical_shape_funcs(mod, _ctx=None):
    """Make the library byte-reproducible.

    TVM 0.27's VMShapeLower writes the stores of its host `shape_func*` PrimFuncs in an order
    that depends on pointer hashes, so two builds of the same graph give different bytes.
    Re-order each such function's stores: dependencies first, then by heap slot.
    Functions with anything but plain slot stores are left alone.
    """
    _, _, tirx = _tvm()
    updates = {}
    for gv, func in mod.functions.items():
        if not (isinstance(func, tirx.PrimFunc) and gv.name_hint.startswith("shape_func") and isinstance(func.body, tirx.SeqStmt)):
            continue
        stores = list(func.body.seq)
        if not all(isinstance(st, tirx.BufferStore) and len(st.indices) == 1 and isinstance(st.indices[0], tirx.IntImm) for st in stores):
            continue
        heap = stores[0].buffer
        reads = [_slots_read(st.value, heap) if st.buffer.same_as(heap) else None for st in stores]
        if any(r is None for r in reads):
            continue
        pending = [(int(st.indices[0].value), r, st) for st, r in zip(stores, reads)]
        ordered = []
        while pending:
            written = {slot for slot, _, _ in pending}
            ready = [p for p in pending if not (p[1] & (written - {p[0]}))]
            chosen = min(ready, key=lambda p: p[0])
            ordered.append(chosen[2])
            pending.remove(chosen)
        updates[gv] = func.with_body(tirx.SeqStmt(ordered))
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def compile_library(graph: Graph, target="llvm", schedule: bool = True):
    """Relax -> "zero" pipeline (legalize, fuse) -> lbdlc's default CPU schedules
    (backends/tvm_schedule.py; `schedule=False` keeps TVM's naive loops) -> build pipeline
    made reproducible -> executable."""
    tvm, relax, _ = _tvm()
    mod = to_relax(graph)
    if schedule and tvm.target.Target(target).kind.name == "llvm":
        from .tvm_schedule import cpu_legalize, schedule_cpu

        mod = schedule_cpu(relax.get_pipeline("zero")(cpu_legalize(mod)), target)
    else:
        mod = relax.get_pipeline("zero")(mod)
    reproducible = tvm.transform.module_pass(canonical_shape_funcs, opt_level=0, name="CanonicalShapeFuncs")
    build_pipeline = tvm.transform.Sequential([relax.get_pipeline("default_build"), reproducible])
    return tvm.compile(mod, target=tvm.target.Target(target), relax_pipeline=build_pipeline)


def write(graph: Graph, out_dir: Path, target="llvm") -> list[Path]:
    path = out_dir / LIBRARY
    compile_library(graph, target).export_library(str(path))
    return [path]
