"""Quantization-aware training (`quantize: {qat: true}`, backends/train_qat.py): train.py's
fake quantization is the packed formats' round trip bit for bit, its gradient is
straight-through, and the deployed quantized model computes exactly what training saw."""
import json
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SPECS, located
from torch import nn
from training_util import build_train, load_train

from lbdlc import quant_formats as qf
from lbdlc.backends.train_qat import code

# The digits MLP of the LoRA demo on all ten classes: every linear layer's input width is a
# multiple of 32, so each one is block-quantized.
MLP = "".join(line for line in (SPECS / "mlp_digits.yaml").read_text().splitlines(True) if "classes:" not in line)


def generated(qat: dict) -> dict:
    """The QAT code train.py gets, executed: its functions by name."""
    namespace = {"torch": torch, "nn": nn, "F": F, "sys": __import__("sys")}
    exec(code(types.SimpleNamespace(spec_file="spec.yaml", qat=qat, qat_line=3)), namespace)
    return namespace


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_fake_quantization_is_the_packed_round_trip_bit_for_bit(fmt):
    ns = generated({"fc": fmt})
    w = 0.1 * torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    w[0, :32] = 0.0  # a block of zeros: scale 0
    w[1, 32:64] = 0.5  # a constant block
    expected = qf.unpack(qf.pack(w.numpy(), fmt), fmt)
    got = ns["quantize_dequantize"](w, fmt)
    assert np.array_equal(got.numpy(), expected)
    assert not torch.equal(got, w)  # it really quantizes
    leaf = w.clone().requires_grad_()
    (ns["fake_quantize"](leaf, fmt) * torch.arange(256.0)).sum().backward()
    assert torch.equal(leaf.grad, torch.arange(256.0).expand(48, 256))  # straight through


def test_train_py_simulates_exactly_the_layers_the_build_quantizes(tmp_path):
    text = MLP + "quantize:\n  default: q4_0\n  qat: true\n  rules:\n    - {match: head, bits: 8}\n"
    out = build_train(tmp_path, text)
    source = (out / "train.py").read_text()
    assert "QAT_LAYERS = {\n    'fc1': 'q4_0',\n    'fc2': 'q4_0',\n    'head': 'q8_0',\n}" in source
    assert "    raw_model.to(device)\n    simulate_quantization(raw_model)" in source
    module = load_train(out)
    model = module.Model()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    plain = model(x)
    module.simulate_quantization(model)
    assert set(model.state_dict()) == {f"{n}.{p}" for n in ("fc1", "fc2", "head") for p in ("weight", "bias")}  # unchanged
    expected = x
    for name, fmt in (("fc1", "q4_0"), ("fc2", "q4_0"), ("head", "q8_0")):
        layer = getattr(model, name)
        w = torch.from_numpy(qf.unpack(qf.pack(layer.weight.detach().numpy(), fmt), fmt))
        expected = F.linear(expected, w, layer.bias)
        expected = torch.relu(expected) if name != "head" else expected
    got = model(x)
    assert torch.allclose(got, expected, atol=1e-6) and not torch.allclose(got, plain, atol=1e-4)
    assert "simulate_quantization" not in (build_train(tmp_path, MLP) / "train.py").read_text()  # no qat: no QAT code


def test_qat_errors_are_located(cli, write_spec):
    # (int8: tests/test_qat_int8.py; static int8 has its own QAT, dynamic int8 is an error there)
    lenet = (SPECS / "lenet.yaml").read_text() + "quantize:\n  default: q4_1\n  qat: true\n  rules:\n    - {match: fc1, bits: none}\n"
    path = write_spec(lenet, "lenet.yaml")
    code, _, err = cli("build", path, "-o", path.parent / "out2")
    assert code == 2 and "quantizes no layer of this model" in located(err, path, lenet.count("\n") - 2, "true")


@pytest.mark.slow
def test_the_deployed_quantized_model_scores_what_qat_training_reported(tmp_path, cli):
    """train.py's own test accuracy (fake-quantized forward) equals the Q4_0 ONNX and TVM
    builds' accuracy from its weights: QAT trained the model that is deployed."""
    from lbdlc.driver import BuildOptions, build
    from lbdlc.verify import run_onnx, run_pytorch, run_tvm

    spec = tmp_path / "mlp_qat.yaml"
    spec.write_text(MLP + "quantize: {default: q4_0, qat: true}\n")
    code, _, err = cli("train", spec, "-o", tmp_path / "qat")
    assert code == 0, err
    summary = json.loads((tmp_path / "qat" / "run" / "summary.json").read_text())
    deployed = build(spec, tmp_path / "deployed", BuildOptions(weights=tmp_path / "qat" / "run" / "weights.safetensors")).out_dir
    manifest = json.loads((deployed / "manifest.json").read_text())
    assert {e["layer"]: e["format"] for e in manifest["quantization"]} == {"fc1": "q4_0", "fc2": "q4_0", "head": "q4_0"}
    test = load_train(tmp_path / "qat").make_data()["test"]
    inputs, labels = {"x": test["x"].numpy()}, test["head"].numpy()
    onnx_out, tvm_out = run_onnx(deployed, inputs)[0], run_tvm(deployed, inputs)[0]
    scores = {"onnx": float((onnx_out.argmax(-1) == labels).mean()), "tvm": float((tvm_out.argmax(-1) == labels).mean()),
              "fp32 weights": float((run_pytorch(deployed, inputs)[0].argmax(-1) == labels).mean())}
    print(f"QAT q4_0 digits MLP: train.py test {summary['test']}, deployed {scores}")
    assert summary["test"]["accuracy"] >= 0.93
    assert scores["onnx"] == pytest.approx(summary["test"]["accuracy"], abs=1e-9) == scores["tvm"]
