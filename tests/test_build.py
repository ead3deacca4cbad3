"""`lbdlc build`: artifacts, manifest, weights in and out, reproducibility, atomic output."""
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lbdlc.verify import compare, random_inputs

from conftest import SPECS


@pytest.fixture(scope="module")
def lenet_build(tmp_path_factory):
    from typer.testing import CliRunner

    from lbdlc.cli import app

    out = tmp_path_factory.mktemp("lenet") / "out"
    result = CliRunner().invoke(app, ["build", str(SPECS / "lenet.yaml"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_artifacts_and_manifest(lenet_build):
    files = sorted(p.name for p in lenet_build.iterdir())
    assert files == ["manifest.json", "model.onnx", "model.py", "model.tvm.so", "train.py", "weights.safetensors"]  # train.py: lenet.yaml has `train:`
    manifest = json.loads((lenet_build / "manifest.json").read_text())
    spec_text = (SPECS / "lenet.yaml").read_bytes()
    assert manifest["spec"]["sha256"] == hashlib.sha256(spec_text).hexdigest()
    assert manifest["resolved_spec"]["layers"][0] == {
        "op": "conv2d", "name": "conv1", "out_channels": 6, "kernel_size": 5,
        "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "bias": True,
    }
    for tool in ("lbdlc", "torch", "onnx", "onnxruntime", "tvm"):
        assert manifest["versions"][tool], tool
    for name, info in manifest["artifacts"].items():
        data = (lenet_build / name).read_bytes()
        assert info == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert manifest["model"]["params"] == 34_622


def test_generated_module_is_standalone_and_loads_the_weights(lenet_build):
    source = (lenet_build / "model.py").read_text()
    assert "lbdlc" not in "".join(line for line in source.splitlines() if line.startswith(("import", "from")))
    namespace: dict = {}
    exec(compile(source, "model.py", "exec"), namespace)
    model = namespace["Model"]()  # builds with no arguments
    weights = load_file(str(lenet_build / "weights.safetensors"))
    model.load_state_dict(weights)  # strict: names and shapes equal the IR's
    assert set(model.state_dict()) == set(weights)


def test_trained_weights_round_trip(lenet_build, tmp_path):
    """Weights saved from the generated module (as train.py will) load into `build --weights`."""
    namespace: dict = {}
    exec((lenet_build / "model.py").read_text(), namespace)
    model = namespace["Model"]()
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a small step, as training would take
    save_file(model.state_dict(), str(tmp_path / "trained.safetensors"))
    from typer.testing import CliRunner

    from lbdlc.cli import app

    out = tmp_path / "rebuilt"
    result = CliRunner().invoke(app, ["build", str(SPECS / "lenet.yaml"), "-o", str(out), "--weights", str(tmp_path / "trained.safetensors"), "-b", "pytorch", "-b", "onnx"])
    assert result.exit_code == 0, result.output
    inputs = random_inputs(out, {"batch": 4})
    model.eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(inputs["image"])).numpy()
    from lbdlc.verify import run_onnx

    assert abs(run_onnx(out, inputs)[0] - expected).max() <= 1e-4
    assert compare(out, inputs, backends=("pytorch", "onnx")).ok(1e-4)


def test_builds_are_reproducible(tmp_path):
    from lbdlc.driver import build

    a = build(SPECS / "lenet.yaml", tmp_path / "a").manifest["artifacts"]
    b = build(SPECS / "lenet.yaml", tmp_path / "b").manifest["artifacts"]
    assert a == b  # byte-identical artifacts, TVM library included
    c = build(SPECS / "lenet.yaml", tmp_path / "c", __import__("lbdlc.driver").driver.BuildOptions(seed=1)).manifest["artifacts"]
    assert c["weights.safetensors"] != a["weights.safetensors"]
    assert c["model.py"] == a["model.py"]


def test_mismatched_weights_are_refused(cli, tmp_path):
    save_file({"fc1.weight": torch.zeros(25, 49), "extra": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    code, _, err = cli("build", SPECS / "mlp.yaml", "-o", tmp_path / "out", "--weights", tmp_path / "bad.safetensors")
    assert code == 2
    assert "missing: fc1.bias, fc2.bias" in err and "unexpected: extra" in err
    assert "fc1.weight: file has [25, 49] float32, spec needs [25, 50] float32" in err
    assert not (tmp_path / "out").exists()


def test_failed_build_leaves_previous_output(cli, tmp_path, write_spec):
    out = tmp_path / "out"
    code, _, err = cli("build", SPECS / "mlp.yaml", "-o", out, "-b", "pytorch")
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # A spec whose last layer only the ONNX backend refuses (opset out of range).
    code, _, err = cli("build", SPECS / "mlp.yaml", "-o", out, "--opset", "12")
    assert code == 2 and "opset 12 is not supported" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directories left behind


def test_unknown_backend(cli, tmp_path):
    code, _, err = cli("build", SPECS / "mlp.yaml", "-o", tmp_path / "o", "-b", "tensorflow")
    assert code == 2 and "unknown backend 'tensorflow'" in err


def test_build_verify_reports_agreement_and_exits_1_on_difference(cli, tmp_path, monkeypatch):
    code, out, err = cli("build", SPECS / "mlp.yaml", "-o", tmp_path / "a", "-b", "pytorch", "-b", "onnx", "--verify")
    assert code == 0, err
    assert "verify onnx" in out and "verify: agree" in out
    import lbdlc.verify

    honest = lbdlc.verify.RUNNERS["onnx"]
    monkeypatch.setitem(lbdlc.verify.RUNNERS, "onnx", lambda d, x: [r + 1e-2 for r in honest(d, x)])
    code, out, _ = cli("build", SPECS / "mlp.yaml", "-o", tmp_path / "b", "-b", "pytorch", "-b", "onnx", "--verify")
    assert code == 1 and "verify: DIFFER" in out
