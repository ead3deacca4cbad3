"""An -O2 build end to end: folded and fused ONNX and TVM artifacts agree with the unfused
model.py (invariant 1 across passes), the folded weights the TVM library reads are written
beside the training weights, and -O2 builds are reproducible."""
import json

import onnx
import pytest
from safetensors.torch import load_file, save_file

from lbdlc.driver import BuildOptions, build
from lbdlc.verify import compare, random_inputs

from conftest import SPECS, perturbed_weights
from test_parity import TOLERANCE

SMALL = ("inputs.image.shape=[batch, 3, 64, 64]", "classes=10")
SPEC = SPECS / "resnet50.yaml"


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("o2") / "w.safetensors"
    save_file(perturbed_weights(SPEC, SMALL), str(path))
    return path


@pytest.fixture(scope="module")
def o2_build(weights_file):
    """The file's only TVM build."""
    return build(SPEC, weights_file.parent / "o2", BuildOptions(weights=weights_file, overrides=SMALL, level=2))


@pytest.mark.parametrize("batch", [1, 2])
def test_o2_artifacts_agree_with_the_unfused_module(o2_build, batch):
    agreement = compare(o2_build.out_dir, random_inputs(o2_build.out_dir, {"batch": batch}, seed=batch))
    assert agreement.ok(TOLERANCE), agreement


def test_folded_weights_are_written_for_the_tvm_library(o2_build, weights_file):
    out = o2_build.out_dir
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["inference_weights"] == "weights.inference.safetensors"
    folded = load_file(str(out / "weights.inference.safetensors"))
    assert set(folded) == set(manifest["model"]["parameter_order"])
    assert not any(".bn" in n or "downsample.1" in n for n in folded)  # batch norms are gone ...
    assert "conv1.bias" in folded and "layer1.0.conv3.bias" in folded  # ... into their convolutions' new biases
    # model.py and weights.safetensors follow the spec as written: the trained weights, unfolded.
    assert load_file(str(out / "weights.safetensors")).keys() == load_file(str(weights_file)).keys()
    assert "BatchNorm2d" in (out / "model.py").read_text()
    log = {r["pass"]: r for r in manifest["passes"]["inference"]}
    assert log["fold_batch_norm"]["changes"] == {"batch_norm folded into the layer before it": 53}
    assert log["fuse_conv_activation"]["nodes"] == [122, 57]


def test_o2_onnx_is_smaller(o2_build, weights_file, tmp_path):
    o0 = build(SPEC, tmp_path / "o0", BuildOptions(weights=weights_file, overrides=SMALL, level=0, backends=("onnx",)))
    count = lambda d: len(onnx.load(d / "model.onnx").graph.node)  # noqa: E731
    ops = lambda d: {n.op_type for n in onnx.load(d / "model.onnx").graph.node}  # noqa: E731
    assert "BatchNormalization" in ops(o0.out_dir) and "BatchNormalization" not in ops(o2_build.out_dir)
    assert count(o2_build.out_dir) == count(o0.out_dir) - 53


def test_o2_builds_are_reproducible(weights_file, tmp_path):
    options = BuildOptions(weights=weights_file, overrides=SMALL, level=2, backends=("pytorch", "onnx"))
    a = build(SPEC, tmp_path / "a", options).manifest
    b = build(SPEC, tmp_path / "b", options).manifest
    assert a["artifacts"] == b["artifacts"] and a["passes"] == b["passes"]
