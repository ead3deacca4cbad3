"""`lbdlc check`: parameter counts, FLOPs and shapes from the IR alone."""
import json

import pytest
import torch

from conftest import SPECS


def check_json(cli, spec):
    code, out, err = cli("check", spec, "--json")
    assert code == 0, err
    return json.loads(out)


def test_mlp_is_the_books_figure(cli):
    report = check_json(cli, SPECS / "mlp.yaml")
    assert report["params"] == 1_557  # BOOK.md: 50 -> 25 -> 10 -> 2
    assert report["inputs"] == [{"name": "x", "shape": ["batch", 50], "dtype": "float32"}]
    assert report["outputs"] == [{"name": "fc3", "shape": ["batch", 2], "dtype": "float32"}]
    assert [layer["op"] for layer in report["layers"]] == ["linear", "relu", "linear", "relu", "linear"]
    assert [layer["line"] for layer in report["layers"]] == [9, 10, 11, 12, 13]
    # 2 FLOPs per multiply-add plus one per bias, plus one per ReLU element.
    assert report["flops"] == (2 * 50 + 1) * 25 + 25 + (2 * 25 + 1) * 10 + 10 + (2 * 10 + 1) * 2


def reference_lenet() -> torch.nn.Module:
    """The same architecture written by hand in PyTorch: the oracle for counts and shapes."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 10),
    )


def test_lenet_matches_a_hand_written_pytorch_model(cli):
    report = check_json(cli, SPECS / "lenet.yaml")
    ref = reference_lenet()
    assert report["params"] == sum(p.numel() for p in ref.parameters()) == 34_622
    x = torch.zeros(1, 1, 28, 28)
    shapes = []
    for layer in ref:
        x = layer(x)
        shapes.append(["batch", *x.shape[1:]])
    assert [layer["output_shape"] for layer in report["layers"]] == shapes
    flatten = next(layer for layer in report["layers"] if layer["op"] == "flatten")
    assert flatten["output_shape"] == ["batch", 256]  # the book's 256-d vector


def test_table_output(cli):
    code, out, _ = cli("check", SPECS / "lenet.yaml")
    assert code == 0
    assert "[batch, 16, 4, 4]" in out and "34,622 parameters" in out


@pytest.mark.parametrize("command", ["check", "build", "ops", "version"])
def test_every_command_explains_itself(cli, command):
    code, out, _ = cli(command, "--help")
    assert code == 0 and "Usage" in out and len(out.splitlines()) > 4


def test_top_level_help(cli):
    code, out, _ = cli("--help")
    assert code == 0 and "check" in out and "build" in out
