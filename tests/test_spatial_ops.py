"""Spatial ops (conv1d, conv_transpose1d/2d, upsample, max/avg_pool1d, group_norm,
instance_norm, rms_norm): the three backends agree on tests/specs/spatial_ops.yaml, every
output matches a reference written with torch.nn modules and torch.nn.functional, parameter
shapes, counts and initializers are PyTorch's, ONNX files pass the checker at every opset
profile, and mistakes are reported at their YAML line."""
import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lbdlc.analysis import summarize
from lbdlc.driver import BuildOptions, build
from lbdlc.ir import symbol
from lbdlc.lower import load, lower
from lbdlc.verify import compare, random_inputs, run_onnx, run_pytorch, run_tvm

from conftest import ROOT, located
from test_parity import TOLERANCE, random_weights

SPEC = ROOT / "tests" / "specs" / "spatial_ops.yaml"


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("spatial_weights") / "trained.safetensors"
    save_file(random_weights(SPEC), str(path))
    return path


@pytest.fixture(scope="module")
def spatial_build(weights_file):
    """The file's only TVM build; every batch size runs on it."""
    out = weights_file.parent / "build"
    build(SPEC, out, BuildOptions(weights=weights_file))
    return out


@pytest.mark.parametrize("batch", [1, 3])
def test_backends_agree(spatial_build, batch):
    agreement = compare(spatial_build, random_inputs(spatial_build, {"batch": batch}, seed=20 + batch))
    assert agreement.ok(TOLERANCE), agreement


def reference(w: dict, signal: torch.Tensor, image: torch.Tensor) -> list[torch.Tensor]:
    """spatial_ops.yaml written by hand with torch.nn modules and torch.nn.functional."""

    def loaded(module, prefix):
        module.load_state_dict({k[len(prefix) + 1:]: v for k, v in w.items() if k.startswith(prefix + ".")})
        return module.eval()

    with torch.no_grad():
        x = F.conv1d(signal, w["c1.weight"], w["c1.bias"], stride=2, padding=2, dilation=2, groups=2)
        x = loaded(nn.ConvTranspose1d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2), "ct1")(x)
        x = loaded(nn.GroupNorm(3, 6, eps=1e-3), "gn1")(x)
        x = F.instance_norm(x, weight=w["in1.weight"], bias=w["in1.bias"])
        x = F.avg_pool1d(F.max_pool1d(x, 3, 1, 1), 4, 2, 2)  # count_include_pad=True
        x = F.conv_transpose1d(x, w["ct1d.weight"], dilation=3)
        rms1 = loaded(nn.RMSNorm(12, eps=1e-5), "rms1")(x)

        x = F.interpolate(image, scale_factor=2, mode="nearest")
        ct2 = loaded(nn.ConvTranspose2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), output_padding=(1, 0),
                                        groups=2, bias=False, dilation=(1, 2)), "ct2")
        x = ct2(x)
        assert x.shape[1:] == (6, 24, 14)  # output_padding adds a row
        x = nn.GroupNorm(2, 6, affine=False)(x)
        x = F.interpolate(x, size=(10, 9), mode="bilinear", align_corners=False)
        x = nn.InstanceNorm2d(6, eps=1e-3)(x)
        ct2s = F.conv_transpose2d(x, w["ct2s.weight"], w["ct2s.bias"], stride=2, padding=1)

        up3 = F.interpolate(image, scale_factor=(2, 3), mode="bilinear", align_corners=True)
        x = F.interpolate(image, size=(9, 8), mode="nearest")
        x = F.group_norm(x, 4, w["gn4.weight"], w["gn4.bias"])
        rms4 = F.rms_norm(x, (8,), eps=1e-4)
    return [rms1, ct2s, up3, rms4]


@pytest.mark.parametrize("runner", [run_pytorch, run_onnx, run_tvm], ids=["pytorch", "onnx", "tvm"])
def test_every_backend_matches_torch_reference(spatial_build, runner):
    """An oracle that is not ours, applied to each backend separately."""
    inputs = random_inputs(spatial_build, {"batch": 2}, seed=7)
    want = reference(load_file(str(spatial_build / "weights.safetensors")), *(torch.from_numpy(v) for v in inputs.values()))
    got = runner(spatial_build, inputs)
    assert len(got) == len(want)
    for g, r in zip(got, want):
        assert g.shape == tuple(r.shape)
        np.testing.assert_allclose(g, r.numpy(), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize(
    "mode, kwargs",
    [("nearest", {"scale_factor": 3}), ("nearest", {"size": (7, 10)}), ("bilinear", {"scale_factor": 2}),
     ("bilinear", {"size": (5, 11)}), ("bilinear", {"scale_factor": (3, 2), "align_corners": True})],
)
def test_upsample_matches_interpolate_in_onnx(tmp_path, mode, kwargs):
    """ONNX Resize with our coordinate modes against F.interpolate, on odd sizes (no TVM build here)."""
    scale = kwargs.get("scale_factor")
    attrs = {"mode": mode, **({"size": list(kwargs["size"])} if "size" in kwargs else {}),
             **({"scale_factor": list(scale) if isinstance(scale, tuple) else scale} if scale else {}),
             **({"align_corners": True} if kwargs.get("align_corners") else {})}
    flow = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in attrs.items())
    spec = tmp_path / "up.yaml"
    spec.write_text(f"lbdlc: 1\ninputs:\n  x: {{shape: [batch, 2, 5, 7]}}\nlayers:\n  - {{op: upsample, {flow}}}\n")
    build(spec, tmp_path / "out", BuildOptions(backends=("pytorch", "onnx")))
    x = np.random.default_rng(0).standard_normal((2, 2, 5, 7)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x), mode=mode, **kwargs).numpy()
    for runner in (run_pytorch, run_onnx):
        (got,) = runner(tmp_path / "out", {"x": x})
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_parameter_shapes_counts_and_initializers_are_pytorchs():
    graph = lower(load(SPEC))
    modules = {
        "c1": nn.Conv1d(4, 8, 3, groups=2),
        "ct1": nn.ConvTranspose1d(8, 6, 3, groups=2),
        "ct1d": nn.ConvTranspose1d(6, 4, 2, bias=False),
        "ct2": nn.ConvTranspose2d(4, 6, (3, 2), groups=2, bias=False),
        "ct2s": nn.ConvTranspose2d(6, 3, 3),
        "gn1": nn.GroupNorm(3, 6),
        "gn2": nn.GroupNorm(2, 6, affine=False),
        "in1": nn.InstanceNorm1d(6, affine=True),
        "in2": nn.InstanceNorm2d(6),
        "rms1": nn.RMSNorm(12),
        "rms4": nn.RMSNorm(8, elementwise_affine=False),
    }
    layers = {layer.name: layer.params for layer in summarize(graph).layers}
    for name, module in modules.items():
        assert layers[name] == sum(p.numel() for p in module.parameters()), name
        for local, tensor in module.state_dict().items():
            assert graph.params[f"{name}.{local}"].shape == tuple(tensor.shape), f"{name}.{local}"
    for name in ("up1", "mp1", "ap1"):
        assert layers[name] == 0
    # nn.ConvTranspose*'s kaiming_uniform(a=sqrt(5)) takes its fan-in from weight dim 1: out/groups · k.
    assert graph.params["ct1.weight"].init.arg("bound") == pytest.approx(1 / math.sqrt(3 * 3))
    assert graph.params["ct2s.bias"].init.arg("bound") == pytest.approx(1 / math.sqrt(3 * 9))
    assert graph.params["c1.weight"].init.arg("bound") == pytest.approx(1 / math.sqrt(2 * 3))
    assert modules["ct1"].weight.abs().max() <= 1 / 3
    assert graph.params["gn1.weight"].init.kind == "ones" and graph.params["gn1.bias"].init.kind == "zeros"
    assert graph.params["rms1.weight"].init.kind == "ones"


def test_symbolic_lengths(write_spec):
    path = write_spec(
        "lbdlc: 1\ninputs:\n  s: {shape: [batch, 4, len]}\nlayers:\n"
        "  - {name: up, op: conv_transpose1d, out_channels: 4, kernel_size: 4, stride: 2, padding: 1}\n"
        "  - {name: down, op: conv1d, out_channels: 4, kernel_size: 3, stride: 2, padding: 1}\n"
        "  - {name: pool, op: avg_pool1d, kernel_size: 2}\n"
    )
    graph = lower(load(path))
    length = symbol("len")
    shapes = {n.name: n.outputs[0].type.shape for n in graph.nodes}
    assert shapes["up"][2] == 2 * length  # (L-1)·2 - 2 + 3 + 1
    assert shapes["down"][2] == length  # floor((2L - 1) / 2) + 1
    assert shapes["pool"][2] == length // 2 or str(shapes["pool"][2]) == "floor(len/2)"


@pytest.mark.parametrize("opset", [18, 20, 21, 23])
def test_onnx_opsets_pass_full_check_and_agree(weights_file, opset):
    """GroupNormalization is native from opset 21 (per-channel scale), RMSNormalization from 23;
    below that they are decomposed."""
    out = weights_file.parent / f"opset{opset}"
    build(SPEC, out, BuildOptions(weights=weights_file, opset=opset, backends=("pytorch", "onnx")))
    model = onnx.load(out / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == opset
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    op_types = {n.op_type for n in model.graph.node}
    assert ("GroupNormalization" in op_types) == (opset >= 21)
    assert ("RMSNormalization" in op_types) == (opset >= 23)
    assert {"ConvTranspose", "Resize", "InstanceNormalization"} <= op_types
    agreement = compare(out, random_inputs(out, {"batch": 2}, seed=opset), backends=("pytorch", "onnx"))
    assert agreement.ok(TOLERANCE), agreement


# -- mistakes, reported at their YAML line --------------------------------------------------


def check_fails(cli, path):
    code, out, err = cli("check", path)
    assert code == 2, (out, err)
    return err


IMAGE = """\
lbdlc: 1
inputs:
  image: {shape: [batch, 6, 8, 8]}
layers:
"""


def test_group_norm_groups_must_divide_channels(cli, write_spec):
    path = write_spec(IMAGE + "  - {name: gn, op: group_norm, num_groups: 4}\n")
    err = check_fails(cli, path)
    assert "num_groups=4 does not divide the 6 channels" in located(err, path, 5, "4}")
    assert "hint: choose num_groups from 1, 2, 3, 6" in err


def test_upsample_with_both_scale_factor_and_size(cli, write_spec):
    path = write_spec(IMAGE + "  - {name: up, op: upsample, scale_factor: 2, size: [16, 16]}\n")
    err = check_fails(cli, path)
    assert "give either scale_factor or size, not both" in located(err, path, 5, "[16, 16]")


def test_upsample_with_neither_scale_factor_nor_size(cli, write_spec):
    path = write_spec(IMAGE + "  - {name: up, op: upsample, mode: bilinear}\n")
    err = check_fails(cli, path)
    assert "upsample needs scale_factor or size" in located(err, path, 5, "upsample")


def test_align_corners_needs_bilinear(cli, write_spec):
    path = write_spec(IMAGE + "  - {name: up, op: upsample, scale_factor: 2, align_corners: true}\n")
    err = check_fails(cli, path)
    assert "align_corners applies to mode: bilinear only" in located(err, path, 5, "true")


def test_upsample_mode_is_checked(cli, write_spec):
    path = write_spec(IMAGE + "  - {name: up, op: upsample, scale_factor: 2, mode: bicubic}\n")
    err = check_fails(cli, path)
    assert "bicubic" in located(err, path, 5, "bicubic")


def test_output_padding_must_be_below_stride(cli, write_spec):
    path = write_spec(IMAGE + "  - {name: up, op: conv_transpose2d, out_channels: 3, kernel_size: 3, stride: 2, output_padding: 2}\n")
    err = check_fails(cli, path)
    assert "output_padding (2) must be smaller than the stride (2)" in located(err, path, 5, "2}")


def test_conv1d_needs_a_sequence(cli, write_spec):
    path = write_spec(IMAGE + "  - {name: c, op: conv1d, out_channels: 3, kernel_size: 3}\n")
    err = check_fails(cli, path)
    assert "conv1d expects a rank-3 input, got [batch, 6, 8, 8]" in located(err, path, 5, "conv1d")
