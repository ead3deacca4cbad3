"""SSDLite on MobileNetV2: parameter count against torch.nn modules (torchvision's extra and
prediction blocks) plus torchvision's MobileNetV2 features, the box list's shape per scale,
and three-backend parity at 64x64."""
import json

import numpy as np
import pytest
from safetensors.torch import save_file
from torch import nn

from lbdlc.driver import BuildOptions, build
from lbdlc.verify import compare, random_inputs, run_pytorch

from conftest import SPECS, perturbed_weights

SPEC = SPECS / "ssd_lite.yaml"
SMALL = ("inputs.image.shape=[batch, 3, 64, 64]", "classes=3", "anchors=2")


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def extra_block(cin: int, cout: int) -> nn.Sequential:
    """torchvision.models.detection.ssdlite._extra_block (Conv2dNormActivation = conv, BN, ReLU6)."""
    mid = cout // 2
    return nn.Sequential(
        nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
        nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
        nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(),
    )


def prediction_block(cin: int, cout: int) -> nn.Sequential:
    """torchvision.models.detection.ssdlite._prediction_block."""
    return nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(),
                         nn.Conv2d(cin, cout, 1))


def test_ssd_lite_parameters_and_boxes(cli):
    code, out, err = cli("check", SPEC, "--json")
    assert code == 0, err
    r = json.loads(out)
    features = 3_504_872 - (1280 * 1000 + 1000)  # torchvision mobilenet_v2 without its classifier
    extras = nn.ModuleList([extra_block(1280, 512), extra_block(512, 256), extra_block(256, 256), extra_block(256, 128)])
    heads = nn.ModuleList([prediction_block(c, 6 * (4 + 20 + 1)) for c in (576, 1280, 512, 256, 256, 128)])
    assert r["params"] == features + count(extras) + count(heads) == 3_366_020
    layers = {layer["name"]: layer for layer in r["layers"]}
    sizes = {"head1": 20, "head2": 10, "head3": 5, "head4": 3, "head5": 2, "head6": 1}  # stride 16 down to 1x1
    for head, side in sizes.items():
        assert layers[f"{head}.boxes"]["output_shape"] == ["batch", side * side * 6, 25], head
    assert layers["s6.0.expand.relu6_1"]["output_shape"] == ["batch", 576, 20, 20]
    assert r["outputs"] == [{"name": "detections", "shape": ["batch", 6 * (400 + 100 + 25 + 9 + 4 + 1), 25], "dtype": "float32"}]


@pytest.fixture(scope="module")
def small_ssd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ssd")
    save_file(perturbed_weights(SPEC, SMALL), str(tmp / "w.safetensors"))
    return build(SPEC, tmp / "out", BuildOptions(weights=tmp / "w.safetensors", overrides=SMALL)).out_dir


@pytest.mark.parametrize("batch", [1, 3])
def test_small_ssd_backends_agree(small_ssd, batch):
    inputs = random_inputs(small_ssd, {"batch": batch}, seed=batch)
    agreement = compare(small_ssd, inputs)
    scale = max(1.0, float(np.abs(run_pytorch(small_ssd, inputs)[0]).max()))
    assert all(d <= 1e-4 * scale for d in agreement.max_abs_diff.values()), (agreement, scale)


def test_box_rows_follow_positions_then_anchors(small_ssd):
    """Row k of a scale's boxes is position k // anchors (row-major over H, W), anchor k % anchors:
    the reshape follows an NHWC permute, as torchvision's SSD head does."""
    inputs = random_inputs(small_ssd, {"batch": 1})
    (boxes,) = run_pytorch(small_ssd, inputs)
    # 64x64: scales 4x4, 2x2, 1x1 (then 1x1 three more times), 2 anchors, 4 + 3 + 1 values
    assert boxes.shape == (1, 2 * (16 + 4 + 1 + 1 + 1 + 1), 8)
    source = (small_ssd / "model.py").read_text()
    assert ".permute(0, 2, 3, 1)" in source and ".reshape(" in source
