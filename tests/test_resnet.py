"""ResNet-50 written with one bottleneck block and repeats: torchvision's count, and parity."""
import json

from safetensors.torch import save_file

from lbdlc.driver import BuildOptions, build
from lbdlc.lower import load, lower
from lbdlc.verify import compare, random_inputs, run_pytorch

from conftest import SPECS, perturbed_weights

SMALL = ("inputs.image.shape=[batch, 3, 64, 64]", "classes=10")


def test_resnet50_matches_torchvision_count(cli):
    code, out, err = cli("check", SPECS / "resnet50.yaml", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["params"] == 25_557_032  # torchvision resnet50 (BOOK.md)
    assert report["outputs"] == [{"name": "fc", "shape": ["batch", 1000], "dtype": "float32"}]
    # Per-stage output widths 256/512/1024/2048 at 56/28/14/7.
    shapes = {layer["name"]: layer["output_shape"] for layer in report["layers"]}
    assert shapes["layer1.2.relu_3"] == ["batch", 256, 56, 56]
    assert shapes["layer2.3.relu_3"] == ["batch", 512, 28, 28]
    assert shapes["layer3.5.relu_3"] == ["batch", 1024, 14, 14]
    assert shapes["layer4.2.relu_3"] == ["batch", 2048, 7, 7]


def test_resnet50_parameter_names_follow_torchvision():
    graph = lower(load(SPECS / "resnet50.yaml"))
    names = set(graph.params)
    for expected in ["conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.bias",
                     "layer4.2.conv3.weight", "layer4.2.bn3.num_batches_tracked", "fc.weight", "fc.bias"]:
        assert expected in names
    assert "layer1.1.downsample.0.weight" not in names  # only the first block of a stage projects
    assert len([n for n in names if n.endswith(".weight") and "conv" in n]) == 1 + 16 * 3


def test_resnet50_backends_agree(tmp_path):
    save_file(perturbed_weights(SPECS / "resnet50.yaml", SMALL), str(tmp_path / "w.safetensors"))
    out = build(SPECS / "resnet50.yaml", tmp_path / "out", BuildOptions(weights=tmp_path / "w.safetensors", overrides=SMALL)).out_dir
    inputs = random_inputs(out, {"batch": 2})
    agreement = compare(out, inputs)
    scale = max(1.0, float(abs(run_pytorch(out, inputs)[0]).max()))
    assert all(d <= 1e-4 * scale for d in agreement.max_abs_diff.values()), (agreement, scale)
