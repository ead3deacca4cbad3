"""specs/vae.yaml: the MNIST VAE against a torch.nn reference with the same parameter names
(exact count, shapes, outputs); the three backends agree on one build; the latent is the
mean at inference and a reparameterised sample in the generated module's training mode."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lbdlc.verify import RUNNERS, compare, random_inputs

from small_zoo import build_perturbed, check_report, generated_module, load_reference, trainable_count
from test_parity import TOLERANCE


class ReferenceVAE(nn.Module):
    """PyTorch's MNIST VAE example (784-400-20), returning logits instead of the sigmoid."""

    def __init__(self, hidden: int = 400, latent: int = 20):
        super().__init__()
        self.enc1 = nn.Linear(784, hidden)
        self.mu = nn.Linear(hidden, latent)
        self.logvar = nn.Linear(hidden, latent)
        self.dec1 = nn.Linear(latent, hidden)
        self.dec2 = nn.Linear(hidden, 784)

    def forward(self, image):
        h = F.relu(self.enc1(torch.flatten(image, 1)))
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if self.training else mu
        return self.dec2(F.relu(self.dec1(z))).reshape(-1, 1, 28, 28), mu, logvar


def test_vae_parameter_count_and_shapes(cli):
    report = check_report(cli, "vae")
    formula = (784 * 400 + 400) + 2 * (400 * 20 + 20) + (20 * 400 + 400) + (400 * 784 + 784)
    assert report["params"] == formula == trainable_count(ReferenceVAE()) == 652_824
    assert [(o["name"], o["shape"]) for o in report["outputs"]] == [
        ("recon_logits", ["batch", 1, 28, 28]), ("mu", ["batch", 20]), ("logvar", ["batch", 20])]
    small = check_report(cli, "vae", "latent=2")
    assert small["params"] == 652_824 - 18 * (2 * 401 + 400)  # two heads 400 -> 2 (401 each per unit), dec1 2 -> 400
    assert small["outputs"][1]["shape"] == ["batch", 2]


@pytest.fixture(scope="module")
def vae_build(tmp_path_factory):
    return build_perturbed("vae", tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def image(vae_build):
    return random_inputs(vae_build, {"batch": 3}, seed=4)


def test_vae_backends_agree(vae_build, image):
    agreement = compare(vae_build, image)
    assert agreement.ok(TOLERANCE), agreement


@pytest.mark.parametrize("backend", ["onnx", "tvm"])
def test_inference_artifacts_decode_the_mean(vae_build, image, backend):
    reference = load_reference(ReferenceVAE(), vae_build)
    with torch.no_grad():
        want = reference(torch.from_numpy(image["image"]))
    got = RUNNERS[backend](vae_build, image)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(g), w, atol=1e-5, rtol=1e-5)


def test_training_mode_samples_the_latent(vae_build, image):
    """model.train(): z = mu + exp(logvar/2)·eps, eps drawn from torch's generator, exactly as
    the reference draws it; the reconstruction then differs from the eval-mode one."""
    model, reference = generated_module(vae_build), load_reference(ReferenceVAE(), vae_build)
    x = torch.from_numpy(image["image"])
    with torch.no_grad():
        mean_recon = model(x)[0]
        model.train(), reference.train()
        torch.manual_seed(11)
        got = model(x)
        torch.manual_seed(11)
        want = reference(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert (got[0] - mean_recon).abs().max() > 1e-3
