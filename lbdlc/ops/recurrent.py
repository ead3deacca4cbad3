"""Recurrent ops: simple RNN, LSTM and GRU, stacked and bidirectional, in PyTorch's conventions.

Each op is the torch.nn module of the same name: the same attributes, gate order, parameter
names and shapes (`weight_ih_l0` [G·H, I], `weight_hh_l0` [G·H, H], `bias_ih_l0`, `bias_hh_l0`,
`..._reverse` for the backward direction, with G = 1, 4, 3 for rnn, lstm, gru) and the same
initialisation (every weight and bias uniform in ±1/sqrt(hidden_size)). So the generated module
holds a plain nn.RNN / nn.LSTM / nn.GRU and its state_dict keys are torch's own.

    rnn:  h' = tanh(W_ih x + b_ih + W_hh h + b_hh)                  (or relu, `nonlinearity`)
    lstm: i, f, g, o = W_ih x + b_ih + W_hh h + b_hh, split in four  (row order i, f, g, o)
          c' = σ(f)·c + σ(i)·tanh(g),  h' = σ(o)·tanh(c')
    gru:  r, z = σ(W_i{r,z} x + b_i{r,z} + W_h{r,z} h + b_h{r,z})   (row order r, z, n)
          n = tanh(W_in x + b_in + r·(W_hn h + b_hn)),  h' = (1 - z)·n + z·h

Unlike torch.nn, `batch_first` defaults to true, like every other sequence op here: the input
is [batch, seq, input_size] and the output [batch, seq, D·hidden_size] (D = 2 when
bidirectional: forward and backward states side by side). With `batch_first: false` both are
[seq, batch, ...]. The initial state is zero; the output is the whole sequence of last-layer
hidden states (torch's `output`, i.e. `module(x)[0]`). The sequence length may be symbolic.

FLOPs (a multiply-add counts 2), per sequence element, per layer k and direction:
    2·G·H·(I_k + H)            the input and hidden projections (I_0 = input_size, I_k = D·H)
  + G·H (+ 2·G·H with bias)    adding the two projections and the two biases
  + E·H                        gates and state update, activations counted as in
                               elementwise.py (sigmoid, tanh 4): E = 24 (lstm), 17 (gru),
                               4 (rnn tanh), 1 (rnn relu)
times batch·seq.
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, PositiveInt

from ..ir import Init, ParamDef, TensorType, as_dim
from . import Op, OpAttrs, ShapeError, register
from .rules import check_declared


class RecurrentAttrs(OpAttrs):
    hidden_size: PositiveInt
    num_layers: PositiveInt = 1
    bidirectional: bool = False
    batch_first: bool = True  # [batch, seq, features]; note: torch.nn's default is false
    bias: bool = True
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # between stacked layers, in training only
    input_size: PositiveInt | None = None  # the input's last dim, inferred when left out


class _Recurrent(Op):
    gates: int  # G: rows of W_ih per hidden unit
    cell_flops: int  # E: elementwise work of the gates and the state update, per hidden unit
    module: str  # the torch.nn class

    def resolve(self, a, ins):
        x = ins[0]
        if x.rank != 3:
            layout = "[batch, seq, features]" if a.batch_first else "[seq, batch, features] (batch_first: false)"
            raise ShapeError(
                f"{self.name} expects a rank-3 input {layout}, got {x} (rank {x.rank})",
                hint="a sequence without a batch dim needs one: reshape it to [1, seq, features]" if x.rank == 2 else None,
            )
        size = check_declared(a.input_size, x, -1, "input_size")
        if a.dropout and a.num_layers == 1:
            raise ShapeError(
                f"dropout={a.dropout} applies between stacked layers, and num_layers is 1",
                field="dropout",
                hint="set num_layers to 2 or more, or put an `op: dropout` layer after this one",
            )
        return a.model_copy(update={"input_size": size})

    def infer(self, a, ins):
        x = ins[0]
        lead = x.shape[:2]  # [batch, seq] or [seq, batch]
        return [TensorType(lead + (self.directions(a) * a.hidden_size,), x.dtype)]

    @staticmethod
    def directions(a) -> int:
        return 2 if a.bidirectional else 1

    def layer_input_size(self, a, layer: int) -> int:
        return a.input_size if layer == 0 else self.directions(a) * a.hidden_size

    def params(self, a, ins):
        """torch.nn's parameters in torch's order: per layer, per direction, w_ih, w_hh, b_ih, b_hh."""
        init = Init("uniform", (("bound", 1.0 / math.sqrt(a.hidden_size)),))
        rows = self.gates * a.hidden_size
        p = {}
        for layer in range(a.num_layers):
            for suffix in ("", "_reverse")[: self.directions(a)]:
                p[f"weight_ih_l{layer}{suffix}"] = ParamDef((rows, self.layer_input_size(a, layer)), init)
                p[f"weight_hh_l{layer}{suffix}"] = ParamDef((rows, a.hidden_size), init)
                if a.bias:
                    p[f"bias_ih_l{layer}{suffix}"] = ParamDef((rows,), init)
                    p[f"bias_hh_l{layer}{suffix}"] = ParamDef((rows,), init)
        return p

    def cell(self, a) -> int:
        return self.cell_flops

    def flops(self, a, ins, outs):
        g, h = self.gates, a.hidden_size
        per_step = 0
        for layer in range(a.num_layers):
            projections = 2 * g * h * (self.layer_input_size(a, layer) + h)
            adds = g * h + (2 * g * h if a.bias else 0)
            per_step += self.directions(a) * (projections + adds + self.cell(a) * h)
        batch, seq = ins[0].shape[0], ins[0].shape[1]
        return as_dim(batch * seq * per_step)


@register
class RNN(_Recurrent):
    """Elman RNN h' = tanh(W_ih x + b_ih + W_hh h + b_hh) (or relu), stacked and bidirectional (nn.RNN, batch_first by default)."""

    name = "rnn"
    gates = 1
    module = "RNN"

    class Attrs(RecurrentAttrs):
        nonlinearity: Literal["tanh", "relu"] = "tanh"

    def cell(self, a) -> int:
        return 4 if a.nonlinearity == "tanh" else 1


@register
class LSTM(_Recurrent):
    """Long short-term memory, gates i, f, g, o as in nn.LSTM; stacked and bidirectional (batch_first by default)."""

    name = "lstm"
    gates = 4
    cell_flops = 24
    module = "LSTM"

    class Attrs(RecurrentAttrs):
        pass


@register
class GRU(_Recurrent):
    """Gated recurrent unit, gates r, z, n as in nn.GRU (h' = (1 - z)·n + z·h); stacked and bidirectional (batch_first by default)."""

    name = "gru"
    gates = 3
    cell_flops = 17
    module = "GRU"

    class Attrs(RecurrentAttrs):
        pass
