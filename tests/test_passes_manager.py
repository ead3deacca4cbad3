"""The pass infrastructure: the manager's verification and log, the pattern rewriter, levels,
the spec's `compile:` section and the command line (`lbdlc passes`, -O, --passes,
--print-passes), and the refusal of inference-only passes where model.py trains."""
import json
from dataclasses import replace

import pytest
import torch

from lbdlc.errors import SpecError
from lbdlc.ir import Param, TensorType, Value
from lbdlc.passes import LEVELS, PASSES, Pass, PassManager
from lbdlc.passes.manager import PassError
from lbdlc.passes.pattern import P, Rewrite, match_at, rewrite

from conftest import SPECS, located
from passes_util import TOLERANCE, before_after, inputs_for, spec_graph

GPT = ("vocab=64", "ctx=16", "n_layer=2", "d_model=32", "n_head=4")


def graph_of(write_spec, text):
    return spec_graph(write_spec(text))


# --- the manager -------------------------------------------------------------------------

class Breaks(Pass):
    """A pass that breaks the graph in a way the manager must notice."""

    name, description = "breaks", "test"

    def __init__(self, how):
        self.how = how

    def run(self, graph, ctx):
        n = graph.nodes[0]
        if self.how == "type":  # out_features changed, output type left as it was
            n.attrs = n.attrs.model_copy(update={"out_features": 7})
        elif self.how == "dangling":  # a node reads a value nothing produces
            graph.nodes[1].inputs = [Value("ghost", n.outputs[0].type)]
        elif self.how == "param":  # a parameter created without declaring changes_weights
            full = n.params["weight"]
            graph.params[full] = replace(graph.params[full], init=replace(graph.params[full].init, kind="zeros"))
        elif self.how == "unused":
            graph.params["stray"] = Param(name="stray", shape=(1,), init=graph.params[n.params["weight"]].init)
        return graph


@pytest.mark.parametrize("how,message", [
    ("type", "output fc1 is typed [batch, 25] float32, its op infers [batch, 7] float32"),
    ("dangling", "input ghost is used before it is defined"),
    ("param", "created or changed parameter fc1.weight without declaring changes_weights"),
    ("unused", "parameters no node uses: stray"),
])
def test_manager_catches_a_broken_graph(how, message):
    graph = spec_graph(SPECS / "mlp.yaml")
    with pytest.raises(PassError, match="pass 'breaks' broke the graph") as info:
        PassManager([Breaks(how)]).run(graph)
    assert message in str(info.value)


def test_manager_leaves_its_input_alone_and_logs_each_pass():
    from conftest import perturbed_weights

    overrides = ("inputs.image.shape=[batch, 3, 32, 32]", "classes=10")
    graph = spec_graph(SPECS / "mobilenet_v2.yaml", overrides)
    weights = perturbed_weights(SPECS / "mobilenet_v2.yaml", overrides)
    before = [(n.op, n.name, list(n.inputs)) for n in graph.nodes], dict(graph.params), dict(weights)
    result = PassManager(LEVELS[2]).run(graph, weights)
    assert [(n.op, n.name, list(n.inputs)) for n in graph.nodes] == before[0]
    assert graph.params == before[1] and all(weights[k] is v for k, v in before[2].items())
    assert [r.name for r in result.log] == LEVELS[2]
    fold = next(r for r in result.log if r.name == "fold_batch_norm")
    bns = sum(n.op == "batch_norm" for n in graph.nodes)
    assert bns == 52 and fold.nodes_after == fold.nodes_before - bns
    assert fold.params_before - fold.params_after == 2 * sum(n.attrs.num_features for n in graph.nodes if n.op == "batch_norm") - \
        sum(n.attrs.out_channels for n in graph.nodes if n.op == "conv2d" and not n.attrs.bias)
    assert fold.seconds > 0 and "seconds" not in fold.to_json(timings=False)
    first, last = result.log[0], result.log[-1]
    assert first.nodes_before == len(graph.nodes) and last.nodes_after == len(result.graph.nodes) < len(graph.nodes) - bns


def test_unknown_pass_name_in_code():
    with pytest.raises(KeyError):
        PassManager(["fold_batchnorm"])


# --- the pattern rewriter ------------------------------------------------------------------

PRIMITIVES = """lbdlc: 1
inputs:
  x: {shape: [batch, 8]}
layers:
  - {name: fc, op: linear, out_features: 8}
  - {name: gate, op: sigmoid}
  - {name: swish, op: mul, in: [fc, gate]}
  - {name: gate2, op: sigmoid, in: swish}
  - {name: swish2, op: mul, in: [gate2, swish]}        # the other order
  - {name: gate3, op: sigmoid, in: swish2}
  - {name: not_swish, op: mul, in: [gate3, fc]}        # sigmoid of another value: stays
outputs: [swish2, not_swish]
"""


def test_recognize_silu_from_primitives(write_spec):
    graph = graph_of(write_spec, PRIMITIVES)
    weights = {n: torch.randn(p.shape) for n, p in graph.params.items()}
    x = inputs_for(graph)
    for backend in ("onnx", "pytorch"):
        result, diff = before_after(graph, weights, ["recognize_activations"], x, backend)
        assert diff <= TOLERANCE
    assert result.log[0].changes == {"x·sigmoid(x) -> silu": 2}
    assert [n.op for n in result.graph.nodes] == ["linear", "silu", "silu", "sigmoid", "mul"]
    assert [n.name for n in result.graph.nodes][1:3] == ["swish", "swish2"]  # the mul's names (and outputs)


def test_single_use_and_repeated_names(write_spec):
    graph = graph_of(write_spec, PRIMITIVES.replace("outputs: [swish2, not_swish]", "outputs: [swish2, not_swish, gate]"))
    result = PassManager(["recognize_activations"]).run(graph)
    # `gate` is a graph output: removing it would change the outputs, so the first x·sigmoid(x) stays.
    assert [n.op for n in result.graph.nodes] == ["linear", "sigmoid", "mul", "silu", "sigmoid", "mul"]
    pattern = P("mul", "x", P("sigmoid", "x"), commutative=True)
    fc, last = graph.nodes[0], graph.nodes[-1]
    assert match_at(pattern, last, graph) is None  # sigmoid(gate3's input) is not sigmoid(fc)
    assert match_at(P("linear", "x"), fc, graph).values["x"] is graph.inputs[0]


def test_rewrite_replaces_and_keeps_the_roots_outputs(write_spec):
    graph = graph_of(write_spec, PRIMITIVES)
    from lbdlc.passes.pattern import fuse

    outputs = [v for v in graph.outputs]
    rule = Rewrite(P("sigmoid", P("linear", "x", name="fc"), name="act"),
                   lambda m: [fuse(m["fc"], "fused_linear", m.root, activation="sigmoid")])
    assert rewrite(graph, [rule]).nodes  # gate reads fc, but fc is also read by not_swish: not single-use
    assert [n.op for n in graph.nodes][0] == "linear"
    assert graph.outputs == outputs


def test_identities_cancel_and_chains_merge(write_spec):
    graph = graph_of(write_spec, """lbdlc: 1
inputs:
  x: {shape: [batch, 4, 6]}
layers:
  - {name: t1, op: transpose, dims: [1, 2]}
  - {name: t2, op: transpose, dims: [2, 1]}             # cancels t1
  - {name: p1, op: permute, dims: [0, 2, 1]}
  - {name: p2, op: permute, dims: [2, 0, 1]}            # with p1: one permute
  - {name: r1, op: reshape, shape: [6, batch, 4]}       # to the same shape: nothing
  - {name: r2, op: reshape, shape: [-1, 24]}
  - {name: r3, op: reshape, shape: [batch, 24]}         # with r2: one reshape, then the same shape
  - {name: whole, op: slice, dim: 1, start: 0}
  - {name: fc, op: linear, out_features: 3}
""")
    weights = {n: torch.randn(p.shape) for n, p in graph.params.items()}
    result, diff = before_after(graph, weights, ["remove_identities"], inputs_for(graph, {"batch": 3}), mode="training")
    assert diff == 0.0
    assert [(n.op, n.name) for n in result.graph.nodes] == [("permute", "p2"), ("reshape", "r3"), ("linear", "fc")]
    assert result.graph.nodes[0].attrs.dims == [1, 0, 2]


# --- levels, the spec's `compile:` and the command line -------------------------------------------

def test_levels_name_registered_passes():
    assert LEVELS[0] == [] and set(LEVELS[1]) < set(LEVELS[2]) <= set(LEVELS[3]) <= set(PASSES)
    mine = ["eliminate_dead_code", "eliminate_common_subexpressions", "remove_identities", "remove_dropout", "fold_constants",
            "fold_batch_norm", "fuse_linear_activation", "fuse_conv_activation", "fuse_attention", "recognize_activations",
            "recognize_layer_norm"]
    assert set(LEVELS[2]) == set(mine)


def test_unknown_pass_in_spec_is_located(cli, write_spec):
    path = write_spec("lbdlc: 1\ninputs:\n  x: {shape: [batch, 4]}\nlayers:\n  - {op: linear, out_features: 2}\n"
                      "compile:\n  passes: [remove_dropout, fuse_linear_activations]\n")
    code, _, err = cli("check", path)
    assert code == 2
    first = located(err, path, 7, "fuse_linear_activations")
    assert "unknown pass (did you mean 'fuse_linear_activation'?)" in first


def test_level_and_passes_together_is_located(cli, write_spec):
    path = write_spec("lbdlc: 1\ninputs:\n  x: {shape: [batch, 4]}\nlayers:\n  - {op: linear, out_features: 2}\n"
                      "compile: {level: 2, passes: [remove_dropout]}\n")
    code, _, err = cli("check", path)
    assert code == 2
    assert "give either `level` or `passes`, not both" in located(err, path, 6, "{level")


def test_unknown_pass_on_the_command_line(cli, tmp_path):
    code, _, err = cli("build", SPECS / "mlp.yaml", "-o", tmp_path / "o", "--passes", "remove_dropout,fold_batchnorm")
    assert code == 2
    assert "error: unknown pass 'fold_batchnorm'" in err and "did you mean 'fold_batch_norm'?" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_lbdlc_passes_lists_every_pass(cli):
    code, out, _ = cli("passes")
    assert code == 0
    for name in PASSES:
        assert name in out
    assert "-O1 (default)" in out
    code, out, _ = cli("passes", "--json")
    data = json.loads(out)
    assert {p["name"] for p in data["passes"]} == set(PASSES) and data["default_level"] == 1
    fold = next(p for p in data["passes"] if p["name"] == "fold_batch_norm")
    assert fold["preconditions"] == ["inference only", "rewrites weights"] and fold["levels"] == [2, 3]


def test_print_passes_and_manifest(cli, tmp_path):
    out_dir = tmp_path / "o"
    code, out, err = cli("build", SPECS / "gpt2.yaml", "-o", out_dir, "-b", "pytorch", "-b", "onnx", "-O2", "--print-passes",
                         *[a for o in GPT for a in ("--set", o)])
    assert code == 0, err
    assert "chosen by -O2" in out
    assert "5 × dropout removed" in out and "2 × linear + activation fused" in out
    assert "25 -> 16" in out  # the total line: nodes before and after
    manifest = json.loads((out_dir / "manifest.json").read_text())
    passes = manifest["passes"]
    assert passes["chosen_by"] == "-O2" and passes["level"] == 2 and passes["passes"] == LEVELS[2]
    assert [r["pass"] for r in passes["inference"]] == LEVELS[2]
    fuse = next(r for r in passes["inference"] if r["pass"] == "fuse_linear_activation")
    assert fuse["nodes"] == [20, 16] and "seconds" not in fuse  # manifests stay reproducible
    assert passes["pytorch"] is None
    assert manifest["model"]["inference_weights"] == "weights.safetensors"  # nothing rewritten


def test_spec_level_and_command_line_override(tmp_path, write_spec):
    from lbdlc.driver import BuildOptions, build

    spec = write_spec((SPECS / "mlp.yaml").read_text() + "\ncompile: {level: 0}\n")
    a = build(spec, tmp_path / "a", BuildOptions(backends=("onnx",)))
    assert a.manifest["passes"]["chosen_by"] == "compile.level" and a.manifest["passes"]["inference"] == []
    b = build(spec, tmp_path / "b", BuildOptions(backends=("onnx",), level=2))
    assert b.manifest["passes"]["chosen_by"] == "-O2" and len(b.optimized.graph.nodes) == 3
    c = build(spec, tmp_path / "c", BuildOptions(backends=("onnx",), passes=("fuse_linear_activation",)))
    assert c.manifest["passes"]["passes"] == ["fuse_linear_activation"]
    d = build(SPECS / "mlp.yaml", tmp_path / "d", BuildOptions(backends=("onnx",)))
    assert d.manifest["passes"]["chosen_by"] == "default" and d.manifest["passes"]["passes"] == LEVELS[1]


# --- model.py with `compile: {pytorch: true}`, and the refusal where it trains -------------------------

def lenet_with(write_spec, compile_text):
    (write_spec((SPECS / "lenet.yaml").read_text(), "lenet.yaml"))
    return write_spec(f"lbdlc: 1\nextends: lenet.yaml\ncompile:\n{compile_text}", "lenet_opt.yaml")


def test_inference_only_pass_refused_where_model_py_trains(cli, write_spec, tmp_path):
    path = lenet_with(write_spec, "  pytorch: true\n  passes: [fuse_conv_activation, remove_dropout]\n")
    code, _, err = cli("build", path, "-o", tmp_path / "o", "-b", "pytorch")
    assert code == 2
    first = located(err, path, 5, "remove_dropout")
    assert "pass 'remove_dropout' is inference-only: applied to model.py it would change what train.py trains" in first
    assert "note: model.py gets the passes because of this" in err and "pytorch: true" in err
    assert "this spec has `train:`" in err and "hint: leave it out, or drop `pytorch: true`" in err
    assert not (tmp_path / "o").exists()


def test_levels_leave_inference_only_passes_out_of_a_training_model(write_spec, tmp_path):
    from lbdlc.driver import BuildOptions, build

    path = lenet_with(write_spec, "  pytorch: true\n  level: 2\n")
    result = build(path, tmp_path / "o", BuildOptions(backends=("pytorch", "onnx")))
    opt = result.optimized
    assert opt.pytorch_mode == "training"
    assert opt.left_out == [p for p in LEVELS[2] if PASSES[p].inference_only]
    assert [r.name for r in opt.pytorch_log] == [p for p in LEVELS[2] if not PASSES[p].inference_only]
    source = (tmp_path / "o" / "model.py").read_text()
    assert "x = F.relu(self.conv1(image))" in source and "x = F.relu(self.fc1(x))" in source
    assert (tmp_path / "o" / "train.py").exists()
    assert result.manifest["passes"]["pytorch"]["left_out"] == opt.left_out


def test_pytorch_true_without_training_gets_folded_weights(write_spec, tmp_path):
    from lbdlc.driver import BuildOptions, build
    from lbdlc.verify import compare, random_inputs

    text = (SPECS / "resnet50.yaml").read_text()
    path = write_spec(text.replace("image: {shape: [batch, 3, 224, 224]}", "image: {shape: [batch, 3, 32, 32]}")
                      + "\ncompile: {level: 2, pytorch: true}\n", "r50.yaml")
    out = build(path, tmp_path / "o", BuildOptions(backends=("pytorch", "onnx"))).out_dir
    source = (out / "model.py").read_text()
    assert "BatchNorm" not in source and "F.relu(self.conv3(h) + " in source
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "model.py", "weights.safetensors"]
    agreement = compare(out, random_inputs(out, {"batch": 2}), ("pytorch", "onnx"))
    assert agreement.ok(1e-4), agreement


def test_refusal_in_code_without_a_spec():
    graph = spec_graph(SPECS / "resnet50.yaml", ("inputs.image.shape=[batch, 3, 32, 32]",))
    with pytest.raises(SpecError, match="'fold_batch_norm' is inference-only"):
        PassManager(["fold_batch_norm"], mode="training").run(graph)
