"""The diffusion U-Net against a DDPM-style reference written with torch.nn (same parameter
names, so load_state_dict(strict=True) checks every name and shape): exact parameter count at
full size, outputs at a small size, three-backend parity, and the timestep reaching every level."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lbdlc.driver import BuildOptions, build
from lbdlc.verify import compare, random_inputs, run_pytorch

from conftest import SPECS, perturbed_weights

SPEC = SPECS / "diffusion_unet.yaml"
SMALL = ("image_size=16", "ch=32", "groups=8")


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """DDPM's get_timestep_embedding (diffusion_tf/nn.py), frequencies rounded once from float64."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float64) * -(math.log(10000) / (half - 1))).float()
    angle = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, time_dim: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(time_dim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x))) + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))  # dropout: identity in eval
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """DDPM's AttnBlock (one head); its 1x1 convs q, k, v, proj_out are linear maps per position."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c)
        self.attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.attn, name, nn.Linear(c, c))

    def forward(self, x):
        b, c, hh, ww = x.shape
        h = self.norm(x).reshape(b, c, hh * ww)
        q, k, v = (torch.einsum("oc,bcn->bon", getattr(self.attn, p).weight, h) + getattr(self.attn, p).bias[:, None]
                   for p in ("q_proj", "k_proj", "v_proj"))
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c ** -0.5, dim=2)
        h = torch.einsum("bij,bcj->bci", w, v)
        h = torch.einsum("oc,bcn->bon", self.attn.out_proj.weight, h) + self.attn.out_proj.bias[:, None]
        return x + h.reshape(b, c, hh, ww)


class ReferenceUNet(nn.Module):
    def __init__(self, ch: int = 64, groups: int = 32):
        super().__init__()
        td = 4 * ch
        self.ch = ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, td), nn.SiLU(), nn.Linear(td, td))
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down1 = ResBlock(ch, ch, td, groups)
        self.downsample1 = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.down2 = ResBlock(ch, 2 * ch, td, groups)
        self.downsample2 = nn.Conv2d(2 * ch, 2 * ch, 3, stride=2, padding=1)
        self.mid1, self.mid_attn, self.mid2 = ResBlock(2 * ch, 2 * ch, td, groups), AttnBlock(2 * ch, groups), ResBlock(2 * ch, 2 * ch, td, groups)
        self.upconv2 = nn.Conv2d(2 * ch, 2 * ch, 3, padding=1)
        self.up2 = ResBlock(4 * ch, 2 * ch, td, groups)
        self.upconv1 = nn.Conv2d(2 * ch, 2 * ch, 3, padding=1)
        self.up1 = ResBlock(3 * ch, ch, td, groups)
        self.norm_out, self.conv_out = nn.GroupNorm(groups, ch), nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, x, t):
        temb = self.time_mlp(timestep_embedding(t, self.ch))
        h1 = self.down1(self.conv_in(x), temb)
        h2 = self.down2(self.downsample1(h1), temb)
        h = self.mid2(self.mid_attn(self.mid1(self.downsample2(h2), temb)), temb)
        h = self.up2(torch.cat([self.upconv2(F.interpolate(h, scale_factor=2.0, mode="nearest")), h2], 1), temb)
        h = self.up1(torch.cat([self.upconv1(F.interpolate(h, scale_factor=2.0, mode="nearest")), h1], 1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))


def test_full_size_count_and_shapes(cli):
    code, out, err = cli("check", SPEC, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["params"] == sum(p.numel() for p in ReferenceUNet().parameters()) == 2_328_899
    assert r["outputs"] == [{"name": "conv_out", "shape": ["batch", 3, 32, 32], "dtype": "float32"}]
    layers = {layer["name"]: layer for layer in r["layers"]}
    assert layers["time_embed"]["output_shape"] == ["batch", 64]
    assert layers["mid_attn.tokens"]["output_shape"] == ["batch", 64, 128]  # 8 x 8 positions
    assert layers["skip2"]["output_shape"] == ["batch", 256, 16, 16] and layers["skip1"]["output_shape"] == ["batch", 192, 32, 32]


@pytest.fixture(scope="module")
def small_unet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unet")
    save_file(perturbed_weights(SPEC, SMALL), str(tmp / "w.safetensors"))
    return build(SPEC, tmp / "out", BuildOptions(weights=tmp / "w.safetensors", overrides=SMALL)).out_dir


@pytest.mark.parametrize("batch", [1, 3])
def test_small_unet_backends_agree(small_unet, batch):
    inputs = random_inputs(small_unet, {"batch": batch}, seed=batch, int_high=1000)
    agreement = compare(small_unet, inputs)
    assert agreement.ok(1e-4), agreement


def test_small_unet_matches_reference(small_unet):
    reference = ReferenceUNet(ch=32, groups=8).eval()
    reference.load_state_dict(load_file(str(small_unet / "weights.safetensors")), strict=True)
    inputs = random_inputs(small_unet, {"batch": 2}, seed=5, int_high=1000)
    with torch.no_grad():
        want = reference(torch.from_numpy(inputs["image"]), torch.from_numpy(inputs["t"])).numpy()
    (got,) = run_pytorch(small_unet, inputs)
    assert got.shape == (2, 3, 16, 16)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_the_timestep_changes_the_prediction(small_unet):
    inputs = random_inputs(small_unet, {"batch": 2}, seed=2, int_high=1000)
    inputs["t"][:] = [10, 900]
    (a,) = run_pytorch(small_unet, inputs)
    inputs["t"][:] = [11, 900]
    (b,) = run_pytorch(small_unet, inputs)
    assert np.abs(a[0] - b[0]).max() > 1e-4 and np.array_equal(a[1], b[1])  # per sample
