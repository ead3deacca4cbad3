"""Tensor ops (silu, softplus, log_softmax, mul, mean, matmul with transpose_b, transpose,
permute, slice, select, cls_token): the three backends agree on tests/specs/tensor_ops.yaml
from one build at several (batch, seq) sizes, the layers fed straight from inputs match torch,
shape rules hold with symbolic dims, and mistakes are reported at their YAML line."""
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lbdlc.analysis import summarize
from lbdlc.driver import BuildOptions, build
from lbdlc.ir import symbol
from lbdlc.lower import load, lower
from lbdlc.verify import RUNNERS, compare, random_inputs

from conftest import ROOT, located
from test_parity import TOLERANCE, random_weights

SPEC = ROOT / "tests" / "specs" / "tensor_ops.yaml"
OUTPUTS = ["sp_z", "a_k", "a_at", "first_x", "sel_x", "perm_a", "gated", "kept", "last2", "strided", "negs", "logp"]
# seq >= 2: the spec's `mid` slice (1:-1 of seq + 1 positions) must not be empty.
SIZES = [{"batch": 1, "seq": 2}, {"batch": 3, "seq": 7}]
BACKENDS = ("pytorch", "onnx", "tvm")


@pytest.fixture(scope="module")
def tensor_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tensor_ops")
    save_file(random_weights(SPEC), str(tmp / "trained.safetensors"))
    build(SPEC, tmp / "build", BuildOptions(weights=tmp / "trained.safetensors"))
    return tmp / "build"


@pytest.fixture(scope="module")
def outputs(tensor_build):
    """Every backend's named outputs on inputs whose softplus input straddles the threshold."""
    inputs = random_inputs(tensor_build, {"batch": 2, "seq": 5}, seed=7)
    inputs["z"] = np.array(
        [[-100.0, -20.0, 0.0, 1.0, 19.5, 19.999, 20.0, 20.001], [20.5, 25.0, 60.0, 88.0, 89.0, 100.0, 1e4, -1e4]],
        np.float32,
    )
    results = {b: dict(zip(OUTPUTS, RUNNERS[b](tensor_build, inputs))) for b in BACKENDS}
    return {k: torch.from_numpy(v) for k, v in inputs.items()}, results


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"batch{s['batch']}-seq{s['seq']}")
def test_backends_agree(tensor_build, sizes):
    """One build, two batch sizes and sequence lengths."""
    agreement = compare(tensor_build, random_inputs(tensor_build, sizes, seed=sizes["seq"]))
    assert agreement.ok(TOLERANCE), agreement


@pytest.mark.parametrize("backend", BACKENDS)
def test_softplus_matches_torch_near_and_past_the_threshold(outputs, backend):
    inputs, results = outputs
    want = F.softplus(inputs["z"])  # beta 1, threshold 20
    got = torch.from_numpy(results[backend]["sp_z"])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matmul_matches_torch_matmul(outputs, backend):
    inputs, results = outputs
    a, k = inputs["a"], inputs["k"]
    r = {name: torch.from_numpy(v) for name, v in results[backend].items()}
    torch.testing.assert_close(r["a_k"], torch.matmul(a, k), atol=1e-5, rtol=1e-5)  # [2, 2, 5, 4] @ [2, 4, 3]
    torch.testing.assert_close(r["a_at"], torch.matmul(a, a.transpose(-2, -1)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_slicing_matches_torch_indexing(outputs, backend):
    inputs, results = outputs
    x, a = inputs["x"], inputs["a"]
    r = {name: torch.from_numpy(v) for name, v in results[backend].items()}
    assert torch.equal(r["first_x"], x[:, 0:1])  # the CLS position: [batch, 1, D]
    assert torch.equal(r["sel_x"], x[:, 0])
    assert torch.equal(r["perm_a"], a.permute(0, 2, 3, 1))
    # strided = flat[:, :, 1:7:2] (columns 1, 3, 5); negs = flat[:, :, -6:-1:3] (columns 2, 5);
    # last2 = flat[:, -2:]: the same elements must come out of every slice.
    assert r["strided"].shape == (2, 6, 3) and r["negs"].shape == (2, 6, 2) and r["last2"].shape == (2, 2, 8)
    assert torch.equal(r["negs"][..., 1], r["strided"][..., 2])
    assert torch.equal(r["last2"][:, :, 1:7:2], r["strided"][:, -2:])


def test_onnx_passes_full_check_with_symbolic_dims(tensor_build):
    model = onnx.load(tensor_build / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["x"] == ["batch", "seq", 8] and dims["a"] == ["batch", 2, "seq", 4]
    ops = {n.op_type for n in model.graph.node}
    assert {"Slice", "Transpose", "MatMul", "Expand", "LogSoftmax", "ReduceMean", "Where"} <= ops


def test_symbolic_shapes_params_and_flops():
    graph = lower(load(SPEC))
    batch, seq = symbol("batch"), symbol("seq")
    shapes = {n.name: n.outputs[0].type.shape for n in graph.nodes}
    assert shapes["cls"] == (batch, seq + 1, 8)
    assert shapes["first_x"] == (batch, 1, 8)
    assert shapes["tail"] == (batch, seq, 8)
    assert shapes["mid"] == (batch, seq - 1, 8)
    assert shapes["last2"] == (batch, 2, 8)
    assert shapes["strided"] == (batch, seq + 1, 3) and shapes["negs"] == (batch, seq + 1, 2)
    assert shapes["perm_a"] == (batch, seq, 4, 2)
    assert shapes["a_k"] == (batch, 2, seq, 3)
    assert shapes["scores"] == (batch, 2, seq + 1, seq + 1)
    assert graph.params["cls.token"].shape == (1, 1, 8)
    flops = {layer.name: layer.flops for layer in summarize(graph).layers}  # per sample: batch = seq = 1
    assert flops["a_k"] == 2 * (2 * 1 * 3) * 4
    assert flops["a_at"] == 2 * (2 * 1 * 1) * 4
    assert flops["first_x"] == 0 and flops["perm_a"] == 0


# -- mistakes, reported at their YAML line --------------------------------------------------

BASE = """\
lbdlc: 1
inputs:
  x: {shape: [batch, seq, 8]}
  y: {shape: [batch, 6, 4]}
layers:
"""


def check_fails(cli, path):
    code, out, err = cli("check", path)
    assert code == 2, (out, err)
    return err


def test_permute_needs_a_permutation(cli, write_spec):
    path = write_spec(BASE + "  - {name: p, op: permute, dims: [0, 2, 2], in: x}\n")
    err = check_fails(cli, path)
    assert "dims [0, 2, 2] is not a permutation of the 3 dimensions of [batch, seq, 8]" in located(err, path, 6, "[0, 2, 2]")
    assert "hint: name each of 0..2 exactly once" in err


def test_permute_needs_every_dimension(cli, write_spec):
    path = write_spec(BASE + "  - {name: p, op: permute, dims: [1, 0], in: x}\n")
    err = check_fails(cli, path)
    assert "dims [1, 0] has 2 entries, but the input [batch, seq, 8] has rank 3" in located(err, path, 6, "[1, 0]")


def test_slice_out_of_range_on_a_fixed_dim(cli, write_spec):
    path = write_spec(BASE + "  - {name: s, op: slice, dim: 1, start: 2, end: 9, in: y}\n")
    err = check_fails(cli, path)
    assert "end=9 is out of range for dim 1 of [batch, 6, 4] (size 6)" in located(err, path, 6, "9")
    assert "hint: use an end from -6 to 6" in err


def test_slice_start_out_of_range_on_a_fixed_dim(cli, write_spec):
    path = write_spec(BASE + "  - {name: s, op: slice, dim: -1, start: -5, in: y}\n")
    err = check_fails(cli, path)
    assert "start=-5 is out of range for dim -1 of [batch, 6, 4] (size 4)" in located(err, path, 6, "-5")


def test_empty_slice(cli, write_spec):
    path = write_spec(BASE + "  - {name: s, op: slice, dim: 1, start: 4, end: 4, in: y}\n")
    err = check_fails(cli, path)
    assert "start=4, end=4 select nothing" in located(err, path, 6, "4, in")


def test_slice_from_the_end_to_a_fixed_end_on_a_symbolic_dim(cli, write_spec):
    path = write_spec(BASE + "  - {name: s, op: slice, dim: 1, start: -2, end: 3, in: x}\n")
    err = check_fails(cli, path)
    assert "start=-2 counts from the end of dim 1 of [batch, seq, 8], which is symbolic (seq)" in located(err, path, 6, "3, in")


def test_slice_step_on_an_open_symbolic_range(cli, write_spec):
    path = write_spec(BASE + "  - {name: s, op: slice, dim: 1, step: 2, in: x}\n")
    err = check_fails(cli, path)
    assert "step=2 on dim 1 of [batch, seq, 8] gives a length that depends on the symbolic size seq" in located(err, path, 6, "2,")


def test_slice_step_must_be_positive(cli, write_spec):
    path = write_spec(BASE + "  - {name: s, op: slice, dim: 1, step: 0, in: x}\n")
    err = check_fails(cli, path)
    assert "greater than or equal to 1" in located(err, path, 6, "0,")


def test_matmul_inner_dims_mismatch_names_both_shapes(cli, write_spec):
    path = write_spec(BASE + "  - {name: m, op: matmul, in: [x, y]}\n")
    err = check_fails(cli, path)
    assert "matmul needs the inner sizes to agree: [batch, seq, 8] @ [batch, 6, 4] (8 vs 6)" in located(err, path, 6, "matmul")


def test_matmul_transpose_b_mismatch(cli, write_spec):
    path = write_spec(BASE + "  - {name: m, op: matmul, transpose_b: true, in: [x, y]}\n")
    err = check_fails(cli, path)
    first = located(err, path, 6, "matmul")
    assert "matmul needs the inner sizes to agree: [batch, seq, 8] @ [batch, 6, 4] transposed (transpose_b) (8 vs 4)" in first


def test_matmul_batch_dims_must_broadcast(cli, write_spec):
    path = write_spec(BASE.replace("[batch, 6, 4]", "[3, 8, 4]") + "  - {name: m, op: matmul, in: [x, y]}\n")
    err = check_fails(cli, path)
    assert "shapes [batch], [3] do not broadcast" in located(err, path, 6, "matmul")
