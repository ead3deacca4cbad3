"""PSPNet: parameter count (torchvision's ResNet-50 backbone, whose count dilation does not
change, plus the pyramid pooling module and classifier as torch.nn modules), shapes through
the pyramid, three-backend parity at 48x48, and the small model against a transcription of
torchvision's dilated Bottleneck and the PSPNet head written with torch.nn.functional."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lbdlc.driver import BuildOptions, build
from lbdlc.verify import compare, random_inputs, run_pytorch

from conftest import SPECS, perturbed_weights

SPEC = SPECS / "pspnet.yaml"
SMALL = ("image_size=48", "base=8", "layer1_blocks=1", "layer2_blocks=1", "layer3_blocks=2", "layer4_blocks=2",
         "head_width=16", "classes=5")


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_pspnet_parameters_and_shapes(cli):
    code, out, err = cli("check", SPEC, "--json")
    assert code == 0, err
    r = json.loads(out)
    backbone = 25_557_032 - (2048 * 1000 + 1000)  # torchvision resnet50 without fc
    ppm = nn.ModuleList([nn.Sequential(nn.Conv2d(2048, 512, 1, bias=False), nn.BatchNorm2d(512)) for _ in (1, 2, 3, 6)])
    cls = nn.Sequential(nn.Conv2d(4096, 512, 3, padding=1, bias=False), nn.BatchNorm2d(512), nn.Conv2d(512, 21, 1))
    assert r["params"] == backbone + count(ppm) + count(cls) == 46_592_597
    layers = {layer["name"]: layer for layer in r["layers"]}
    assert sum(l["params"] for n, l in layers.items() if n.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")) == backbone
    assert layers["layer4.2.relu_3"]["output_shape"] == ["batch", 2048, 60, 60]  # output stride 8: 473 -> 60
    for k, b in enumerate((1, 2, 3, 6)):
        assert layers[f"ppm.{k}.pool"]["output_shape"] == ["batch", 2048, b, b]
        assert layers[f"ppm.{k}.up"]["output_shape"] == ["batch", 512, 60, 60]
    assert layers["pyramid"]["output_shape"] == ["batch", 4096, 60, 60]
    assert r["outputs"] == [{"name": "logits", "shape": ["batch", 21, 473, 473], "dtype": "float32"}]


def test_feature_side_must_fit_the_bins(cli):
    """480 gives 60x60 features too; 464 gives 58, which 3 and 6 do not divide: a located error."""
    code, out, err = cli("check", SPEC, "--set", "image_size=464")
    assert code == 2 and "adaptive_avg_pool2d to 3x3 needs input sides that are multiples of it, but 58 is not a multiple of 3" in err
    assert err.startswith(f"{SPEC}:") and "output_size" in err.splitlines()[1]


@pytest.fixture(scope="module")
def small_psp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("psp")
    save_file(perturbed_weights(SPEC, SMALL), str(tmp / "w.safetensors"))
    return build(SPEC, tmp / "out", BuildOptions(weights=tmp / "w.safetensors", overrides=SMALL)).out_dir


@pytest.mark.parametrize("batch", [1, 2])
def test_small_pspnet_backends_agree(small_psp, batch):
    inputs = random_inputs(small_psp, {"batch": batch}, seed=batch)
    agreement = compare(small_psp, inputs)
    scale = max(1.0, float(np.abs(run_pytorch(small_psp, inputs)[0]).max()))
    assert all(d <= 1e-4 * scale for d in agreement.max_abs_diff.values()), (agreement, scale)


def reference(w: dict, image: torch.Tensor) -> torch.Tensor:
    """torchvision's resnet50(replace_stride_with_dilation=[False, True, True]) at base width 8
    with 1, 1, 2, 2 blocks, then hszhao/semseg's PPM and classifier (bilinear, align_corners)."""

    def bn(x, name):
        return F.batch_norm(x, w[f"{name}.running_mean"], w[f"{name}.running_var"], w[f"{name}.weight"], w[f"{name}.bias"])

    def bottleneck(x, p, stride, dilation, project):
        out = F.relu(bn(F.conv2d(x, w[f"{p}.conv1.weight"]), f"{p}.bn1"))
        out = F.relu(bn(F.conv2d(out, w[f"{p}.conv2.weight"], stride=stride, padding=dilation, dilation=dilation), f"{p}.bn2"))
        out = bn(F.conv2d(out, w[f"{p}.conv3.weight"]), f"{p}.bn3")
        identity = bn(F.conv2d(x, w[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1") if project else x
        return F.relu(out + identity)

    with torch.no_grad():
        x = F.max_pool2d(F.relu(bn(F.conv2d(image, w["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
        x = bottleneck(x, "layer1.0", 1, 1, True)
        x = bottleneck(x, "layer2.0", 2, 1, True)
        # dilate: the first block keeps the previous dilation, the others take the new one
        x = bottleneck(bottleneck(x, "layer3.0", 1, 1, True), "layer3.1", 1, 2, False)
        x = bottleneck(bottleneck(x, "layer4.0", 1, 2, True), "layer4.1", 1, 4, False)
        size = x.shape[2:]
        levels = [x]
        for k, b in enumerate((1, 2, 3, 6)):
            y = F.relu(bn(F.conv2d(F.adaptive_avg_pool2d(x, b), w[f"ppm.{k}.conv.weight"]), f"ppm.{k}.bn"))
            levels.append(F.interpolate(y, size, mode="bilinear", align_corners=True))
        x = F.relu(bn(F.conv2d(torch.cat(levels, 1), w["cls.0.weight"], padding=1), "cls.1"))
        x = F.conv2d(x, w["cls.4.weight"], w["cls.4.bias"])
        return F.interpolate(x, size=image.shape[2:], mode="bilinear", align_corners=True)


def test_small_pspnet_matches_torch_reference(small_psp):
    inputs = random_inputs(small_psp, {"batch": 2}, seed=7)
    want = reference(load_file(str(small_psp / "weights.safetensors")), torch.from_numpy(inputs["image"]))
    (got,) = run_pytorch(small_psp, inputs)
    assert got.shape == (2, 5, 48, 48)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4 * max(1.0, float(want.abs().max())), rtol=0)
