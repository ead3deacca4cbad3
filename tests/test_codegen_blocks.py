"""The generated model.py mirrors the spec's structure: one class per block structure, loops
over chained repetitions, constructor arguments for what differs between instances, and it
still computes what the IR says (state_dict names, outputs equal to ONNX Runtime's)."""
import re

import pytest
import torch

from backends.pytorch import generate
from lbdlc.driver import BuildOptions, build
from lbdlc.lower import load, lower
from lbdlc.verify import compare, random_inputs
from test_parity import TOLERANCE

from conftest import SPECS


def model_source(path, overrides=()) -> tuple[str, object]:
    graph = lower(load(path, overrides))
    return generate(graph, str(path), None, "test"), graph


def instantiate(source: str):
    namespace: dict = {}
    exec(compile(source, "model.py", "exec"), namespace)
    with torch.device("meta"):
        return namespace["Model"]()


def test_gpt2_is_one_block_class_and_a_loop():
    source, graph = model_source(SPECS / "gpt2.yaml")
    assert re.findall(r"^class (\w+)\(nn.Module\)", source, re.M) == ["MultiHeadAttention", "PositionEmbedding", "Block", "Gpt2"]
    assert "        for block in self.h:\n            x = block(x)\n" in source
    assert source.count("Block()") == 12
    assert len(source.splitlines()) < 150
    model = instantiate(source)
    assert set(model.state_dict()) == set(graph.inference_params())


def test_resnet50_bottlenecks_take_their_widths():
    source, graph = model_source(SPECS / "resnet50.yaml")
    classes = re.findall(r"^class (\w+)\(nn.Module\):\n.*\n\n    def __init__\(self(.*)\) -> None:", source, re.M)
    assert classes == [("BottleneckWithDownsample", ", width: int, stride: int, in_channels: int"),
                       ("Bottleneck", ", width: int")]
    assert "BottleneckWithDownsample(width=128, stride=2, in_channels=256)" in source
    assert "self.conv3 = nn.Conv2d(width, 4 * width, kernel_size=1, bias=False)" in source
    for stage in range(1, 5):
        assert f"for block in self.layer{stage}:" in source
    assert len(source.splitlines()) < 200
    model = instantiate(source)
    assert set(model.state_dict()) == set(graph.params)  # torchvision's names, BN counters included
    assert sum(p.numel() for p in model.parameters()) == 25_557_032


SPLIT = """
lbdlc: 1
inputs:
  x: {shape: [batch, 6]}
blocks:
  unit:
    params: {slope: float}
    layers:
      - {name: fc, op: linear, out_features: 6}
      - {op: leaky_relu, negative_slope: "${slope}"}
layers:
  # the slope becomes an argument kept for forward, except where the flat code would differ
  # (PyTorch's default 0.01 is left out there): that instance gets a class of its own
  - {name: stack, op: unit, repeat: 3, slope: "${0.01 if i == 0 else 0.2}"}
  # an intermediate output read outside the repetition: calls, not a loop
  - {name: side, op: unit, repeat: 2, slope: 0.3}
  - {name: out, op: add, in: [side.0, side]}
"""


def test_what_cannot_be_an_argument_splits_the_class_and_unchained_repeats_are_calls(tmp_path, write_spec):
    path = write_spec(SPLIT)
    source, graph = model_source(path)
    assert re.findall(r"^class (\w+)\(nn.Module\)", source, re.M) == ["Unit2", "Unit", "Spec"]
    assert "x = F.leaky_relu(x)\n" in source and "x = F.leaky_relu(x, negative_slope=self.slope)\n" in source
    assert "Unit2(),\n            Unit(0.2),\n            Unit(0.2)," in source and "Unit(0.3)" in source
    assert "for block in self.stack:" in source
    assert "for block in self.side" not in source
    assert "self.side[0](" in source and "self.side[1](" in source
    out = build(path, tmp_path / "out", BuildOptions(backends=("pytorch", "onnx")))
    agreement = compare(out.out_dir, random_inputs(out.out_dir, {"batch": 3}, seed=3), backends=("pytorch", "onnx"))
    assert agreement.ok(TOLERANCE), agreement


TIED = """
lbdlc: 1
inputs:
  x: {shape: [batch, 4]}
blocks:
  pair:
    layers:
      - {name: a, op: linear, out_features: 4, bias: false}
      - {name: b, op: linear, out_features: 4, bias: false, tie: {weight: first.a.weight}}
layers:
  - {name: first, op: pair}
  - {name: second, op: pair}
"""


def test_a_tie_across_blocks_keeps_that_block_flat(tmp_path, write_spec):
    path = write_spec(TIED)
    source, graph = model_source(path)
    # every `b` reads `first.a.weight`: both blocks share a parameter across their border,
    # so both stay flat code
    assert "class Pair" not in source
    assert "self.first = nn.ModuleDict(" in source and "self.second = nn.ModuleDict(" in source
    model = instantiate(source)
    assert set(model.state_dict()) == set(graph.params)
    out = build(path, tmp_path / "out", BuildOptions(backends=("pytorch", "onnx")))
    agreement = compare(out.out_dir, random_inputs(out.out_dir, {"batch": 2}, seed=1), backends=("pytorch", "onnx"))
    assert agreement.ok(TOLERANCE), agreement
