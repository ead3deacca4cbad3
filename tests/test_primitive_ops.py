"""Arithmetic primitives (sub, div, sqrt, rsqrt, erf, pow, affine): the three backends agree on
tests/specs/primitive_ops.yaml and match a torch reference; -O2 recognizes LayerNorm and
GELU written out from them (recognize_layer_norm, recognize_activations) as single
layer_norm / gelu nodes with the same outputs; mistakes are reported at their YAML line."""
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, located
from lbdlc.passes import PassManager
from lbdlc.passes.pipeline import LEVELS
from passes_util import inputs_for, max_diff, spec_graph
from passes_util import run_onnx as onnx_of
from passes_util import run_pytorch as pytorch_of
from test_parity import TOLERANCE

from lbdlc.driver import BuildOptions, build
from lbdlc.verify import compare, random_inputs, run_onnx, run_pytorch, run_tvm

SPEC = ROOT / "tests" / "specs" / "primitive_ops.yaml"


@pytest.fixture(scope="module")
def o0_build(tmp_path_factory):
    """The file's only TVM build, at -O0: the primitives as written in every artifact."""
    out = tmp_path_factory.mktemp("primitives") / "build"
    build(SPEC, out, BuildOptions(level=0))
    return out


@pytest.fixture(scope="module")
def fast_build(tmp_path_factory):
    """model.py and model.onnx only, at -O0 (seconds; the TVM library takes ~15 s)."""
    out = tmp_path_factory.mktemp("primitives_fast") / "build"
    build(SPEC, out, BuildOptions(level=0, backends=("pytorch", "onnx")))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3])
def test_backends_agree(o0_build, batch):
    agreement = compare(o0_build, random_inputs(o0_build, {"batch": batch, "seq": 5}, seed=30 + batch))
    assert agreement.ok(TOLERANCE), agreement


def reference(x: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
    """primitive_ops.yaml with torch's own layer_norm and gelu."""
    ln = F.layer_norm(x, (16,), eps=1e-5)
    ln2 = F.layer_norm(2 * x - 1, (16,), eps=1e-6)
    almost = v * (0.5 * torch.erf(0.7 * v) + 0.5)
    ratio = v.abs() ** 1.5 / (v ** 2 + 1).mean(dim=1, keepdim=True)
    return [F.gelu(ln), F.gelu(ln2, approximate="tanh"), ratio - almost]


def matches_reference(out, runner):
    inputs = random_inputs(out, {"batch": 2, "seq": 3}, seed=5)
    want = reference(*(torch.from_numpy(a) for a in inputs.values()))
    got = runner(out, inputs)
    assert len(got) == len(want)
    for g, r in zip(got, want):
        assert g.shape == tuple(r.shape)
        np.testing.assert_allclose(g, r.numpy(), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("runner", [run_pytorch, run_onnx], ids=["pytorch", "onnx"])
def test_pytorch_and_onnx_match_torch_reference(fast_build, runner):
    matches_reference(fast_build, runner)


@pytest.mark.slow
def test_tvm_matches_torch_reference(o0_build):
    matches_reference(o0_build, run_tvm)


def test_o2_recognizes_layer_norm_and_gelu():
    graph = spec_graph(SPEC)
    result = PassManager(LEVELS[2]).run(graph)
    log = {r.name: r for r in result.log}
    assert (log["recognize_layer_norm"].nodes_before, log["recognize_layer_norm"].nodes_after) == (38, 26)  # 2 x 7 nodes -> 2 x 1
    assert log["recognize_layer_norm"].changes == {"layer norm written out -> layer_norm": 2}
    assert (log["recognize_activations"].nodes_before, log["recognize_activations"].nodes_after) == (26, 16)  # 4 + 8 nodes -> 2
    ops = Counter(n.op for n in result.graph.nodes)
    assert ops["layer_norm"] == 2 and ops["gelu"] == 2
    norms = {n.name: n.attrs for n in result.graph.nodes if n.op == "layer_norm"}
    assert norms["ln"].eps == 1e-5 and norms["ln2"].eps == 1e-6 and not norms["ln"].elementwise_affine
    gelus = {n.name: n.attrs.approximate for n in result.graph.nodes if n.op == "gelu"}
    assert gelus == {"gelu_erf": "none", "gelu_tanh": "tanh"}
    assert ops["erf"] == 1  # the 0.7 "almost GELU" stays as written
    inputs = inputs_for(graph, {"batch": 2, "seq": 4}, seed=1)
    for run in (onnx_of, pytorch_of):
        assert max_diff(run(graph, {}, inputs), run(result.graph, {}, inputs)) <= 1e-5


def test_layer_norm_stays_when_the_deviation_is_used_elsewhere(write_spec):
    """x − mean(x) is also an output: folding it into layer_norm would lose it."""
    path = write_spec("""\
lbdlc: 1
inputs:
  x: {shape: [batch, 8]}
layers:
  - {name: mu, op: mean, dims: [-1], keepdim: true, in: x}
  - {name: dev, op: sub, in: [x, mu]}
  - {name: sq, op: mul, in: [dev, dev]}
  - {name: var, op: mean, dims: [-1], keepdim: true, in: sq}
  - {name: std, op: sqrt, in: var}
  - {name: eps, op: affine, shift: 1.0e-5, in: var}
  - {name: inv, op: rsqrt, in: eps}
  - {name: ln, op: mul, in: [dev, inv]}
outputs: [ln, dev, std]
""")
    graph = spec_graph(path)
    result = PassManager(["recognize_layer_norm"]).run(graph)
    assert [n.op for n in result.graph.nodes] == [n.op for n in graph.nodes]


def test_affine_and_pow_in_generated_code(fast_build):
    code = (fast_build / "model.py").read_text()
    assert " * 2 - 1\n" in code and " * 0.5 + 0.5\n" in code and " + 1e-05\n" in code
    assert "dev ** 2" in code and "torch.rsqrt(" in code and "torch.erf(" in code


def check_fails(cli, path):
    code, out, err = cli("check", path)
    assert code == 2, (out, err)
    return err


HEAD = "lbdlc: 1\ninputs:\n  x: {shape: [batch, 4]}\n  y: {shape: [batch, 3]}\nlayers:\n"


def test_div_shapes_must_broadcast(cli, write_spec):
    path = write_spec(HEAD + "  - {name: d, op: div, in: [x, y]}\n")
    assert "div layer 'd': shapes [batch, 4], [batch, 3] do not broadcast" in located(check_fails(cli, path), path, 6, "div")


def test_sub_takes_two_inputs(cli, write_spec):
    path = write_spec(HEAD + "  - {name: d, op: sub, in: [x, x, x]}\n")
    assert "sub takes 2 inputs, got 3" in located(check_fails(cli, path), path, 6, "[x, x, x]")


def test_pow_needs_an_exponent(cli, write_spec):
    path = write_spec(HEAD + "  - {name: p, op: pow, in: x}\n")
    assert "missing required key 'exponent'" in located(check_fails(cli, path), path, 6, "{name")
