"""MobileNetV2 from one inverted-residual block: torchvision's count, three-backend parity."""
import json

from safetensors.torch import save_file

from lbdlc.driver import BuildOptions, build
from lbdlc.verify import compare, random_inputs, run_pytorch

from conftest import SPECS, perturbed_weights

SMALL = ("inputs.image.shape=[batch, 3, 32, 32]", "classes=10")


def test_mobilenet_v2_matches_torchvision_count(cli):
    code, out, err = cli("check", SPECS / "mobilenet_v2.yaml", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["params"] == 3_504_872  # torchvision mobilenet_v2 (BOOK.md)
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers["s7.project_bn"]["output_shape"] == ["batch", 320, 7, 7]
    assert "s1.expand.conv" not in layers  # t = 1: no expansion
    assert "s2.0.residual" not in layers and "s2.1.residual" in layers
    assert layers["s3.0.dw"]["params"] == 144 * 9  # depthwise: one 3x3 filter per channel


def test_mobilenet_v2_backends_agree(tmp_path):
    save_file(perturbed_weights(SPECS / "mobilenet_v2.yaml", SMALL), str(tmp_path / "w.safetensors"))
    out = build(SPECS / "mobilenet_v2.yaml", tmp_path / "out", BuildOptions(weights=tmp_path / "w.safetensors", overrides=SMALL)).out_dir
    inputs = random_inputs(out, {"batch": 2})
    agreement = compare(out, inputs)
    scale = max(1.0, float(abs(run_pytorch(out, inputs)[0]).max()))
    assert all(d <= 1e-4 * scale for d in agreement.max_abs_diff.values()), (agreement, scale)
