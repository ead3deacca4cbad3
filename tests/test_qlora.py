"""QLoRA: the lora_linear_q op (frozen block-quantized base + fp32 adapters) in the three
backends, the `qlora` pass from a spec's `finetune.qlora`, and `--merge` either requantizing
W̄ + scale·BA or keeping it fp32, with the manifest saying which. One TVM build (slow-marked)."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from test_parity import TOLERANCE

from conftest import SPECS, located
from lbdlc import quant_formats as qf
from lbdlc.driver import BuildOptions, build
from lbdlc.lower import load, lower
from lbdlc.passes.quantize import dequantize, to_graph_layout
from lbdlc.verify import compare, random_inputs, run_onnx, run_pytorch
from lbdlc.weights import initialize

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "tests" / "specs" / "qlora_ops.yaml"
FORMATS = {"a": "q4_1", "b": "q4_0", "c": "q8_0"}


def _packed(shape, fmt, g):
    w = torch.randn(shape, generator=g).numpy() * 0.3
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in to_graph_layout(qf.pack(w, fmt), fmt).items()}


@pytest.fixture(scope="module")
def ops_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora_ops")
    g = torch.Generator().manual_seed(5)
    weights = initialize(lower(load(OPS)), seed=1)
    for layer, fmt in FORMATS.items():
        rows = weights[f"{layer}.lora_B.weight"].shape[0]
        cols = weights[f"{layer}.lora_A.weight"].shape[1]
        weights.update({f"{layer}.{k}": v for k, v in _packed((rows, cols), fmt, g).items()})
        weights[f"{layer}.lora_B.weight"] = torch.randn(weights[f"{layer}.lora_B.weight"].shape, generator=g) * 0.5
    save_file(weights, str(out / "w.safetensors"))
    build(OPS, out / "build", BuildOptions(backends=("pytorch", "onnx"), weights=out / "w.safetensors"))
    return out / "build", weights


@pytest.mark.slow  # a TVM build: ~10-20 s with the default CPU schedules
def test_lora_linear_q_in_tvm(ops_build, tmp_path):
    out, _ = ops_build
    tvm_out = build(OPS, tmp_path / "tvm", BuildOptions(backends=("pytorch", "tvm"), weights=out.parent / "w.safetensors")).out_dir
    inputs = random_inputs(tvm_out, {"batch": 3, "seq": 4})
    agreement = compare(tvm_out, inputs, ("pytorch", "tvm"))
    print("lora_linear_q TVM vs PyTorch:", agreement.max_abs_diff)
    assert agreement.ok(TOLERANCE), agreement.max_abs_diff


def test_lora_linear_q_backends_agree_with_reference(ops_build):
    out, w = ops_build
    inputs = random_inputs(out, {"batch": 3, "seq": 4})
    agreement = compare(out, inputs, ("pytorch", "onnx"))
    assert agreement.ok(TOLERANCE), agreement.max_abs_diff
    x, xs = (torch.from_numpy(v) for v in inputs.values())
    got = run_pytorch(out, inputs)
    for k, (layer, src, scale) in enumerate((("a", x, 0.5), ("b", x, 2.0), ("c", xs, 1.0))):
        buffers = {p: w[f"{layer}.{p}"].numpy() for p in ("qweight", "scale", "min") if f"{layer}.{p}" in w}
        base = F.linear(src, torch.from_numpy(dequantize(buffers, FORMATS[layer])), w.get(f"{layer}.bias"))
        ref = base + scale * F.linear(F.linear(src, w[f"{layer}.lora_A.weight"]), w[f"{layer}.lora_B.weight"])
        assert np.abs(got[k] - ref.numpy()).max() < 1e-4, layer
        assert np.abs(got[k] - base.numpy()).max() > 1e-2  # the adapter contributes


def test_parameters_and_frozen_base(ops_build):
    import importlib.util

    g = lower(load(OPS))
    a = {k: (tuple(p.shape), p.dtype, p.buffer) for k, p in g.params.items() if k.startswith("a.")}
    assert a == {"a.qweight": ((5, 2, 16), "uint8", True), "a.scale": ((5, 2), "float16", True), "a.min": ((5, 2), "float16", True),
                 "a.bias": ((5,), "float32", False), "a.lora_A.weight": ((3, 64), "float32", False),
                 "a.lora_B.weight": ((5, 3), "float32", False)}
    # trainable values: biases and adapters (the quantized base is buffers)
    assert sum(p.numel for p in g.params.values() if not p.buffer) == (5 + 3 * 64 + 5 * 3) + (2 * 64 + 7 * 2) + (6 + 4 * 32 + 6 * 4)
    out, _ = ops_build
    spec = importlib.util.spec_from_file_location("_qlora_model_check", out / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.Model()
    assert sorted(k for k, p in model.named_parameters() if p.requires_grad) == sorted(
        f"{l}.lora_{p}.weight" for l in "abc" for p in "AB")
    assert sorted(model.state_dict()) == sorted(g.params)


QLORA = """lbdlc: 1
extends: {lora}
name: mlp_digits_qlora
finetune:
  qlora: {{format: q4_1, merge: {merge}}}
"""


def _spec(tmp_path, merge="requantize"):
    import os

    path = tmp_path / f"qlora_{merge}.yaml"
    path.write_text(QLORA.format(lora=os.path.relpath(SPECS / "mlp_digits_lora.yaml", tmp_path), merge=merge))
    return path


def test_qlora_finetune_build_and_merges(tmp_path):
    g = torch.Generator().manual_seed(3)
    base = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in initialize(lower(load(SPECS / "mlp_digits.yaml"))).items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    spec = _spec(tmp_path)
    step0 = build(spec, tmp_path / "s0", BuildOptions(backends=("pytorch", "onnx"), weights=tmp_path / "base.safetensors"))
    report = step0.manifest["finetune"]
    assert [e["layer"] for e in report["qlora"]["layers"]] == ["fc1", "fc2", "head"] and report["trainable_params"] == 1832
    assert (report["params"], report["quantized_base_values"]) == (19058, 64 * 128 + 128 * 64 + 64 * 10)
    w0 = load_file(str(tmp_path / "s0" / "weights.safetensors"))
    assert "fc1.weight" not in w0 and w0["fc1.qweight"].dtype == torch.uint8
    x = {"x": np.random.default_rng(4).random((3, 64), dtype=np.float32)}
    # step 0 (B = 0): the q4_1-quantized base model
    h = torch.from_numpy(x["x"])
    for layer in ("fc1", "fc2", "head"):
        wq = dequantize({p: w0[f"{layer}.{p}"].numpy() for p in ("qweight", "scale", "min")}, "q4_1")
        h = F.linear(h, torch.from_numpy(wq), base[f"{layer}.bias"])
        h = torch.relu(h) if layer != "head" else h
    assert np.abs(run_pytorch(step0.out_dir, x)[0] - h.numpy()).max() < 1e-5
    assert np.abs(run_onnx(step0.out_dir, x)[0] - h.numpy()).max() < 1e-5
    # a "trained" checkpoint (random B), then both merges
    tuned = dict(w0)
    for k in tuned:
        if ".lora_B." in k:
            tuned[k] = torch.randn(tuned[k].shape, generator=g) * 0.3
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    unmerged = build(spec, tmp_path / "u", BuildOptions(backends=("pytorch",), weights=tmp_path / "tuned.safetensors"))
    ref = run_pytorch(unmerged.out_dir, x)[0]
    fp32 = build(_spec(tmp_path, "float32"), tmp_path / "f", BuildOptions(backends=("pytorch", "onnx"), weights=tmp_path / "tuned.safetensors", merge=True))
    assert "kept unquantized" in fp32.manifest["finetune"]["precision"]
    assert fp32.manifest["model"]["params"] == 17226  # the fp32 base model's shape
    assert np.abs(run_onnx(fp32.out_dir, x)[0] - ref).max() < 1e-5
    rq = build(spec, tmp_path / "r", BuildOptions(backends=("pytorch", "onnx"), weights=tmp_path / "tuned.safetensors", merge=True))
    assert "requantized" in rq.manifest["finetune"]["precision"]
    merged = rq.manifest["finetune"]["qlora"]["merged"]
    assert [m["merged_to"] for m in merged] == ["q4_1"] * 3
    wr = load_file(str(tmp_path / "r" / "weights.safetensors"))
    assert sorted(wr) == sorted(f"{l}.{p}" for l in ("fc1", "fc2", "head") for p in ("qweight", "scale", "min", "bias"))
    # requantizing moves each weight by at most its block's step (≈ range/15 for 4 bits)
    got = run_onnx(rq.out_dir, x)[0]
    assert np.abs(got - run_pytorch(rq.out_dir, x)[0]).max() < 1e-5
    err = np.abs(got - ref).max() / np.abs(ref).max()
    print("QLoRA merge requantized to q4_1: max |out - unmerged| / max |out| =", err,
          "; per-layer max weight error", [m["requantization_max_abs_error"] for m in merged])
    assert 0 < err < 0.2


def test_qlora_format_errors_are_located(cli, write_spec, tmp_path):
    import os

    path = write_spec(QLORA.format(lora=os.path.relpath(SPECS / "mlp_digits_lora.yaml", tmp_path), merge="requantize").replace("q4_1", "q3_k"), "bad.yaml")
    code, _, err = cli("check", path)
    assert code == 2
    located(err, path, 5, "q3_k")


def test_qlora_build_loads_a_peft_adapter(tmp_path):
    """--adapter on a QLoRA spec: the adapter's A and B land in the lora_linear_q layers."""
    from lbdlc.adapters import save_adapter
    from lbdlc.lora import lora_pass
    from lbdlc.passes import PassManager

    g = torch.Generator().manual_seed(8)
    base = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in initialize(lower(load(SPECS / "mlp_digits.yaml"))).items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    loaded = load(SPECS / "mlp_digits_lora.yaml")
    res = PassManager([lora_pass(loaded)], "training").run(lower(loaded), base)
    tensors = {k: torch.randn(v.shape, generator=g) for k, v in res.weights.items() if ".lora_" in k}
    save_adapter(res.graph, {**res.weights, **tensors}, tmp_path / "ad", alpha=8.0)
    out = build(_spec(tmp_path), tmp_path / "q", BuildOptions(backends=("pytorch",), weights=tmp_path / "base.safetensors",
                                                               adapter=tmp_path / "ad"))
    got = load_file(str(out.out_dir / "weights.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    assert got["fc2.qweight"].dtype == torch.uint8 and "fc2.weight" not in got
