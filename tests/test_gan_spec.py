"""specs/gan.yaml: generator and discriminator in one graph. Parameters split by prefix into
the two networks (exact counts against torch.nn references with the same names); the one
concat-discriminate-split pass equals running the discriminator on fakes and reals
separately; the three backends agree on one build at two batch sizes."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lbdlc.lower import load, lower
from lbdlc.verify import compare, random_inputs

from conftest import SPECS
from small_zoo import build_perturbed, check_report, generated_module, load_reference, trainable_count
from test_parity import TOLERANCE


class Generator(nn.Module):
    def __init__(self, latent: int = 100):
        super().__init__()
        self.fc = nn.Linear(latent, 128 * 7 * 7)
        self.bn1 = nn.BatchNorm2d(128)
        self.up1 = nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.up2 = nn.ConvTranspose2d(64, 1, 4, stride=2, padding=1)

    def forward(self, z):
        x = F.relu(self.bn1(self.fc(z).reshape(-1, 128, 7, 7)))
        return torch.tanh(self.up2(F.relu(self.bn2(self.up1(x)))))


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 64, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(64, 128, 4, stride=2, padding=1)
        self.fc = nn.Linear(128 * 7 * 7, 1)

    def forward(self, x):
        x = F.leaky_relu(self.conv2(F.leaky_relu(self.conv1(x), 0.2)), 0.2)
        return self.fc(torch.flatten(x, 1))


class ReferenceGAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.generator, self.discriminator = Generator(), Discriminator()

    def forward(self, z, real):
        fake = self.generator(z)
        return fake, self.discriminator(fake), self.discriminator(real)  # two separate passes


def test_gan_parameters_split_by_prefix(cli):
    report = check_report(cli, "gan")
    g, d = trainable_count(Generator()), trainable_count(Discriminator())
    assert (g, d) == (766_017, 138_561)
    assert report["params"] == g + d == 904_578
    graph = lower(load(SPECS / "gan.yaml"))
    by_prefix = {"generator": 0, "discriminator": 0}
    for name, p in graph.params.items():
        prefix = name.split(".")[0]
        assert prefix in by_prefix, name  # every parameter belongs to one of the two networks
        by_prefix[prefix] += 0 if p.buffer else p.numel
    assert by_prefix == {"generator": g, "discriminator": d}
    assert [(o["name"], o["shape"]) for o in report["outputs"]] == [
        ("generator.fake", ["batch", 1, 28, 28]), ("d_logits.0", ["batch", 1]), ("d_logits.1", ["batch", 1])]
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers["discriminator.fc"]["output_shape"] == ["2*batch", 1]


@pytest.fixture(scope="module")
def gan_build(tmp_path_factory):
    return build_perturbed("gan", tmp_path_factory.mktemp("gan"))


@pytest.mark.parametrize("batch", [1, 3])
def test_gan_backends_agree(gan_build, batch):
    agreement = compare(gan_build, random_inputs(gan_build, {"batch": batch}, seed=batch))
    assert agreement.ok(TOLERANCE), agreement


def test_one_pass_equals_separate_discriminator_passes(gan_build):
    inputs = {k: torch.from_numpy(v) for k, v in random_inputs(gan_build, {"batch": 3}, seed=5).items()}
    reference = load_reference(ReferenceGAN(), gan_build)
    with torch.no_grad():
        got = generated_module(gan_build)(inputs["z"], inputs["real"])
        want = reference(inputs["z"], inputs["real"])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[1], got[2])  # the halves really are the fakes' and the reals' logits
