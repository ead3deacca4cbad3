"""graph_conv, split and reparameterize: the three backends agree on tests/specs/graph_ops.yaml
from one build at several (batch, nodes) sizes, each layer fed from inputs matches a torch
reference, multi-output wiring (`in: name.k`, whole layers in `outputs`, scoped names) works,
and mistakes are reported at their YAML line."""
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lbdlc.driver import BuildOptions, build
from lbdlc.ir import symbol
from lbdlc.lower import load, lower
from lbdlc.verify import RUNNERS, compare, random_inputs

from conftest import ROOT, located
from small_zoo import generated_module
from test_parity import TOLERANCE, random_weights

SPEC = ROOT / "tests" / "specs" / "graph_ops.yaml"
OUTPUTS = ["gc", "gcn", "gcb", "gcs", "z", "halves.0", "halves.1", "parts.0", "thirds.1", "mixed", "head.sp.0", "gated"]
BACKENDS = ("pytorch", "onnx", "tvm")


def graphs(shape, rng) -> np.ndarray:
    """Random undirected 0/1 adjacencies without self-loops (graph_conv's normalize needs A >= 0)."""
    a = np.triu((rng.random(shape) < 0.4).astype(np.float32), 1)
    return a + np.swapaxes(a, -1, -2)


def feed(build_dir, batch: int, nodes: int, seed: int) -> dict[str, np.ndarray]:
    inputs = random_inputs(build_dir, {"batch": batch, "nodes": nodes}, seed=seed)
    rng = np.random.default_rng(seed)
    inputs["adj"], inputs["adjb"] = graphs((nodes, nodes), rng), graphs((batch, nodes, nodes), rng)
    return inputs


@pytest.fixture(scope="module")
def graph_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("graph_ops")
    save_file(random_weights(SPEC), str(tmp / "trained.safetensors"))
    build(SPEC, tmp / "build", BuildOptions(weights=tmp / "trained.safetensors"))
    return tmp / "build"


@pytest.fixture(scope="module")
def outputs(graph_build):
    inputs = feed(graph_build, batch=3, nodes=5, seed=7)
    results = {b: dict(zip(OUTPUTS, map(torch.from_numpy, RUNNERS[b](graph_build, inputs)))) for b in BACKENDS}
    return {k: torch.from_numpy(v) for k, v in inputs.items()}, results, load_file(str(graph_build / "weights.safetensors"))


@pytest.mark.parametrize("sizes", [(1, 1), (2, 4), (3, 9)], ids=lambda s: f"batch{s[0]}-nodes{s[1]}")
def test_backends_agree(graph_build, sizes):
    agreement = compare(graph_build, feed(graph_build, *sizes, seed=sum(sizes)))
    assert agreement.ok(TOLERANCE), agreement


def normalized(a: torch.Tensor) -> torch.Tensor:
    """D^-1/2 (A + I) D^-1/2 written out, with D the row sums of A + I."""
    a = a + torch.eye(a.shape[-1])
    d = a.sum(-1) ** -0.5
    return d.unsqueeze(-1) * a * d.unsqueeze(-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_graph_conv_matches_torch(outputs, backend):
    inputs, results, w = outputs
    r = results[backend]
    x, adj, xb, adjb = inputs["x"], inputs["adj"], inputs["xb"], inputs["adjb"]
    close = lambda got, want: torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # noqa: E731
    close(r["gc"], adj @ F.linear(x, w["gc.weight"]) + w["gc.bias"])  # bias after the aggregation
    close(r["gcn"], normalized(adj) @ x @ w["gcn.weight"].T + w["gcn.bias"])
    close(r["gcb"], normalized(adjb) @ xb @ w["gcb.weight"].T)  # batched graphs, no bias
    close(r["gcs"], adj @ xb @ w["gcs.weight"].T + w["gcs.bias"])  # one graph for the whole batch
    proj = normalized(adjb) @ r["gcb"] @ w["head.proj.weight"].T + w["head.proj.bias"]
    close(r["head.sp.0"], proj[..., :1])
    close(r["gated"], proj[..., 1:] * r["gcs"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_pieces_match_torch(outputs, backend):
    inputs, results, _ = outputs
    r, xb = results[backend], inputs["xb"]
    first, second = torch.split(r["gc"], [2, 3], dim=-1)
    assert torch.equal(r["halves.0"], first) and torch.equal(r["halves.1"], second)
    assert torch.equal(r["parts.0"], xb)  # concat([xb, xb], 0) cut in two along the batch
    assert torch.equal(r["thirds.1"], xb[..., 2:4])
    torch.testing.assert_close(r["mixed"], F.relu(xb[..., :2] + xb[..., 4:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reparameterize_is_the_mean_at_inference(outputs, backend):
    inputs, results, _ = outputs
    assert torch.equal(results[backend]["z"], inputs["mu"])


def test_reparameterize_samples_in_training_mode(graph_build):
    model = generated_module(graph_build).train()
    inputs = {k: torch.from_numpy(v) for k, v in feed(graph_build, batch=4000, nodes=2, seed=3).items()}
    inputs["mu"] = torch.full((4000, 4), 2.0)
    inputs["logvar"] = torch.log(torch.tensor([0.25, 1.0, 4.0, 9.0])).expand(4000, 4)
    torch.manual_seed(0)
    with torch.no_grad():
        z = model(*inputs.values())[OUTPUTS.index("z")]
    torch.manual_seed(0)
    eps = torch.randn(4000, 4)
    torch.testing.assert_close(z, 2.0 + torch.tensor([0.5, 1.0, 2.0, 3.0]) * eps)
    torch.testing.assert_close(z.std(0), torch.tensor([0.5, 1.0, 2.0, 3.0]), atol=0.1, rtol=0.05)


def test_onnx_split_forms_and_full_check(graph_build):
    model = onnx.load(graph_build / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    splits = {tuple(n.output): n for n in model.graph.node if n.op_type == "Split"}
    assert set(splits) == {("halves.0", "halves.1"), ("parts.0", "parts.1"),
                           ("thirds.0", "thirds.1", "thirds.2"), ("head.sp.0", "head.sp.1")}
    attrs = lambda n: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}  # noqa: E731
    assert attrs(splits[("parts.0", "parts.1")]) == {"axis": 0, "num_outputs": 2}  # 2*batch: a symbolic size
    assert attrs(splits[("halves.0", "halves.1")]) == {"axis": 1} and len(splits[("halves.0", "halves.1")].input) == 2
    sizes = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert list(sizes[splits[("halves.0", "halves.1")].input[1]]) == [2, 3]
    assert [o.name for o in model.graph.output] == OUTPUTS[:5] + ["halves.0", "halves.1"] + OUTPUTS[7:]


def test_symbolic_shapes_params_and_flops():
    graph = lower(load(SPEC))
    batch, nodes = symbol("batch"), symbol("nodes")
    values = {v.name: v.type.shape for n in graph.nodes for v in n.outputs}
    assert values["pair"] == (2 * batch, nodes, 6)
    assert values["parts.0"] == values["parts.1"] == (batch, nodes, 6)
    assert [values[f"thirds.{k}"] for k in range(3)] == [(batch, nodes, 2)] * 3
    assert values["gcs"] == (batch, nodes, 3) and values["gc"] == (nodes, 5)
    assert "split" not in {n.op for n in graph.nodes if n.params}
    assert graph.params["gc.weight"].shape == (5, 6) and "gcb.bias" not in graph.params
    from lbdlc.analysis import summarize

    flops = {layer.name: layer.flops for layer in summarize(graph).layers}  # batch = nodes = 1
    assert flops["gc"] == 2 * 6 * 5 + 2 * 5 + 5  # project, aggregate over one node, bias
    assert flops["halves"] == 0 and flops["z"] == 0


# -- mistakes, reported at their YAML line --------------------------------------------------

BASE = """\
lbdlc: 1
inputs:
  x: {shape: [batch, 6]}
  adj: {shape: [batch, batch]}
  h: {shape: [nodes, 4]}
layers:
"""


def check(cli, write_spec, layers: str, outputs: str = ""):
    path = write_spec(BASE + layers + outputs)
    code, out, err = cli("check", path)
    return path, code, err


def fails(cli, write_spec, layers, outputs=""):
    path, code, err = check(cli, write_spec, layers, outputs)
    assert code == 2, err
    return path, err


def test_a_whole_multi_output_layer_in_outputs_means_all_its_pieces(cli, write_spec):
    path, code, err = check(cli, write_spec, "  - {name: sp, op: split, sizes: [2, 4], in: x}\n  - {op: relu, in: adj}\n",
                            "outputs: [sp, relu_1]\n")
    assert code == 0, err
    graph = lower(load(path))
    assert [v.name for v in graph.outputs] == ["sp.0", "sp.1", "relu_1"]


def test_split_sizes_must_add_up(cli, write_spec):
    path, err = fails(cli, write_spec, "  - {name: sp, op: split, dim: 1, sizes: [2, 3], in: x}\n")
    assert "sizes [2, 3] add up to 5, but dim 1 of [batch, 6] has size 6" in located(err, path, 7, "[2, 3]")
    assert "hint: make them add up to 6" in err


def test_split_parts_must_divide_a_symbolic_size(cli, write_spec):
    path, err = fails(cli, write_spec, "  - {name: sp, op: split, dim: 0, parts: 2, in: x}\n")
    assert "parts=2 does not divide dim 0 of [batch, 6] (size batch)" in located(err, path, 7, "2, in")


def test_split_sizes_on_a_symbolic_size(cli, write_spec):
    path, err = fails(cli, write_spec, "  - {name: sp, op: split, dim: 0, sizes: [1, 1], in: x}\n")
    assert "must add up to dim 0 of [batch, 6], which is symbolic (batch)" in located(err, path, 7, "[1, 1]")
    assert "use `parts: N`" in err


def test_split_needs_sizes_or_parts(cli, write_spec):
    path, err = fails(cli, write_spec, "  - {name: sp, op: split, in: x}\n")
    assert "split needs `sizes` (a list of sizes) or `parts`" in located(err, path, 7, "split")


def test_split_takes_sizes_or_parts_not_both(cli, write_spec):
    path, err = fails(cli, write_spec, "  - {name: sp, op: split, parts: 2, sizes: [3, 3], in: x}\n")
    assert "not both" in located(err, path, 7, "[3, 3]")


def test_reading_a_multi_output_layer_without_an_index(cli, write_spec):
    path, err = fails(cli, write_spec, "  - {name: sp, op: split, parts: 2, in: x}\n  - {op: add, in: [x, sp]}\n")
    assert "layer 'add_1' reads 'sp', which has 2 outputs (split); it must name one" in located(err, path, 8, "sp]")
    assert "hint: read one of them, e.g. `in: sp.0` (its outputs: sp.0, sp.1)" in err
    assert f"{path}:7:5: note: 'sp' is defined here" in err


def test_the_layer_after_a_split_must_say_which_piece_it_reads(cli, write_spec):
    path, err = fails(cli, write_spec, "  - {name: sp, op: split, parts: 2, in: x}\n  - {op: relu}\n")
    assert "layer 'relu_1' reads 'sp', which has 2 outputs (split)" in located(err, path, 8, "{op: relu}")
    assert "`in: sp.0`" in err


def test_an_index_past_the_last_piece(cli, write_spec):
    path, err = fails(cli, write_spec, "  - {name: sp, op: split, parts: 2, in: x}\n  - {op: relu, in: sp.2}\n")
    assert "'sp' has 2 outputs, sp.0, sp.1; there is no 'sp.2'" in located(err, path, 8, "sp.2")


def test_an_index_on_a_single_output_layer(cli, write_spec):
    path, err = fails(cli, write_spec, "  - {name: r, op: relu, in: x}\n  - {op: relu, in: r.0}\n")
    assert "'r' has one output; there is no 'r.0'" in located(err, path, 8, "r.0")
    assert "hint: read it as 'r'" in err


def test_an_index_past_the_last_piece_in_outputs(cli, write_spec):
    path, err = fails(cli, write_spec, "  - {name: sp, op: split, parts: 3, in: x}\n", "outputs: [sp.3]\n")
    assert "'sp' has 3 outputs, sp.0, sp.1, sp.2; there is no 'sp.3'" in located(err, path, 8, "sp.3")


def test_graph_conv_adjacency_must_match_the_nodes(cli, write_spec):
    path, err = fails(cli, write_spec, "  - {name: g, op: graph_conv, out_features: 3, in: [h, adj]}\n")
    first = located(err, path, 7, "graph_conv")
    assert "the adjacency [batch, batch] is over batch nodes, but the features [nodes, 4] have nodes" in first
    assert "`in: [features, adjacency]`" in err


def test_graph_conv_adjacency_must_be_square(cli, write_spec):
    path, err = fails(cli, write_spec, "  - {name: g, op: graph_conv, out_features: 3, in: [h, x]}\n")
    assert "the adjacency [batch, 6] is not square" in located(err, path, 7, "graph_conv")


def test_graph_conv_in_features_must_match(cli, write_spec):
    path, err = fails(cli, write_spec, "  - {name: g, op: graph_conv, in_features: 5, out_features: 3, in: [x, adj]}\n")
    assert "in_features is 5, but the incoming tensor [batch, 6] has 6" in located(err, path, 7, "5")


def test_graph_conv_takes_two_inputs(cli, write_spec):
    path, err = fails(cli, write_spec, "  - {name: g, op: graph_conv, out_features: 3, in: x}\n")
    assert "graph_conv takes 2 inputs, got 1" in located(err, path, 7, "{name")  # `in: x` is the default here
    assert "hint: list its inputs with `in: [a, b]`" in err


def test_reparameterize_needs_equal_shapes(cli, write_spec):
    path, err = fails(cli, write_spec, "  - {name: m, op: linear, out_features: 4, in: x}\n  - {name: z, op: reparameterize, in: [m, x]}\n")
    assert "mu [batch, 4] and logvar [batch, 6] must have the same shape" in located(err, path, 8, "reparameterize")
