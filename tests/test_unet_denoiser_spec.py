"""specs/unet_denoiser.yaml: the U-Net denoiser against a torch.nn reference with the same
parameter names (exact count, skip shapes, outputs); the three backends agree on one build
at a small size (3 channels, 16x16, base width 8)."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lbdlc.verify import compare, random_inputs, run_pytorch

from conftest import SPECS, located
from small_zoo import build_perturbed, check_report, generated_module, load_reference, trainable_count
from test_parity import TOLERANCE

SMALL = ("inputs.noisy.shape=[batch, 3, 16, 16]", "channels=3", "base=8")


class DoubleConv(nn.Module):
    def __init__(self, cin, width):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv2(F.relu(self.conv1(x))))


class ReferenceUNet(nn.Module):
    def __init__(self, channels=1, base=32):
        super().__init__()
        self.enc1 = DoubleConv(channels, base)
        self.enc2 = DoubleConv(base, 2 * base)
        self.bottleneck = DoubleConv(2 * base, 4 * base)
        self.up2 = nn.ConvTranspose2d(4 * base, 2 * base, 2, stride=2)
        self.dec2 = DoubleConv(4 * base, 2 * base)
        self.up1 = nn.ConvTranspose2d(2 * base, base, 2, stride=2)
        self.dec1 = DoubleConv(2 * base, base)
        self.denoised = nn.Conv2d(base, channels, 1)

    def forward(self, noisy):
        e1 = self.enc1(noisy)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottleneck(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))  # skips at the same resolution
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.denoised(d1)


def test_unet_parameter_count_and_shapes(cli):
    report = check_report(cli, "unet_denoiser")
    assert report["params"] == trainable_count(ReferenceUNet()) == 465_953
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers["skip2"]["output_shape"] == ["batch", 128, 14, 14]
    assert layers["skip1"]["output_shape"] == ["batch", 64, 28, 28]
    assert layers["bottleneck.conv2"]["output_shape"] == ["batch", 128, 7, 7]
    assert report["outputs"] == [{"name": "denoised", "shape": ["batch", 1, 28, 28], "dtype": "float32"}]
    small = check_report(cli, "unet_denoiser", *SMALL)
    assert small["params"] == trainable_count(ReferenceUNet(channels=3, base=8))
    assert small["outputs"][0]["shape"] == ["batch", 3, 16, 16]


def test_a_size_the_skips_cannot_match_is_a_located_error(cli):
    """30 -> 15 -> 7 on the way down, 7 -> 14 on the way up: the skip2 concat cannot match."""
    path = SPECS / "unet_denoiser.yaml"
    code, out, err = cli("check", path, "--set", "inputs.noisy.shape=[batch, 1, 30, 30]")
    assert code == 2
    line = next(k for k, text in enumerate(path.read_text().splitlines(), 1) if "name: skip2" in text)
    first = located(err, path, line, "concat")
    assert "needs equal sizes in dim 2, got [batch, 64, 14, 14], [batch, 64, 15, 15]" in first


@pytest.fixture(scope="module")
def unet_build(tmp_path_factory):
    return build_perturbed("unet_denoiser", tmp_path_factory.mktemp("unet"), SMALL)


def test_unet_backends_agree_and_match_the_reference(unet_build):
    inputs = random_inputs(unet_build, {"batch": 2})
    agreement = compare(unet_build, inputs)
    scale = max(1.0, float(abs(run_pytorch(unet_build, inputs)[0]).max()))
    assert all(d <= TOLERANCE * scale for d in agreement.max_abs_diff.values()), (agreement, scale)
    noisy = torch.from_numpy(inputs["noisy"])
    reference = load_reference(ReferenceUNet(channels=3, base=8), unet_build)
    with torch.no_grad():
        torch.testing.assert_close(generated_module(unet_build)(noisy), reference(noisy), atol=1e-5, rtol=1e-5)
