"""specs/dqn.yaml: the book's DQN (2 conv + 1 hidden FC + one value per action) against a
torch.nn reference with the same parameter names: exact count, shapes, outputs, and the
three backends agreeing on one build."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lbdlc.verify import compare, random_inputs

from small_zoo import build_perturbed, check_report, generated_module, load_reference, trainable_count
from test_parity import TOLERANCE


class ReferenceDQN(nn.Module):
    def __init__(self, n_actions: int = 18, hidden: int = 512):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 32, 8, stride=4)
        self.conv2 = nn.Conv2d(32, 64, 4, stride=2)
        self.fc = nn.Linear(64 * 9 * 9, hidden)
        self.q = nn.Linear(hidden, n_actions)

    def forward(self, frames):
        x = F.relu(self.conv2(F.relu(self.conv1(frames))))
        return self.q(F.relu(self.fc(torch.flatten(x, 1))))


def conv(k, cin, cout):
    return k * k * cin * cout + cout


def test_dqn_parameter_count_and_shapes(cli):
    report = check_report(cli, "dqn")
    formula = conv(8, 4, 32) + conv(4, 32, 64) + (5184 * 512 + 512) + (512 * 18 + 18)
    assert report["params"] == formula == trainable_count(ReferenceDQN()) == 2_705_010
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers["conv1"]["output_shape"] == ["batch", 32, 20, 20]
    assert layers["conv2"]["output_shape"] == ["batch", 64, 9, 9]
    assert report["outputs"] == [{"name": "q", "shape": ["batch", 18], "dtype": "float32"}]


def test_n_actions_is_a_variable(cli):
    report = check_report(cli, "dqn", "n_actions=6")
    assert report["outputs"][0]["shape"] == ["batch", 6]
    assert report["params"] == 2_705_010 - 12 * 513


@pytest.fixture(scope="module")
def dqn_build(tmp_path_factory):
    return build_perturbed("dqn", tmp_path_factory.mktemp("dqn"), ("n_actions=6",))


def test_dqn_backends_agree_and_match_the_reference(dqn_build):
    inputs = random_inputs(dqn_build, {"batch": 2})
    agreement = compare(dqn_build, inputs)
    assert agreement.ok(TOLERANCE), agreement
    reference = load_reference(ReferenceDQN(n_actions=6), dqn_build)
    frames = torch.from_numpy(inputs["frames"])
    with torch.no_grad():
        torch.testing.assert_close(generated_module(dqn_build)(frames), reference(frames), atol=1e-5, rtol=1e-5)
