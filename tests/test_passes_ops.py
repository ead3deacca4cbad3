"""The fused ops (lbdlc/ops/fused.py): fused_linear, fused_conv2d and scaled_dot_product_attention,
written directly in tests/specs/fused_ops.yaml. The three backends agree, every output matches
a reference written with torch.nn.functional, the opset-23 profile (native Attention) agrees,
and shape mistakes are reported at their YAML line."""
import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lbdlc.driver import BuildOptions, build
from lbdlc.verify import compare, random_inputs, run_onnx, run_pytorch

from conftest import ROOT, located
from test_parity import TOLERANCE, random_weights

SPEC = ROOT / "tests" / "specs" / "fused_ops.yaml"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("fused_weights") / "w.safetensors"
    w = random_weights(SPEC)
    save_file(w, str(path))
    return path, w


@pytest.fixture(scope="module")
def fused_build(weights):
    """The file's only TVM build (-O0: the ops as written)."""
    out = weights[0].parent / "build"
    build(SPEC, out, BuildOptions(weights=weights[0], level=0))
    return out


@pytest.mark.parametrize("batch,seq", [(1, 1), (3, 5)])
def test_backends_agree(fused_build, batch, seq):
    agreement = compare(fused_build, random_inputs(fused_build, {"batch": batch, "seq": seq}, seed=batch))
    assert agreement.ok(TOLERANCE), agreement


def reference(w, image, seq):
    def lin(x, name, bias=True):
        return F.linear(x, w[f"{name}.weight"], w[f"{name}.bias"] if bias else None)

    with torch.no_grad():
        c1 = F.relu(F.conv2d(image, w["c1.weight"], w["c1.bias"], padding=1))
        c2 = F.leaky_relu(F.conv2d(c1, w["c2.weight"], padding=1), 0.2)
        c3 = F.relu6(F.conv2d(c2, w["c3.weight"], w["c3.bias"]) + c1)
        c4 = F.silu(F.conv2d(c3, w["c4.weight"], w["c4.bias"], stride=2, groups=2))
        f1 = F.gelu(lin(c4.mean((2, 3)), "f1"))
        f2 = torch.tanh(lin(f1, "f2") + f1)
        l1 = F.gelu(lin(seq, "l1"), approximate="tanh")
        l2 = torch.sigmoid(lin(l1, "l2", bias=False) + seq)
        l3 = lin(l2, "l3")
        scores = l1 @ l2.transpose(-2, -1) / math.sqrt(8)
        att = scores.softmax(-1) @ l3
        hp = l3.reshape(l3.shape[0], l3.shape[1], 2, 4).permute(0, 2, 1, 3)
        n = hp.shape[2]
        scores = hp @ hp.transpose(-2, -1) * 0.3
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        catt = scores.softmax(-1) @ hp
    return [c4, f2, att, catt]


def test_outputs_match_torch(fused_build, weights):
    inputs = random_inputs(fused_build, {"batch": 2, "seq": 4}, seed=7)
    want = reference(weights[1], *(torch.from_numpy(v) for v in inputs.values()))
    for got in (run_pytorch(fused_build, inputs), run_onnx(fused_build, inputs)):
        for g, r in zip(got, want):
            assert np.abs(g - r.numpy()).max() <= TOLERANCE


def test_onnx_opset23_native_attention(weights, tmp_path):
    out = build(SPEC, tmp_path / "o23", BuildOptions(weights=weights[0], level=0, opset=23, backends=("pytorch", "onnx"))).out_dir
    model = onnx.load(out / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert sum(n.op_type == "Attention" for n in model.graph.node) == 2
    agreement = compare(out, random_inputs(out, {"batch": 2, "seq": 3}, seed=1), ("pytorch", "onnx"))
    assert agreement.ok(TOLERANCE), agreement


def test_residual_of_another_shape_is_located(cli, write_spec):
    path = write_spec(
        "lbdlc: 1\n"
        "inputs:\n"
        "  x: {shape: [batch, 4]}\n"
        "layers:\n"
        "  - {name: a, op: linear, out_features: 3}\n"
        "  - {name: b, op: fused_linear, out_features: 5, activation: relu, in: [a, a]}\n"
    )
    code, _, err = cli("check", path)
    assert code == 2
    first = located(err, path, 6, "[a, a]")
    assert "residual input [batch, 3] must have the shape of its output [batch, 5]" in first


def test_attention_shape_mismatch_is_located(cli, write_spec):
    path = write_spec(
        "lbdlc: 1\n"
        "inputs:\n"
        "  q: {shape: [batch, 5, 8]}\n"
        "  k: {shape: [batch, 6, 4]}\n"
        "layers:\n"
        "  - {name: att, op: scaled_dot_product_attention, in: [q, k, k]}\n"
    )
    code, _, err = cli("check", path)
    assert code == 2
    first = located(err, path, 6, "scaled_dot")
    assert "must have the same last dim" in first


def test_unknown_activation_is_located(cli, write_spec):
    path = write_spec(
        "lbdlc: 1\n"
        "inputs:\n"
        "  x: {shape: [batch, 4]}\n"
        "layers:\n"
        "  - {op: fused_linear, out_features: 3, activation: gelu_fast}\n"
    )
    code, _, err = cli("check", path)
    assert code == 2
    located(err, path, 5, "gelu_fast")
