"""Transformer ops (embedding, position_embedding, sinusoidal_position, attention): the three
backends agree on tests/specs/transformer_ops.yaml, attention matches torch.nn.MultiheadAttention,
parameter counts are PyTorch's, and mistakes are reported at their YAML line."""
import importlib.util
import math
import sys

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from lbdlc.analysis import summarize
from lbdlc.driver import BuildOptions, build
from lbdlc.lower import load, lower
from lbdlc.ops.attention import sinusoidal_table
from lbdlc.verify import compare, random_inputs

from conftest import ROOT, located
from test_parity import TOLERANCE, random_weights

SPEC = ROOT / "tests" / "specs" / "transformer_ops.yaml"
VOCAB = 50  # num_embeddings of the spec's embedding layer
D = 16
# seq > mem, seq < mem and seq == 1: the causal cross-attention's top-left alignment matters.
SIZES = [
    {"batch": 1, "seq": 5, "mem": 3},
    {"batch": 3, "seq": 9, "mem": 12},
    {"batch": 2, "seq": 1, "mem": 7},
]


def inputs_for(out, sizes, seed):
    return random_inputs(out, sizes, seed=seed, int_high=VOCAB)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("transformer_weights") / "trained.safetensors"
    save_file(random_weights(SPEC), str(path))
    return path


@pytest.fixture(scope="module")
def transformer_build(weights_file):
    out = weights_file.parent / "build"
    build(SPEC, out, BuildOptions(weights=weights_file))
    return out


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_backends_agree(transformer_build, sizes):
    """One build, several batch sizes and sequence lengths."""
    agreement = compare(transformer_build, inputs_for(transformer_build, sizes, seed=sizes["seq"]))
    assert agreement.ok(TOLERANCE), agreement


@pytest.mark.parametrize("opset", [18, 23])
def test_onnx_opsets_agree_with_pytorch(weights_file, opset):
    """Opset 23 uses the native Attention op; below it attention is decomposed."""
    out = weights_file.parent / f"opset{opset}"
    build(SPEC, out, BuildOptions(weights=weights_file, opset=opset, backends=("pytorch", "onnx")))
    model = onnx.load(out / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    op_types = {n.op_type for n in model.graph.node}
    assert ("Attention" in op_types) == (opset >= 23)
    for sizes in SIZES[:2]:
        agreement = compare(out, inputs_for(out, sizes, seed=opset), backends=("pytorch", "onnx"))
        assert agreement.ok(TOLERANCE), agreement


def test_onnx_keeps_sequence_dims_symbolic(transformer_build):
    model = onnx.load(transformer_build / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims == {"tokens": ["batch", "seq"], "memory": ["batch", "mem", D]}


def test_parameter_names_and_counts():
    graph = lower(load(SPEC))
    layers = {layer.name: layer.params for layer in summarize(graph).layers}
    assert layers["attn"] == 4 * (D * D + D) == sum(p.numel() for p in torch.nn.MultiheadAttention(D, 4).parameters())
    assert layers["cross"] == 4 * D * D  # bias: false
    assert layers["embed"] == VOCAB * D and layers["pos"] == 32 * D and layers["sin"] == 0
    assert [n for n in graph.params if n.startswith("attn.")] == [
        f"attn.{proj}.{kind}" for proj in ("q_proj", "k_proj", "v_proj", "out_proj") for kind in ("weight", "bias")
    ]


def test_initializers_are_pytorch_defaults():
    graph = lower(load(SPEC))
    assert graph.params["embed.weight"].init.arg("std") == 1.0  # nn.Embedding: N(0, 1)
    assert graph.params["pos.weight"].init.arg("std") == 0.02
    assert graph.params["attn.q_proj.weight"].init.arg("bound") == pytest.approx(1 / math.sqrt(D))  # nn.Linear


def _generated_module(out):
    name = "_lbdlc_transformer_ops_model"
    spec = importlib.util.spec_from_file_location(name, out / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seq, seq_kv", [(6, None), (5, 7), (7, 5)], ids=["self", "cross-shorter", "cross-longer"])
def test_attention_matches_torch_multihead_attention(transformer_build, causal, seq, seq_kv):
    """An oracle that is not ours: nn.MultiheadAttention with in_proj_weight = cat(q, k, v)."""
    module = _generated_module(transformer_build)
    torch.manual_seed(0)
    ours = module.MultiHeadAttention(D, 4, causal=causal).eval()
    ref = torch.nn.MultiheadAttention(D, 4, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
        x = torch.randn(2, seq, D)
        context = x if seq_kv is None else torch.randn(2, seq_kv, D)
        # True = masked: query i may not see key j > i (top-left aligned).
        mask = torch.ones(seq, context.shape[1], dtype=torch.bool).triu(1) if causal else None
        want = ref(x, context, context, attn_mask=mask, need_weights=False)[0]
        got = ours(x) if seq_kv is None else ours(x, context)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_generated_module_uses_the_ir_parameter_names(transformer_build):
    model = _generated_module(transformer_build).Model()
    weights = load_file(str(transformer_build / "weights.safetensors"))
    assert set(model.state_dict()) == set(weights)  # the sinusoidal table is a non-persistent buffer
    assert "attn.q_proj.weight" in weights and "mix.out_proj.bias" in weights


def test_sinusoidal_table(transformer_build):
    table = sinusoidal_table(64, D)
    t, i = 3, 1
    assert table[t, 2 * i] == pytest.approx(math.sin(t / 10000 ** (2 * i / D)), abs=1e-7)
    assert table[t, 2 * i + 1] == pytest.approx(math.cos(t / 10000 ** (2 * i / D)), abs=1e-7)
    generated = _generated_module(transformer_build).SinusoidalPosition(D, max_positions=64)
    np.testing.assert_array_equal(generated.pe.numpy(), table)  # the same table in every backend
    odd = sinusoidal_table(8, 5)  # an odd width ends with a sine column
    assert odd.shape == (8, 5) and odd[2, 4] == pytest.approx(math.sin(2 / 10000 ** (4 / 5)), abs=1e-7)


# -- mistakes, reported at their YAML line --------------------------------------------------


def check_fails(cli, path):
    code, out, err = cli("check", path)
    assert code == 2, (out, err)
    return err


TOKENS = """\
lbdlc: 1
inputs:
  tokens: {shape: [batch, seq], dtype: int64}
  memory: {shape: [batch, mem, 8]}
layers:
  - {name: embed, op: embedding, num_embeddings: 10, embedding_dim: 16}
"""


def test_heads_must_divide_the_width(cli, write_spec):
    path = write_spec(TOKENS.replace("  memory: {shape: [batch, mem, 8]}\n", "") + "  - {name: attn, op: attention, heads: 3}\n")
    err = check_fails(cli, path)
    first = located(err, path, 6, "3}")
    assert "attention layer 'attn': heads=3 does not divide embed_dim 16" in first
    assert "hint: choose heads from 1, 2, 4, 8, 16" in err


def test_cross_attention_needs_the_query_width(cli, write_spec):
    path = write_spec(TOKENS + "  - {name: cross, op: attention, heads: 2, in: [embed, memory]}\n")
    err = check_fails(cli, path)
    assert "must have the query's feature size 16" in located(err, path, 7, "attention")
    assert "input 'memory' has shape [batch, mem, 8]" in err


def test_attention_takes_at_most_two_inputs(cli, write_spec):
    path = write_spec(TOKENS + "  - {name: a, op: attention, heads: 2, in: [embed, embed, embed]}\n")
    err = check_fails(cli, path)
    assert "attention takes 1 to 2 inputs, got 3" in located(err, path, 7, "[embed, embed, embed]")


def test_embedding_needs_integer_ids(cli, write_spec):
    path = write_spec(TOKENS.replace("dtype: int64", "dtype: float32").replace("  memory: {shape: [batch, mem, 8]}\n", ""))
    err = check_fails(cli, path)
    assert "embedding takes integer ids, got [batch, seq] float32" in located(err, path, 5, "embedding")
    assert "hint: declare the input with `dtype: int64`" in err


def test_fixed_sequence_longer_than_max_positions(cli, write_spec):
    text = TOKENS.replace("[batch, seq]", "[batch, 40]").replace("  memory: {shape: [batch, mem, 8]}\n", "")
    path = write_spec(text + "  - {name: pos, op: position_embedding, max_positions: 32}\n")
    err = check_fails(cli, path)
    assert "40 positions, more than max_positions=32" in located(err, path, 6, "32")
    assert "hint: set max_positions to at least 40" in err
