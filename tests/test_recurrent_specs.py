"""specs/lstm_lm.yaml and specs/gru_seq2seq.yaml: parameter counts equal to the same models
built from torch.nn modules (and to BOOK.md's per-layer formulas), output shapes, and, at a
small size set by overrides alone, agreement of the three backends and of the generated module
with a hand-written torch.nn model holding the same weights."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lbdlc.driver import BuildOptions, build
from lbdlc.verify import compare, random_inputs, run_pytorch

from conftest import SPECS
from test_parity import TOLERANCE

LM_TINY = ("vocab=40", "emb=10", "hidden=12")
S2S_TINY = ("src_vocab=30", "tgt_vocab=20", "emb=8", "enc_hidden=6")


def report(cli, spec, *overrides):
    code, out, err = cli("check", SPECS / spec, "--json", *(a for o in overrides for a in ("--set", o)))
    assert code == 0, err
    return json.loads(out)


def count(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def lstm_layer(h: int, i: int) -> int:
    """BOOK.md: 4(H·I + H² + 2H) per LSTM layer and direction (PyTorch's two bias vectors)."""
    return 4 * (h * i + h * h + 2 * h)


def gru_layer(h: int, i: int) -> int:
    return 3 * (h * i + h * h + 2 * h)


# -- lstm_lm.yaml ----------------------------------------------------------------------------


def test_lstm_lm_medium_counts_as_torch_nn(cli):
    r = report(cli, "lstm_lm.yaml")
    torch_model = count(nn.Embedding(10000, 650), nn.LSTM(650, 650, num_layers=2), nn.Linear(650, 10000))
    assert r["params"] == torch_model == 19_780_400
    assert r["params"] == 10000 * 650 + 2 * lstm_layer(650, 650) + (650 * 10000 + 10000)
    assert r["outputs"] == [{"name": "head", "shape": ["batch", "seq", 10000], "dtype": "float32"}]


def test_lstm_lm_tied_head(cli):
    """The head shares the embedding matrix (and has no bias): the head adds no parameters."""
    r = report(cli, "lstm_lm.yaml", "tie=true")
    assert r["params"] == count(nn.Embedding(10000, 650), nn.LSTM(650, 650, num_layers=2)) == 13_270_400
    assert r["outputs"][0]["shape"] == ["batch", "seq", 10000]


def test_lstm_lm_large_by_override(cli):
    r = report(cli, "lstm_lm.yaml", "emb=1500", "hidden=1500", "dropout=0.65")
    assert r["params"] == count(nn.Embedding(10000, 1500), nn.LSTM(1500, 1500, num_layers=2), nn.Linear(1500, 10000))


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """The module's LSTM build with TVM (emb != hidden, so the two layers read different sizes)."""
    return build(SPECS / "lstm_lm.yaml", tmp_path_factory.mktemp("lstm_lm") / "out", BuildOptions(overrides=LM_TINY)).out_dir


@pytest.mark.parametrize("batch, seq", [(1, 1), (3, 11)])
def test_tiny_lstm_lm_backends_agree(tiny_lm, batch, seq):
    agreement = compare(tiny_lm, random_inputs(tiny_lm, {"batch": batch, "seq": seq}, seed=seq, int_high=40))
    assert agreement.ok(TOLERANCE), agreement


def test_tiny_lstm_lm_matches_torch_nn(tiny_lm):
    w = load_file(str(tiny_lm / "weights.safetensors"))
    lstm = nn.LSTM(10, 12, num_layers=2, batch_first=True)
    lstm.load_state_dict({k.removeprefix("lstm."): v for k, v in w.items() if k.startswith("lstm.")})
    inputs = random_inputs(tiny_lm, {"batch": 2, "seq": 6}, seed=4, int_high=40)
    with torch.no_grad():
        x = F.embedding(torch.from_numpy(inputs["tokens"]), w["embed.weight"])
        want = F.linear(lstm.eval()(x)[0], w["head.weight"], w["head.bias"])
    (got,) = run_pytorch(tiny_lm, inputs)
    assert got.shape == (2, 6, 40)
    np.testing.assert_allclose(got, want.numpy(), atol=TOLERANCE, rtol=0)


def test_tiny_tied_lstm_lm_agrees(tmp_path):
    """Tying by override: one matrix in the weights file, the same function in PyTorch and ONNX."""
    out = build(SPECS / "lstm_lm.yaml", tmp_path / "out",
                BuildOptions(overrides=("vocab=40", "emb=12", "hidden=12", "tie=true"), backends=("pytorch", "onnx"))).out_dir
    assert "tied_head.weight" not in load_file(str(out / "weights.safetensors"))
    agreement = compare(out, random_inputs(out, {"batch": 2, "seq": 5}, int_high=40), backends=("pytorch", "onnx"))
    assert agreement.ok(TOLERANCE), agreement


# -- gru_seq2seq.yaml --------------------------------------------------------------------------


def test_gru_seq2seq_counts_as_torch_nn(cli):
    r = report(cli, "gru_seq2seq.yaml")
    torch_model = count(
        nn.Embedding(10000, 256), nn.GRU(256, 256, bidirectional=True),  # encoder
        nn.Embedding(10000, 256), nn.GRU(256, 512),  # decoder
        nn.Linear(512, 512, bias=False), nn.Linear(1024, 512, bias=False),  # W_a, W_c
        nn.Linear(512, 10000),  # head
    )
    assert r["params"] == torch_model == 13_008_656
    assert r["params"] == (2 * 10000 * 256 + 2 * gru_layer(256, 256) + gru_layer(512, 256)
                           + 512 * 512 + 1024 * 512 + 512 * 10000 + 10000)
    assert r["outputs"] == [{"name": "head", "shape": ["batch", "tgt_len", 10000], "dtype": "float32"}]
    shapes = {layer["name"]: layer["output_shape"] for layer in r["layers"]}
    assert shapes["encoder"] == ["batch", "src_len", 512]
    assert shapes["attn_weights"] == ["batch", "tgt_len", "src_len"]


@pytest.fixture(scope="module")
def tiny_seq2seq(tmp_path_factory):
    """The module's GRU build with TVM; source and target lengths are separate symbols."""
    return build(SPECS / "gru_seq2seq.yaml", tmp_path_factory.mktemp("seq2seq") / "out", BuildOptions(overrides=S2S_TINY)).out_dir


@pytest.mark.parametrize("batch, src_len, tgt_len", [(1, 1, 1), (2, 9, 4), (3, 3, 8)])
def test_tiny_seq2seq_backends_agree(tiny_seq2seq, batch, src_len, tgt_len):
    sizes = {"batch": batch, "src_len": src_len, "tgt_len": tgt_len}
    agreement = compare(tiny_seq2seq, random_inputs(tiny_seq2seq, sizes, seed=src_len, int_high=20))
    assert agreement.ok(TOLERANCE), agreement


def test_tiny_seq2seq_matches_torch_nn(tiny_seq2seq):
    """Luong attention written out with torch.nn.GRU and the same weights."""
    w = load_file(str(tiny_seq2seq / "weights.safetensors"))

    def gru(name, module):
        module.load_state_dict({k.removeprefix(name + "."): v for k, v in w.items() if k.startswith(name + ".")})
        return module.eval()

    encoder = gru("encoder", nn.GRU(8, 6, batch_first=True, bidirectional=True))
    decoder = gru("decoder", nn.GRU(8, 12, batch_first=True))
    inputs = random_inputs(tiny_seq2seq, {"batch": 2, "src_len": 7, "tgt_len": 5}, seed=9, int_high=20)
    src, tgt = (torch.from_numpy(v) for v in inputs.values())
    with torch.no_grad():
        hs = encoder(F.embedding(src, w["src_embed.weight"]))[0]  # [2, 7, 12]
        ht = decoder(F.embedding(tgt, w["tgt_embed.weight"]))[0]  # [2, 5, 12]
        scores = ht @ (hs @ w["attn_keys.weight"].T).transpose(1, 2)  # h_t^T W_a h_s
        context = torch.softmax(scores, dim=-1) @ hs
        attentional = torch.tanh(torch.cat([context, ht], dim=-1) @ w["attn_combine.weight"].T)
        want = F.linear(attentional, w["head.weight"], w["head.bias"])
    (got,) = run_pytorch(tiny_seq2seq, inputs)
    assert got.shape == (2, 5, 20)
    np.testing.assert_allclose(got, want.numpy(), atol=TOLERANCE, rtol=0)
