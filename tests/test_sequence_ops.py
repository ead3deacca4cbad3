"""transpose, select, cls_token: parity with random weights, torch oracle, errors."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lbdlc.driver import BuildOptions, build
from lbdlc.verify import compare, random_inputs, run_pytorch

from conftest import ROOT, located

SPEC = ROOT / "tests" / "specs" / "sequence_ops.yaml"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seq")
    gen = torch.Generator().manual_seed(0)
    weights = {"cls.token": torch.randn(1, 1, 6, generator=gen), "proj.weight": torch.randn(4, 6, generator=gen),
               "proj.bias": torch.randn(4, generator=gen)}
    save_file(weights, str(tmp / "w.safetensors"))
    return build(SPEC, tmp / "out", BuildOptions(weights=tmp / "w.safetensors")).out_dir, weights


@pytest.mark.parametrize("batch,seq", [(1, 1), (3, 5)])
def test_backends_agree(built, batch, seq):
    out, _ = built
    assert compare(out, random_inputs(out, {"batch": batch, "seq": seq})).ok(1e-5)


def test_matches_torch(built):
    out, w = built
    inputs = random_inputs(out, {"batch": 2, "seq": 4})
    x = torch.from_numpy(inputs["x"]).transpose(1, 2)
    x = torch.cat([w["cls.token"].expand(2, 1, 6), x], dim=1)
    proj = torch.nn.functional.linear(x, w["proj.weight"], w["proj.bias"])
    first, last, got = run_pytorch(out, inputs)
    np.testing.assert_allclose(got, proj.numpy(), atol=1e-6)
    np.testing.assert_allclose(first, proj[:, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(last, proj[:, :, 3].numpy(), atol=1e-6)


def test_select_out_of_range(cli, write_spec):
    path = write_spec(SPEC.read_text().replace("index: 3", "index: 4"))
    code, _, err = cli("check", path)
    assert code == 2
    assert "index 4 is out of range for dim -1 of [batch, seq + 1, 4] (size 4)" in located(err, path, 11, "4, in")
