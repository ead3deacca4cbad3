"""specs/gcn.yaml: a two-layer GCN with Cora's sizes against a dense torch reference with
the same parameter names (exact count, shapes, outputs); the three backends agree on one
build for graphs of different sizes (`nodes` is symbolic)."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lbdlc.verify import compare

from small_zoo import build_perturbed, check_report, generated_module, load_reference, trainable_count
from test_parity import TOLERANCE


class DenseGraphConv(nn.Module):
    """Kipf & Welling's layer written directly: D^-1/2 (A + I) D^-1/2 H W^T + b."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.randn(out_features))

    def forward(self, h, adjacency):
        a = adjacency + torch.eye(adjacency.shape[-1])
        d = torch.diag(a.sum(-1) ** -0.5)
        return d @ a @ d @ h @ self.weight.T + self.bias


class ReferenceGCN(nn.Module):
    def __init__(self, features=1433, hidden=16, classes=7):
        super().__init__()
        self.conv1 = DenseGraphConv(features, hidden)
        self.conv2 = DenseGraphConv(hidden, classes)

    def forward(self, x, adjacency):  # eval mode: dropout is the identity
        return self.conv2(F.relu(self.conv1(x, adjacency)), adjacency)


def graph(nodes: int, seed: int) -> np.ndarray:
    """A random undirected graph without self-loops, as a 0/1 adjacency matrix."""
    rng = np.random.default_rng(seed)
    a = np.triu((rng.random((nodes, nodes)) < 0.3).astype(np.float32), 1)
    return a + a.T


def inputs(nodes: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.random((nodes, 1433)) < 0.05).astype(np.float32)  # sparse bag-of-words features
    return {"x": x, "adjacency": graph(nodes, seed)}


def test_gcn_parameter_count_and_shapes(cli):
    report = check_report(cli, "gcn")
    assert report["params"] == (1433 * 16 + 16) + (16 * 7 + 7) == trainable_count(ReferenceGCN()) == 23_063
    assert report["inputs"] == [{"name": "x", "shape": ["nodes", 1433], "dtype": "float32"},
                                {"name": "adjacency", "shape": ["nodes", "nodes"], "dtype": "float32"}]
    assert report["outputs"] == [{"name": "conv2", "shape": ["nodes", 7], "dtype": "float32"}]


@pytest.fixture(scope="module")
def gcn_build(tmp_path_factory):
    return build_perturbed("gcn", tmp_path_factory.mktemp("gcn"))


@pytest.mark.parametrize("nodes", [1, 9, 30])
def test_gcn_backends_agree(gcn_build, nodes):
    agreement = compare(gcn_build, inputs(nodes, seed=nodes))
    assert agreement.ok(TOLERANCE), agreement


def test_gcn_matches_the_dense_reference(gcn_build):
    feed = {k: torch.from_numpy(v) for k, v in inputs(12, seed=2).items()}
    reference = load_reference(ReferenceGCN(), gcn_build)
    with torch.no_grad():
        torch.testing.assert_close(generated_module(gcn_build)(feed["x"], feed["adjacency"]),
                                   reference(feed["x"], feed["adjacency"]), atol=1e-5, rtol=1e-5)
