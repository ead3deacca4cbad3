"""lbdlc's default CPU schedules for TVM (backends/tvm_schedule.py): which rule takes which
kernel, that linear layers read their weights in place, that scheduled libraries compute what
TVM's naive loops and ONNX Runtime compute (odd sizes, symbolic batch and sequence, a padded
vocabulary, register tiles of 4 and 7 pixels), and that the schedule is really faster."""
import re
import time

import numpy as np
import pytest
from conftest import SPECS, perturbed_weights
from lbdlc.passes import PassManager
from lbdlc.passes.pipeline import LEVELS
from passes_util import inputs_for, max_diff, run_onnx, run_tvm, spec_graph
from test_parity import TOLERANCE

GPT = ("n_layer=1", "d_model=64", "n_head=4", "vocab=1001", "ctx=64")  # 1001: no multiple of 8
RESNET = ("inputs.image.shape=[batch, 3, 56, 56]", "classes=10")  # maps of 28, 14, 7 and 4 pixels
MOBILENET = ("inputs.image.shape=[batch, 3, 56, 56]", "classes=10")  # depthwise layers of stride 1 and 2


def fused(graph):
    import tvm
    from lbdlc.backends.tvm import to_relax
    from lbdlc.backends.tvm_schedule import cpu_legalize
    from tvm import relax

    return relax.get_pipeline("zero")(cpu_legalize(to_relax(graph))), tvm


def rule_of_each_kernel(graph) -> dict[str, str | None]:
    from lbdlc.backends.tvm_schedule import rules

    from lbdlc.targets import host_target

    mod, tvm = fused(graph)
    target = tvm.target.Target(host_target())
    found = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            found[gv.name_hint] = next((type(r.rule).__name__ for r in rules() if r.apply(func, target, False) is not None), None)
    return found


def test_rules_take_the_kernels_that_dominate():
    gpt = rule_of_each_kernel(spec_graph(SPECS / "gpt2.yaml", GPT))
    dense = {k: v for k, v in gpt.items() if "dense" in k and not k.startswith("pack_")}
    assert len(dense) == 5 and set(dense.values()) == {"Matmul"}  # q/k/v, out_proj, c_fc + gelu, c_proj + residual, LM head
    assert gpt["attention_scores"] == gpt["attention_weighted"] == "Matmul"
    assert gpt["attention_softmax"] == "Reduction"
    resnet = PassManager(LEVELS[2]).run(spec_graph(SPECS / "resnet50.yaml", RESNET)).graph
    kernels = rule_of_each_kernel(resnet)
    convs = {k: v for k, v in kernels.items() if "conv2d" in k and not k.startswith("pack_")}
    assert len(convs) > 20 and set(convs.values()) == {"Conv2d"}
    mobilenet = PassManager(LEVELS[2]).run(spec_graph(SPECS / "mobilenet_v2.yaml", MOBILENET)).graph
    convs = [v for k, v in rule_of_each_kernel(mobilenet).items() if "conv2d" in k and not k.startswith("pack_")]
    assert convs.count("DepthwiseConv2d") >= 6 and None not in convs  # (a 2-pixel map: dlight's Reduction)


def test_linear_layers_read_their_weights_in_place():
    """No transposed copy of a weight per call: R.linear becomes one `dense` kernel."""
    mod, tvm = fused(spec_graph(SPECS / "gpt2.yaml", GPT))
    names = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert not [n for n in names if n.startswith("transpose")]
    assert "dense3" in names  # the tied LM head reads wte.weight as stored


@pytest.mark.parametrize("spec, overrides, kernels", [("gpt2.yaml", GPT, 7), ("resnet50.yaml", RESNET, 50)], ids=["gpt2", "resnet50"])
def test_weights_are_packed_once_when_loaded_not_on_every_call(spec, overrides, kernels):
    """Every weight-packing kernel runs in main_transform_params (once, when the runtime loads
    the weights); main calls none."""
    graph = PassManager(LEVELS[2]).run(spec_graph(SPECS / spec, overrides)).graph
    mod, _ = fused(graph)
    called = {name: re.findall(r"call_tir\((?:cls\.)?(\w+)", mod[name].script()) for name in ("main", "main_transform_params")}
    assert len([k for k in called["main_transform_params"] if k.startswith("pack_")]) >= kernels  # one call per weight
    assert called["main"] and not [k for k in called["main"] if k.startswith("pack_")]


@pytest.mark.slow
@pytest.mark.parametrize("spec, overrides, sizes", [
    ("gpt2.yaml", GPT, [{"batch": 3, "seq": 5}, {"batch": 1, "seq": 9}]),
    ("resnet50.yaml", RESNET, [{"batch": 2}]),
    ("mobilenet_v2.yaml", MOBILENET, [{"batch": 2}]),
], ids=["gpt2", "resnet50", "mobilenet_v2"])
def test_scheduled_library_computes_what_naive_loops_and_onnx_runtime_compute(spec, overrides, sizes):
    path = SPECS / spec
    result = PassManager(LEVELS[2]).run(spec_graph(path, overrides), perturbed_weights(path, overrides))
    graph, weights = result.graph, result.weights
    for k, size in enumerate(sizes):
        inputs = inputs_for(graph, size, seed=k, int_high=1001)
        scheduled = run_tvm(graph, weights, inputs, schedule=True)
        assert max_diff(scheduled, run_tvm(graph, weights, inputs, schedule=False)) <= TOLERANCE
        assert max_diff(scheduled, run_onnx(graph, weights, inputs)) <= TOLERANCE


@pytest.mark.parametrize("out_features, seq, relu", [(50, 5, False), (50, 8, True), (1001, 3, False)])
def test_a_partial_last_weight_panel_writes_only_the_real_columns(write_spec, out_features, seq, relu):
    """Out features no multiple of 16: the packed weight's last panel is zero-filled and the
    kernel's tail drops its extra columns (inlined into the tile, it wrote past the output)."""
    from test_parity import random_weights

    path = write_spec(f"lbdlc: 1\ninputs:\n  x: {{shape: [batch, seq, 16]}}\nlayers:\n"
                      f"  - {{name: fc, op: linear, out_features: {out_features}}}\n" + ("  - {op: relu}\n" if relu else ""))
    graph = spec_graph(path)
    weights = random_weights(path)
    inputs = inputs_for(graph, {"batch": 1, "seq": seq})
    assert max_diff(run_tvm(graph, weights, inputs, schedule=True), run_onnx(graph, weights, inputs)) <= TOLERANCE


@pytest.mark.slow
def test_scheduled_dense_is_faster_than_naive_loops(write_spec):
    """A 64x256 -> 1024 linear layer + GELU (17 M multiply-adds): the scheduled kernel at
    least 3x faster than TVM's naive loops (measured ~20x on an idle 2-core AVX2 machine)."""
    path = write_spec("lbdlc: 1\ninputs:\n  x: {shape: [batch, 64, 256]}\nlayers:\n"
                      "  - {name: fc, op: linear, out_features: 1024}\n  - {op: gelu}\n")
    graph = PassManager(LEVELS[2]).run(spec_graph(path)).graph
    import tvm
    from lbdlc.backends.tvm import compile_library
    from tvm import relax

    device = tvm.cpu()
    rng = np.random.default_rng(0)
    from lbdlc.bundle_runtime import tvm_parameters

    x, *weights = [tvm.runtime.tensor(rng.standard_normal(s).astype(np.float32), device) for s in [(1, 64, 256), (1024, 256), (1024,)]]
    best = {}
    for schedule in (True, False):
        vm = relax.VirtualMachine(compile_library(graph, schedule=schedule), device)
        args = [x, *tvm_parameters(vm, weights)]
        fn = vm["main"]
        fn(*args)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - start)
        best[schedule] = min(times)
    assert best[True] * 3 < best[False], best
