"""Recurrent ops (rnn, lstm, gru): the three backends agree on tests/specs/recurrent_ops.yaml
for several batch sizes and sequence lengths from one build (the sequence length is symbolic
everywhere, TVM included), every output matches torch.nn.RNN/LSTM/GRU loaded with the same
weights, parameter names, shapes, counts, order and initializers are torch's, the FLOPs follow
the documented formula, the ONNX file uses the native ops at every opset profile, and mistakes
are reported at their YAML line."""
import math

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lbdlc.analysis import summarize
from lbdlc.driver import BuildOptions, build
from lbdlc.ir import symbol
from lbdlc.lower import load, lower
from lbdlc.ops import get
from lbdlc.verify import compare, random_inputs, run_onnx, run_pytorch, run_tvm

from conftest import ROOT, located
from test_parity import TOLERANCE, random_weights

SPEC = ROOT / "tests" / "specs" / "recurrent_ops.yaml"


def torch_modules() -> dict[str, nn.Module]:
    """recurrent_ops.yaml written with torch.nn (torch's default batch_first=False where the spec says so)."""
    return {
        "lstm2": nn.LSTM(6, 5, num_layers=2, batch_first=True, dropout=0.1),
        "bilstm": nn.LSTM(6, 4, batch_first=True, bidirectional=True),
        "bigru2": nn.GRU(6, 4, num_layers=2, batch_first=True, bidirectional=True),
        "rnn_relu": nn.RNN(6, 5, nonlinearity="relu", batch_first=True),
        "gru_sf": nn.GRU(5, 3, bias=False),
        "birnn_sf": nn.RNN(5, 3, num_layers=2, bidirectional=True, bias=False),
        "bilstm_sf": nn.LSTM(5, 2, num_layers=2, bidirectional=True),
    }


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("recurrent_weights") / "trained.safetensors"
    save_file(random_weights(SPEC), str(path))  # N(0, 0.25): the gates leave their linear range
    return path


@pytest.fixture(scope="module")
def recurrent_build(weights_file):
    """The file's only TVM build; every batch size and sequence length runs on it."""
    out = weights_file.parent / "build"
    build(SPEC, out, BuildOptions(weights=weights_file))
    return out


@pytest.mark.parametrize("batch, seq", [(1, 1), (2, 7), (3, 16)])
def test_backends_agree(recurrent_build, batch, seq):
    agreement = compare(recurrent_build, random_inputs(recurrent_build, {"batch": batch, "seq": seq}, seed=batch + seq))
    assert agreement.ok(TOLERANCE), agreement


@pytest.mark.parametrize("runner", [run_pytorch, run_onnx, run_tvm], ids=["pytorch", "onnx", "tvm"])
def test_every_backend_matches_torch_nn(recurrent_build, runner):
    """An oracle that is not ours: torch.nn's own modules, loaded with the built weights."""
    w = load_file(str(recurrent_build / "weights.safetensors"))
    inputs = random_inputs(recurrent_build, {"batch": 2, "seq": 9}, seed=5)
    x, xs = (torch.from_numpy(v) for v in inputs.values())
    want = []
    with torch.no_grad():
        for name, module in torch_modules().items():
            module.load_state_dict({k[len(name) + 1:]: v for k, v in w.items() if k.startswith(name + ".")})
            want.append(module.eval()(xs if name.endswith("_sf") else x)[0])
    got = runner(recurrent_build, inputs)
    assert len(got) == len(want)
    for g, r in zip(got, want):
        assert g.shape == tuple(r.shape)
        np.testing.assert_allclose(g, r.numpy(), atol=TOLERANCE, rtol=0)


def test_parameters_are_torchs():
    """Names, shapes and order of state_dict(), counts, and U(±1/sqrt(hidden)) for everything."""
    graph = lower(load(SPEC))
    layers = {layer.name: layer.params for layer in summarize(graph).layers}
    for name, module in torch_modules().items():
        assert layers[name] == sum(p.numel() for p in module.parameters()), name
        ours = [(p, graph.params[p].shape) for p in graph.params if p.startswith(name + ".")]
        theirs = [(f"{name}.{k}", tuple(t.shape)) for k, t in module.state_dict().items()]
        assert ours == theirs, name
        for p, _ in ours:
            init = graph.params[p].init
            assert init.kind == "uniform" and init.arg("bound") == pytest.approx(1 / math.sqrt(module.hidden_size)), p
    assert summarize(graph).params == 2019


def test_flops_follow_the_documented_formula():
    """2·G·H·(I_k + H) + G·H (+ 2·G·H with bias) + E·H per step, layer and direction, times batch·seq."""
    graph = lower(load(SPEC))
    batch, seq = symbol("batch"), symbol("seq")
    node = {n.name: n for n in graph.nodes}

    def flops(name):
        n = node[name]
        return get(n.op).flops(n.attrs, [v.type for v in n.inputs], [v.type for v in n.outputs])

    # lstm2: G=4, H=5, E=24; layer 0 reads 6 features, layer 1 reads 5.
    assert flops("lstm2") == batch * seq * ((2 * 20 * (6 + 5) + 60 + 120) + (2 * 20 * (5 + 5) + 60 + 120))
    # bigru2: G=3, H=4, E=17, two directions; layer 1 reads 2·4 features.
    assert flops("bigru2") == batch * seq * 2 * ((2 * 12 * (6 + 4) + 36 + 68) + (2 * 12 * (8 + 4) + 36 + 68))
    # birnn_sf: G=1, H=3, tanh E=4, no biases.
    assert flops("birnn_sf") == batch * seq * 2 * ((2 * 3 * (5 + 3) + 3 + 12) + (2 * 3 * (6 + 3) + 3 + 12))
    assert flops("rnn_relu") == batch * seq * (2 * 5 * (6 + 5) + 15 + 5)


@pytest.mark.parametrize("opset", [18, 22])
def test_onnx_uses_native_ops_and_pytorch_names(weights_file, opset):
    """One native op per stacked layer; the initializers are exactly the PyTorch-named parameters
    (the ONNX gate order and W/R/B stacking are derived in the graph)."""
    out = weights_file.parent / f"opset{opset}"
    build(SPEC, out, BuildOptions(weights=weights_file, opset=opset, backends=("pytorch", "onnx")))
    model = onnx.load(out / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    counts = {t: sum(n.op_type == t for n in model.graph.node) for t in ("LSTM", "GRU", "RNN")}
    assert counts == {"LSTM": 2 + 1 + 2, "GRU": 2 + 1, "RNN": 1 + 2}
    directions = [a.s for n in model.graph.node if n.op_type in counts for a in n.attribute if a.name == "direction"]
    assert directions.count(b"bidirectional") == 2 + 1 + 2 + 2
    assert all(a.i == 1 for n in model.graph.node if n.op_type == "GRU" for a in n.attribute if a.name == "linear_before_reset")
    params = set(lower(load(SPEC)).params)
    assert params <= {i.name for i in model.graph.initializer}
    assert model.graph.input[0].type.tensor_type.shape.dim[1].dim_param == "seq"
    agreement = compare(out, random_inputs(out, {"batch": 2, "seq": 4}, seed=opset), backends=("pytorch", "onnx"))
    assert agreement.ok(TOLERANCE), agreement


# -- mistakes, reported at their YAML line --------------------------------------------------


SEQUENCES = """\
lbdlc: 1
inputs:
  x: {shape: [batch, seq, 6]}
  flat: {shape: [batch, 6]}
layers:
"""


def check_fails(cli, path):
    code, out, err = cli("check", path)
    assert code == 2, (out, err)
    return err


def test_hidden_size_is_required(cli, write_spec):
    path = write_spec(SEQUENCES + "  - {name: r, op: lstm, num_layers: 2}\n")
    err = check_fails(cli, path)
    assert "missing required key 'hidden_size'" in located(err, path, 6, "{name")


def test_hidden_size_must_be_positive(cli, write_spec):
    path = write_spec(SEQUENCES + "  - {name: r, op: gru, hidden_size: 0}\n")
    err = check_fails(cli, path)
    assert "hidden_size: input should be greater than 0" in located(err, path, 6, "0}")


def test_input_must_be_a_batch_of_sequences(cli, write_spec):
    path = write_spec(SEQUENCES + "  - {name: r, op: gru, hidden_size: 4, in: flat}\n")
    err = check_fails(cli, path)
    assert "gru expects a rank-3 input [batch, seq, features], got [batch, 6] (rank 2)" in located(err, path, 6, "gru")
    assert "hint: a sequence without a batch dim needs one" in err


def test_declared_input_size_must_match(cli, write_spec):
    path = write_spec(SEQUENCES + "  - {name: r, op: lstm, hidden_size: 4, input_size: 7}\n")
    err = check_fails(cli, path)
    assert "input_size is 7, but the incoming tensor [batch, seq, 6] has 6" in located(err, path, 6, "7}")


def test_dropout_needs_stacked_layers(cli, write_spec):
    path = write_spec(SEQUENCES + "  - {name: r, op: rnn, hidden_size: 4, dropout: 0.5}\n")
    err = check_fails(cli, path)
    assert "dropout=0.5 applies between stacked layers, and num_layers is 1" in located(err, path, 6, "0.5")
    assert "hint: set num_layers to 2 or more" in err


def test_nonlinearity_is_tanh_or_relu(cli, write_spec):
    path = write_spec(SEQUENCES + "  - {name: r, op: rnn, hidden_size: 4, nonlinearity: sigmoid}\n")
    err = check_fails(cli, path)
    assert "'tanh' or 'relu'" in located(err, path, 6, "sigmoid")
