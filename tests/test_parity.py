"""Invariant 1: the generated module, ONNX Runtime and TVM compute the same function."""
import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file

from lbdlc.driver import BuildOptions, build
from lbdlc.lower import load, lower
from lbdlc.verify import compare, random_inputs

from conftest import ROOT, SPECS

TOLERANCE = 1e-4  # fp32, max abs diff (DESIGN.md invariant 1)


def random_weights(spec_path, seed: int = 1) -> dict[str, torch.Tensor]:
    """Weights far from the initializer defaults (BatchNorm statistics included), so that
    every parameter and buffer actually influences the comparison."""
    graph = lower(load(spec_path))
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in graph.params.items():
        if p.dtype == "int64":
            out[name] = torch.zeros(p.shape, dtype=torch.int64)
        elif name.endswith("running_var"):
            out[name] = torch.rand(p.shape, generator=gen) + 0.5
        else:
            out[name] = torch.randn(p.shape, generator=gen) * 0.5
    return out


@pytest.fixture(scope="module", params=["mlp", "lenet"])
def book_build(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "build"
    build(SPECS / f"{request.param}.yaml", out)
    return out


@pytest.mark.parametrize("batch", [1, 5])
def test_book_specs_agree(book_build, batch):
    agreement = compare(book_build, random_inputs(book_build, {"batch": batch}, seed=batch))
    assert agreement.ok(TOLERANCE), agreement


def test_onnx_passes_full_check(book_build):
    model = onnx.load(book_build / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 20
    # The batch dimension is symbolic, so one file serves every batch size.
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.fixture(scope="module")
def all_ops_build(tmp_path_factory):
    spec = ROOT / "tests" / "specs" / "all_ops.yaml"
    tmp = tmp_path_factory.mktemp("all_ops")
    save_file(random_weights(spec), str(tmp / "trained.safetensors"))
    build(spec, tmp / "build", BuildOptions(weights=tmp / "trained.safetensors"))
    return tmp / "build"


@pytest.mark.parametrize("batch", [1, 3])
def test_every_op_agrees_across_backends(all_ops_build, batch):
    agreement = compare(all_ops_build, random_inputs(all_ops_build, {"batch": batch}, seed=10 + batch))
    assert agreement.ok(TOLERANCE), agreement


def test_generated_module_matches_torch_functional(all_ops_build):
    """An oracle that is not ours: the start of all_ops written with torch.nn.functional."""
    from safetensors.torch import load_file

    from lbdlc.verify import run_pytorch

    w = load_file(str(all_ops_build / "weights.safetensors"))
    inputs = random_inputs(all_ops_build, {"batch": 2}, seed=3)
    image = torch.from_numpy(inputs["image"])
    x = torch.nn.functional.conv2d(image, w["conv.weight"], padding=1)
    x = torch.nn.functional.batch_norm(x, w["bn2d.running_mean"], w["bn2d.running_var"], w["bn2d.weight"], w["bn2d.bias"], eps=1e-3)
    act = torch.nn.functional.leaky_relu(x, 0.2)
    res = act + torch.nn.functional.conv2d(act, w["dw.weight"], w["dw.bias"], padding=1, groups=8)
    down = torch.nn.functional.conv2d(res, w["down.weight"], w["down.bias"], stride=2, padding=2, dilation=2)
    pooled = torch.nn.functional.avg_pool2d(torch.nn.functional.max_pool2d(res, 3, 1, 1), 3, 2, 1)
    expected_cat = torch.cat([pooled, down], dim=1).numpy()
    cat = run_pytorch(all_ops_build, inputs)[1]
    np.testing.assert_allclose(cat, expected_cat, atol=1e-5)


def test_weights_from_file_are_used(all_ops_build):
    from safetensors.torch import load_file

    spec = ROOT / "tests" / "specs" / "all_ops.yaml"
    written = load_file(str(all_ops_build / "weights.safetensors"))
    for name, tensor in random_weights(spec).items():
        assert torch.equal(written[name], tensor), name
