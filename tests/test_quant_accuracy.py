"""Accuracy of quantized lenet on the digits data (issue #7's acceptance bounds), through ONNX
Runtime and TVM: lenet is trained by its own train.py, then built from those weights as fp32,
int8 dynamic, int8 static (calibrated on the train split), Q8_0, Q4_0 and Q4_1, and each build's
test-split accuracy is compared with fp32's. Slow: one training run (~20-30 s) and six TVM builds.

Measured (2026-11-23, this machine): fp32 99.16% on 359 test images; every quantized build
99.16% too (ONNX Runtime and TVM) except where the printout says otherwise. Q4_x touches fc1 only:
fc2's rows (120) are not a multiple of 32 and the convolutions are not linear layers.
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import ROOT

from lbdlc import calibration
from lbdlc.driver import BuildOptions, build
from lbdlc.lower import load, lower
from lbdlc.quant_report import accuracy
from lbdlc.training.run import TrainOptions, prepare, run

LENET = ROOT / "specs" / "lenet.yaml"
# The bounds, in accuracy points (percent): int8 static 0.5, Q4_1 2; the same for their siblings.
BOUND = {"int8-dynamic": 0.5, "int8-static": 0.5, "q8_0": 0.5, "q4_0": 2.0, "q4_1": 2.0}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lenet_q")
    prepare(LENET, tmp / "train", (), False)
    assert run(tmp / "train", TrainOptions(device="cpu")) == 0
    weights = tmp / "train" / "run" / "weights.safetensors"
    builds = {}
    for q in [None] + list(BOUND):
        builds[q or "fp32"] = build(LENET, tmp / (q or "fp32"), BuildOptions(weights=weights, quantize=q, backends=("onnx", "tvm")))
    loaded = load(LENET)
    test = calibration.data_splits(loaded, lower(loaded))["test"]
    labels = next(v for k, v in test.items() if k != "image")
    return builds, {"image": test["image"].astype(np.float32)}, labels


def test_lenet_quantized_accuracy(lenet):
    builds, inputs, labels = lenet
    acc = {name: {b: 100 * accuracy(r.out_dir, b, inputs, labels) for b in ("onnx", "tvm")} for name, r in builds.items()}
    sizes = {name: (r.out_dir / "model.onnx").stat().st_size for name, r in builds.items()}
    print(f"\nlenet on {len(labels)} digits test images: accuracy % (ONNX Runtime / TVM), model.onnx bytes")
    for name in acc:
        print(f"  {name:<13} {acc[name]['onnx']:6.2f} / {acc[name]['tvm']:6.2f}   {sizes[name]:>8,}")
    assert acc["fp32"]["onnx"] > 95 and abs(acc["fp32"]["onnx"] - acc["fp32"]["tvm"]) < 1e-9
    for name, bound in BOUND.items():
        for backend in ("onnx", "tvm"):
            drop = acc["fp32"][backend] - acc[name][backend]
            assert drop <= bound, (name, backend, drop)
    assert sizes["int8-static"] < 0.35 * sizes["fp32"] and sizes["int8-dynamic"] < 0.35 * sizes["fp32"]


def test_lenet_quantization_report(lenet):
    """The build report's whole-model error: int8 outputs against fp32 on the spec's data."""
    builds, _, _ = lenet
    static = builds["int8-static"].manifest["quantization_int8"]
    assert static["calibration"]["split"] == "train" and static["samples"] == "the 'train' split (seed 0)"
    assert {r["param"] for r in static["layers"]} >= {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    for name in ("int8-dynamic", "int8-static"):
        (row,) = builds[name].manifest["quantization_int8"]["outputs"]
        print(name, row)
        assert row["rel_rms_error"] < 0.05
    (row,) = builds["q4_1"].manifest["quantization_outputs"]["outputs"]
    print("q4_1", row)
    assert row["rel_rms_error"] < 0.1


def test_full_gpt2_file_sizes(tmp_path):
    """Issue #7 on full GPT-2 (124M parameters, random weights): the Q4_1 model.onnx is at most
    17% of the fp32 file and the int8 one at most 27%. Measured 2026-11-23: fp32 497,818,030
    bytes; Q4_1 81,070,719 (16.3%); int8 dynamic 127,964,780 (25.7%, the token table stored
    once for the Gather and the tied lm_head; 33.5% before). ~3 min and ~7 GB of memory."""
    gpt2 = ROOT / "specs" / "gpt2.yaml"
    sizes = {}
    for q in (None, "q4_1", "int8"):
        out = build(gpt2, tmp_path / (q or "fp32"), BuildOptions(backends=("onnx",), quantize=q)).out_dir
        sizes[q or "fp32"] = (out / "model.onnx").stat().st_size
        for p in out.iterdir():
            if p.name.startswith("weights"):
                p.unlink()  # keep the test's disk use down
    print({k: (v, round(v / sizes["fp32"], 4)) for k, v in sizes.items()})
    assert sizes["q4_1"] <= 0.17 * sizes["fp32"]
    assert sizes["int8"] <= 0.27 * sizes["fp32"]
