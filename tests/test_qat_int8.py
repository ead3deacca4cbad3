"""Quantization-aware training for ONNX Runtime's static int8 (`quantize: {default: int8,
method: static, qat: true}`, backends/train_qat_int8.py): train.py's fake quantization is
what onnxruntime.quantization stores, bit for bit (weights per channel or per tensor, int8 or
uint8, 7-bit or full range; int32 biases; uint8 activations from a range); train.py saves the
ranges it learned and `lbdlc build --weights` quantizes activations with exactly those scales,
so the deployed ONNX model scores what train.py reported."""
import functools
import json
import sys
import types
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import ROOT, SPECS, located
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from training_util import build_train, load_train

from lbdlc.backends.train_qat_int8 import code
from lbdlc.errors import SpecError
from lbdlc.quant_int8 import Int8Plan, dequantized_initializers, quantize_model

# The digits MLP of tests/test_qat.py: 64 -> 128 -> 64 -> 10, all ten classes.
MLP = "".join(line for line in (SPECS / "mlp_digits.yaml").read_text().splitlines(True) if "classes:" not in line)
STATIC_QAT = "quantize:\n  default: int8\n  method: static\n  qat: true\n"


def generated(per_channel=True, reduce_range=True, weights="int8") -> dict:
    """train.py's int8 QAT code, executed: its functions by name."""
    plan = types.SimpleNamespace(spec_file="spec.yaml", qat_int8={
        "layers": {"fc": {"kind": "linear", "input": "x", "output": "fc", "int32_bias": True}},
        "per_channel": per_channel, "reduce_range": reduce_range, "weights": weights, "line": 3})
    namespace = {"torch": torch, "nn": nn, "F": F, "sys": sys, "dist": dist, "functools": functools, "weakref": weakref,
                 "json": json, "Path": Path}
    exec(code(plan), namespace)
    return namespace


def conv_gemm_model(rng) -> tuple[onnx.ModelProto, dict]:
    """image -> Conv (named as lbdlc names a layer's nodes) -> Relu -> Flatten -> Gemm(transB=1)."""
    w1 = (0.3 * rng.standard_normal((4, 3, 3, 3))).astype(np.float32)
    w1[1] = 0.0  # a channel of zeros: ORT's scale 1, zero point 0
    w1[2] = 0.25  # a constant channel
    w1[3, 0, 0, 0] = -2.5  # a channel whose largest magnitude is negative
    b1 = (0.1 * rng.standard_normal(4)).astype(np.float32)
    w2 = (0.2 * rng.standard_normal((5, 64))).astype(np.float32)
    b2 = (0.1 * rng.standard_normal(5)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["image", "conv.weight", "conv.bias"], ["conv"], name="conv/Conv_1", kernel_shape=[3, 3]),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu/Relu_2"),
             helper.make_node("Flatten", ["relu"], ["flat"], name="flat/Flatten_3"),
             helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["fc"], name="fc/Gemm_4", transB=1)]
    params = {"conv.weight": w1, "conv.bias": b1, "fc.weight": w2, "fc.bias": b2}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, 6, 6])],
                              [helper.make_tensor_value_info("fc", TensorProto.FLOAT, ["n", 5])],
                              [numpy_helper.from_array(v, k) for k, v in params.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10), params


@pytest.mark.parametrize("per_channel,reduce_range,weights", [(True, True, "int8"), (True, False, "int8"),
                                                              (False, True, "int8"), (True, False, "uint8"),
                                                              (False, False, "uint8")])
def test_fake_quantization_is_what_onnxruntime_stores_bit_for_bit(tmp_path, per_channel, reduce_range, weights):
    rng = np.random.default_rng(0)
    model, params = conv_gemm_model(rng)
    onnx.save_model(model, str(tmp_path / "fp32.onnx"))
    # Ranges as train.py saves them: the image's (min above 0: ORT widens it to contain 0), the
    # Conv's output, and the Gemm's input and output; the build hands them to ORT.
    ranges = {"tensors": {"image": {"rmin": 0.125, "rmax": 3.0}, "conv": {"rmin": -1.7, "rmax": 2.9},
                          "relu": {"rmin": 0.0, "rmax": 2.5}, "fc": {"rmin": -4.0, "rmax": 3.3}},
              "layers": {"conv": {"input": "image", "output": "conv"}, "fc": {"input": "relu", "output": "fc"}}}
    plan = Int8Plan("static", per_channel, reduce_range, weights, qat_ranges=ranges)
    calibration = [{"image": rng.standard_normal((4, 3, 6, 6)).astype(np.float32)}]
    quantize_model(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", plan, calibration)
    # (ORT maps `relu` to the Gemm's input `flat`: the key follows the layer's node, not the name)
    assert plan.qat_applied == {"image": "image", "conv": "conv", "flat": "relu", "fc": "fc"}
    quantized = onnx.load(str(tmp_path / "int8.onnx"))
    stored = dequantized_initializers(quantized, "static")
    inits = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    ns = generated(per_channel, reduce_range, weights)
    # activations: ORT's scale and zero point from the trained range = train.py's
    for tensor, key in plan.qat_applied.items():
        r = ranges["tensors"][key]
        scale, zero = ns["scale_zero_point"](torch.tensor(r["rmin"]), torch.tensor(r["rmax"]), 0, 255, False)
        assert inits[f"{tensor}_scale"].dtype == np.float32 and inits[f"{tensor}_zero_point"].dtype == np.uint8
        assert scale.numpy() == inits[f"{tensor}_scale"] and int(zero) == int(inits[f"{tensor}_zero_point"]), tensor
    # weights and int32 biases
    for layer, input_tensor in (("conv", "image"), ("fc", "flat")):
        w = torch.from_numpy(params[f"{layer}.weight"])
        got, weight_scale = ns["quantize_weight"](w)
        assert np.array_equal(got.numpy(), stored[f"{layer}.weight"]), layer
        assert not np.array_equal(got.numpy(), params[f"{layer}.weight"])  # it really quantizes
        bias = ns["quantize_bias"](torch.from_numpy(params[f"{layer}.bias"]), torch.from_numpy(inits[f"{input_tensor}_scale"]), weight_scale)
        assert np.array_equal(bias.numpy(), stored[f"{layer}.bias"]), layer
    # QuantizeLinear -> DequantizeLinear of activations, run by ONNX Runtime, with ties and saturation
    import onnxruntime as ort

    scale, zero = inits["conv_scale"], inits["conv_zero_point"]
    x = np.concatenate([rng.uniform(-2.5, 3.5, 4000), (np.arange(-300, 300) + 0.5 - int(zero)) * scale]).astype(np.float32)
    qdq = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
                            "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(x)])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [len(x)])],
                            [numpy_helper.from_array(np.array(scale), "s"), numpy_helper.from_array(np.array(zero), "z")])
    session = ort.InferenceSession(helper.make_model(qdq, opset_imports=[helper.make_opsetid("", 20)], ir_version=10).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})[0]
    got = ns["quantize_activation"](torch.from_numpy(x), torch.tensor(scale), torch.tensor(float(zero)))
    assert np.array_equal(got.numpy(), expected)


def test_gradients_are_straight_through_and_clipped_for_activations():
    ns = generated()
    obs = ns["RangeObserver"]()
    x = torch.linspace(-3.0, 5.0, 81, requires_grad=True)
    obs.rmin, obs.rmax = torch.tensor(-1.0), torch.tensor(2.0)
    (obs.fake_quantize(x, training=False) * torch.arange(81.0)).sum().backward()
    scale, zero = obs.qparams()
    inside = (x >= -zero * scale) & (x <= (255 - zero) * scale)
    assert torch.equal(x.grad, torch.where(inside, torch.arange(81.0), torch.zeros(81)))
    assert 0 < int(inside.sum()) < 81
    w = torch.randn(6, 10, requires_grad=True)
    (ns["_Through"].apply(w, ns["quantize_weight"](w)[0]) * 3.0).sum().backward()
    assert torch.equal(w.grad, torch.full((6, 10), 3.0))


def test_observer_averages_ranges_in_training_and_freezes_them_in_evaluation():
    ns = generated()
    obs = ns["RangeObserver"]()
    first = torch.tensor([-1.0, 3.0])
    assert torch.equal(obs.fake_quantize(torch.tensor([0.5]), training=False), torch.tensor([0.5]))  # no range yet: identity
    obs.fake_quantize(first, training=True)
    assert (float(obs.rmin), float(obs.rmax)) == (-1.0, 3.0)
    obs.fake_quantize(first, training=True)  # the same tensor (two layers reading one input): observed once
    obs.fake_quantize(torch.tensor([-3.0, 13.0]), training=True)
    assert (float(obs.rmin), float(obs.rmax)) == pytest.approx((-1.02, 3.1))
    obs.fake_quantize(torch.tensor([-50.0, 50.0]), training=False)  # evaluation: frozen
    assert (float(obs.rmin), float(obs.rmax)) == pytest.approx((-1.02, 3.1)) and obs.steps == 2


def test_train_py_simulates_the_int8_layers_and_keeps_the_state_dict(tmp_path):
    text = MLP + STATIC_QAT + "  rules:\n    - {match: fc2, bits: none}\n"
    out = build_train(tmp_path, text)
    source = (out / "train.py").read_text()
    assert ("QAT_INT8 = {\n    'fc1': ('linear', 'x', 'fc1', True),\n    'head': ('linear', 'relu_2', 'head', True),\n}"
            in source)
    assert "    raw_model.to(device)\n    simulate_int8_quantization(raw_model)" in source
    assert "QAT_LAYERS" not in source  # no block-format QAT
    module = load_train(out)
    model = module.Model()
    module.simulate_int8_quantization(model)
    assert set(model.state_dict()) == {f"{n}.{p}" for n in ("fc1", "fc2", "head") for p in ("weight", "bias")}
    x = torch.rand(7, 64, generator=torch.Generator().manual_seed(1))
    model.train()
    model(x)
    model.eval()
    got = model(x)
    obs = model.qat_int8_observers
    assert set(obs) == {"x", "fc1", "relu_2", "head"}
    q = lambda t, key: module.quantize_activation(t, *obs[key].qparams())
    h = q(F.linear(q(x, "x"), module.quantize_weight(model.fc1.weight)[0],
                   module.quantize_bias(model.fc1.bias, obs["x"].qparams()[0], module.quantize_weight(model.fc1.weight)[1])), "fc1")
    h = torch.relu(model.fc2(torch.relu(h)))  # fc2 stays fp32 (`bits: none`)
    wq, ws = module.quantize_weight(model.head.weight)
    expected = q(F.linear(q(h, "relu_2"), wq, module.quantize_bias(model.head.bias, obs["relu_2"].qparams()[0], ws)), "head")
    assert torch.allclose(got, expected, atol=1e-6)


def test_int8_qat_errors_are_located(cli, write_spec):
    path = write_spec(MLP + "quantize:\n  default: int8\n  method: dynamic\n  qat: true\n")
    code, _, err = cli("build", path, "-o", path.parent / "out")
    assert code == 2 and "nothing to learn for int8 dynamic" in located(err, path, MLP.count("\n") + 4, "true")
    assert "method: static" in err  # the hint
    text = MLP + STATIC_QAT + "  rules:\n    - {match: head, bits: 4}\n"
    path = write_spec(text, "block.yaml")
    code, _, err = cli("build", path, "-o", path.parent / "out2")
    assert code == 2 and "cannot also train the block format of rule 'head'" in located(err, path, text.count("\n"), "{match")
    text = MLP + STATIC_QAT + "  rules:\n    - {match: '*', bits: none}\n"
    path = write_spec(text, "none.yaml")
    code, _, err = cli("build", path, "-o", path.parent / "out3")
    assert code == 2 and "quantizes no layer of this model" in located(err, path, text.count("\n") - 2, "true")
    text = MLP.replace("  eval: {metrics: [accuracy]}\n", "  eval: {metrics: [accuracy]}\n  distributed: {strategy: fsdp}\n") + STATIC_QAT
    path = write_spec(text, "fsdp.yaml")
    code, _, err = cli("build", path, "-o", path.parent / "out4")
    assert code == 2 and "fsdp is not supported with int8 quantization-aware training" in located(
        err, path, text.splitlines().index("  distributed: {strategy: fsdp}") + 1, "{strategy")


def test_layers_training_cannot_simulate_are_located_errors(cli, write_spec):
    """A token embedding (ORT quantizes its Gather) and an LM head tied to it (model.py has no
    module of its own for it) are errors at `qat:`, whose hint names the rule that fixes it."""
    base = f"lbdlc: 1\nextends: {ROOT / 'tests' / 'specs' / 'gpt_tiny_train.yaml'}\nname: g\n" + STATIC_QAT
    path = write_spec(base, "g.yaml")
    code, _, err = cli("build", path, "-o", path.parent / "out", "-b", "pytorch")
    assert code == 2 and "would also quantize layer 'wte' (embedding)" in located(err, path, 7, "true")
    assert '{match: "wte", bits: none}' in err
    text = base + "  rules:\n" + "".join(f"    - {{match: '{m}', bits: none}}\n" for m in ("wte", "wpe", "h.*.attn"))
    path = write_spec(text, "g2.yaml")
    code, _, err = cli("build", path, "-o", path.parent / "out2", "-b", "pytorch")
    assert code == 2 and "cannot simulate layer 'lm_head': its weight is wte.weight" in located(err, path, 7, "true")


@pytest.fixture
def one_thread():
    """Training runs in-process on one thread: on 2 shared cores, torch's thread pool makes the
    MLP's steps 10-20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_deployed_int8_model_scores_what_qat_training_reported(tmp_path, one_thread):
    """train.py (fake-quantized, 3 epochs) and the ONNX Runtime int8 build of its weights and
    ranges score the digits test split alike, and the build's activation scales are the trained
    ones. A run paused and resumed (ranges restored from the checkpoint) ends bit for bit where
    the uninterrupted one does."""
    from lbdlc.driver import BuildOptions, build

    spec = tmp_path / "mlp_qat.yaml"
    spec.write_text(MLP + STATIC_QAT)
    out = build_train(tmp_path, spec.read_text(), name="mlp_qat.yaml")
    module = load_train(out)
    run, split = tmp_path / "run", tmp_path / "split"
    summary = module.main(["--out", str(run), "--epochs", "3"])
    assert summary["steps"] == 117 and summary["test"]["accuracy"] > 0.85
    saved = json.loads((run / "qat_ranges.json").read_text())
    assert set(saved["tensors"]) == {"x", "fc1", "relu_1", "fc2", "relu_2", "head"}
    assert saved["tensors"]["head"]["steps"] == 117
    assert module.main(["--out", str(split), "--epochs", "3", "--stop-at", "50"])["steps"] == 50
    assert json.loads((split / "checkpoint" / "qat_ranges.json").read_text())["tensors"]["head"]["steps"] == 50
    module.main(["--out", str(split), "--epochs", "3", "--resume"])
    assert (split / "qat_ranges.json").read_text() == (run / "qat_ranges.json").read_text()
    assert (split / "weights.safetensors").read_bytes() == (run / "weights.safetensors").read_bytes()

    result = build(spec, tmp_path / "deployed", BuildOptions(weights=run / "weights.safetensors", backends=("onnx",)))
    report = result.manifest["quantization_int8"]["qat"]
    assert report["calibrated"] == [] and report["trained"] == ["fc1", "fc2", "head", "relu_1", "relu_2", "x"]
    from io import StringIO

    from rich.console import Console

    from lbdlc.cli_quant import print_report

    printed = Console(file=StringIO(), width=200)
    print_report(result.manifest, printed)
    assert "activation ranges from training (qat): 6 from " in printed.file.getvalue() and ", 0 calibrated" in printed.file.getvalue()
    model = onnx.load(str(result.out_dir / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for tensor, r in saved["tensors"].items():
        assert inits[f"{tensor}_scale"] == np.float32(r["scale"]) and int(inits[f"{tensor}_zero_point"]) == r["zero_point"]
    import onnxruntime as ort

    test = module.make_data()["test"]
    session = ort.InferenceSession(str(result.out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"x": test["x"].numpy()})[0]
    labels = test["head"].numpy()
    deployed = float((logits.argmax(-1) == labels).mean())
    print(f"int8 static QAT digits MLP: train.py test accuracy {summary['test']['accuracy']:.4f}, ORT int8 {deployed:.4f}")
    assert abs(deployed - summary["test"]["accuracy"]) <= 1 / len(labels) + 1e-9

    broken = json.loads((run / "qat_ranges.json").read_text())
    broken["tensors"]["fc1"]["rmax"] = None
    (run / "qat_ranges.json").write_text(json.dumps(broken))  # a damaged file: an error at `qat:`
    with pytest.raises(SpecError, match="tensor 'fc1' has no finite range") as e:
        build(spec, tmp_path / "broken", BuildOptions(weights=run / "weights.safetensors", backends=("onnx",)))
    assert e.value.loc.line == (MLP + STATIC_QAT).count("\n")
    (run / "qat_ranges.json").unlink()  # no ranges beside the weights: calibrated, with a warning
    result = build(spec, tmp_path / "calibrated", BuildOptions(weights=run / "weights.safetensors", backends=("onnx",)))
    assert "qat" not in result.manifest["quantization_int8"]
    assert any("activation ranges are calibrated" in w.message for w in result.warnings)


def test_rank3_linear_layers_deploy_as_trained(tmp_path, one_thread):
    """A tiny GPT with its MLPs int8 (embeddings, attention and the tied head kept fp32 by
    rules): rank-3 linear layers are MatMul + Add in ONNX, ORT quantizes the MatMul's output
    and leaves the bias fp32, and train.py does the same (`<layer>#matmul`); the ORT build's
    logits equal train.py's evaluation forward up to float rounding."""
    import shutil

    from lbdlc.driver import BuildOptions, build

    (tmp_path / "specs").mkdir()
    shutil.copytree(ROOT / "tests" / "data", tmp_path / "data")  # the spec's data path, ../data/declaration.txt
    rules = "".join(f"    - {{match: '{m}', bits: none}}\n" for m in ("wte", "wpe", "h.*.attn", "lm_head"))
    text = (f"lbdlc: 1\nextends: {ROOT / 'tests' / 'specs' / 'gpt_tiny_train.yaml'}\nname: g\n" + STATIC_QAT + "  calibration: {samples: 8}\n  rules:\n" + rules)
    spec = tmp_path / "specs" / "g.yaml"
    spec.write_text(text)
    module = load_train(build_train(tmp_path / "specs", text, name="g.yaml"))
    assert module.QAT_INT8["h.0.mlp.c_fc"] == ("linear", "h.0.ln_2", "h.0.mlp.c_fc#matmul", False)
    run = tmp_path / "run"
    module.main(["--out", str(run), "--steps", "12"])
    result = build(spec, tmp_path / "deployed", BuildOptions(weights=run / "weights.safetensors", backends=("onnx",)))
    qat = result.manifest["quantization_int8"]["qat"]
    assert qat["calibrated"] == [] and sum("c_fc/matmul" in t for t in qat["trained"]) == 2, qat
    from safetensors.torch import load_file

    model = module.Model()
    model.load_state_dict(load_file(str(run / "weights.safetensors")))
    module.simulate_int8_quantization(model)
    module.load_qat_ranges(model, run / "qat_ranges.json")
    model.eval()
    tokens = module.make_data(str(tmp_path / "data" / "declaration.txt"))[0]["val"]["tokens"][:3]
    with torch.no_grad():
        expected = model(tokens).numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(str(result.out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"tokens": tokens.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max()


@pytest.mark.slow
def test_lenet_int8_static_qat_accuracy(tmp_path, one_thread):
    """lenet on the digits (20 epochs each): fp32, post-training int8 static of the fp32 weights
    (calibrated on 64 train samples) and int8 static QAT, all through ONNX Runtime; QAT within
    0.5 points of fp32 (issue 7), and its build scoring what its train.py reported."""
    from lbdlc.driver import BuildOptions, build
    from lbdlc.quant_report import accuracy

    lenet = (SPECS / "lenet.yaml").read_text()
    specs = {"fp32": lenet, "ptq": lenet + "quantize:\n  default: int8\n  method: static\n", "qat": lenet + STATIC_QAT}
    paths = {}
    for name, text in specs.items():
        paths[name] = tmp_path / f"lenet_{name}.yaml"
        paths[name].write_text(text)
    trained = {}
    for name in ("fp32", "qat"):
        module = load_train(build_train(tmp_path, specs[name], name=f"train_{name}.yaml"))
        trained[name] = (module.main(["--out", str(tmp_path / f"run_{name}")]), module)
    test = trained["fp32"][1].make_data()["test"]
    inputs, labels = {"image": test["image"].numpy()}, test["fc2"].numpy()
    acc = {}
    for name, run in (("fp32", "fp32"), ("ptq", "fp32"), ("qat", "qat")):
        weights = tmp_path / f"run_{run}" / "weights.safetensors"
        out = build(paths[name], tmp_path / f"build_{name}", BuildOptions(weights=weights, backends=("onnx",))).out_dir
        acc[name] = 100 * accuracy(out, "onnx", inputs, labels)
    reported = {k: 100 * v[0]["test"]["accuracy"] for k, v in trained.items()}
    print(f"\nlenet digits test accuracy % on {len(labels)} images (ONNX Runtime): fp32 {acc['fp32']:.2f}, "
          f"int8 static PTQ {acc['ptq']:.2f}, int8 static QAT {acc['qat']:.2f}; train.py reported fp32 "
          f"{reported['fp32']:.2f}, QAT {reported['qat']:.2f}")
    assert acc["fp32"] > 95
    assert acc["fp32"] - acc["qat"] <= 0.5
    assert abs(acc["qat"] - reported["qat"]) <= 100 / len(labels) + 1e-9
