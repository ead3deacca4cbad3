"""Self-contained bundles (lbdlc/bundle.py): files and manifest, run.py in a fresh interpreter
that cannot import lbdlc (nor torch, nor safetensors), `lbdlc run` and `lbdlc bench`."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import SPECS

from lbdlc.verify import run_pytorch

TOLERANCE = 1e-4
# Runs a script with lbdlc, torch and safetensors unimportable: what a board with only numpy
# and one runtime has. `python -I` also keeps the caller's cwd and environment out of sys.path.
BLOCKER = textwrap.dedent("""
    import runpy, sys
    BLOCKED = {"lbdlc", "torch", "safetensors"}
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: a board has no {name})")
            return None
    sys.meta_path.insert(0, Block())
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
""")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from typer.testing import CliRunner

    from lbdlc.cli import app

    out = tmp_path_factory.mktemp("bundle") / "lenet"
    result = CliRunner().invoke(app, ["build", str(SPECS / "lenet.yaml"), "-o", str(out), "--target", "cpu"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def x(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "x.npy"
    np.save(path, np.random.default_rng(1).standard_normal((3, 1, 28, 28)).astype(np.float32))
    return path


def fresh_python(args, cwd):
    """Run `python -I` with the import blocker from `cwd`; no PYTHONPATH or lbdlc on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    blocker = cwd / "_blocker.py"
    blocker.write_text(BLOCKER)
    return subprocess.run([sys.executable, "-I", str(blocker), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_bundle_files_and_manifest(built):
    bundle = built / "deploy" / "cpu"
    names = sorted(p.name for p in bundle.iterdir())
    assert names == ["README.md", "manifest.json", "model.onnx", "model.tvm.so", "run.py", "weights.safetensors"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format"] == "lbdlc-bundle/1"
    assert manifest["model"]["inputs"] == [{"name": "image", "shape": ["batch", 1, 28, 28], "dtype": "float32"}]
    assert manifest["model"]["outputs"] == [{"name": "fc2", "shape": ["batch", 10], "dtype": "float32"}]
    assert manifest["target"]["name"] == "cpu" and manifest["target"]["tvm"]["mcpu"]
    assert manifest["runtimes"]["tvm"]["library"] == "model.tvm.so"
    for name, info in manifest["files"].items():
        data = (bundle / name).read_bytes()
        assert (info["sha256"], info["bytes"]) == (hashlib.sha256(data).hexdigest(), len(data)), name
    # the build's manifest lists the bundle; the ONNX model is the build's own
    top = json.loads((built / "manifest.json").read_text())
    assert top["deploy"]["cpu"]["dir"] == "deploy/cpu"
    assert top["deploy"]["cpu"]["files"]["model.onnx"]["sha256"] == top["artifacts"]["model.onnx"]["sha256"]
    readme = (bundle / "README.md").read_text()
    assert "| `image` | [batch, 1, 28, 28] | float32 |" in readme and "| `fc2` | [batch, 10] | float32 |" in readme
    assert "python run.py --input x.npy" in readme
    run_py = (bundle / "run.py").read_text()
    imports = [line for line in run_py.splitlines() if line.startswith(("import ", "from "))]
    assert not any("lbdlc" in line or "torch" in line or "safetensors" in line for line in imports), imports


@pytest.mark.parametrize("runtime", ["tvm", "onnx"])
def test_run_py_in_a_fresh_interpreter_matches_lbdlc_run_and_pytorch(built, x, tmp_path, cli, runtime):
    board = tmp_path / "board"
    shutil.copytree(built / "deploy" / "cpu", board / "lenet")  # the bundle alone, away from the build
    proc = fresh_python([board / "lenet" / "run.py", "--input", x, "--output", board / "y.npz", "--runtime", runtime], board)
    assert proc.returncode == 0, proc.stderr
    on_board = np.load(board / "y.npz")["fc2"]
    code, _, stderr = cli("run", built / "deploy" / "cpu", "--input", x, "--output", tmp_path / "z.npz", "--runtime", runtime)
    assert code == 0, stderr
    via_lbdlc = np.load(tmp_path / "z.npz")["fc2"]
    assert np.array_equal(on_board, via_lbdlc)
    reference = run_pytorch(built, {"image": np.load(x)})[0]
    assert on_board.shape == (3, 10)
    assert np.abs(on_board - reference).max() <= TOLERANCE


def test_fresh_interpreter_really_lacks_lbdlc(tmp_path):
    """The harness above is real: in it, lbdlc, torch and safetensors cannot be imported."""
    (tmp_path / "probe.py").write_text(
        "import sys\n"
        "for m in ('lbdlc', 'torch', 'safetensors'):\n"
        "    try:\n"
        "        __import__(m)\n"
        "        sys.exit(m + ' importable')\n"
        "    except ModuleNotFoundError:\n"
        "        pass\n"
        "import numpy, tvm.runtime, onnxruntime\n")
    proc = fresh_python([tmp_path / "probe.py"], tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_lbdlc_run_prints_outputs_and_accepts_a_build_directory(built, x, cli):
    code, stdout, stderr = cli("run", built, "--input", f"image={x}", "--json")  # one bundle: found in the build
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["runtime"] == "tvm" and np.asarray(result["outputs"]["fc2"]).shape == (3, 10)
    code, stdout, _ = cli("run", built / "deploy" / "cpu", "--input", x)
    assert code == 0 and stdout.startswith("fc2: float32 [3, 10] (tvm)")


def test_run_errors(built, tmp_path, cli):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 3, 28, 28), np.float32))
    code, _, stderr = cli("run", built / "deploy" / "cpu", "--input", bad)
    assert code == 2 and "input 'image' has shape [2, 3, 28, 28], the model takes [batch, 1, 28, 28]" in stderr
    code, _, stderr = cli("run", built / "deploy" / "cpu", "--input", f"img={bad}")
    assert code == 2 and "no input 'img'" in stderr and "its inputs: image" in stderr
    code, _, stderr = cli("run", built / "deploy" / "cpu", "--input", tmp_path / "missing.npy")
    assert code == 2 and "no such input file" in stderr
    code, _, stderr = cli("run", built, "--target", "arm64", "--input", bad)
    assert code == 2 and "no bundle for target 'arm64'" in stderr and "its bundles: cpu" in stderr
    code, _, stderr = cli("run", tmp_path, "--input", bad)
    assert code == 2 and "not an lbdlc bundle" in stderr
    code, _, stderr = cli("run", built / "deploy" / "cpu", "--input", bad, "--runtime", "onnx")
    assert code == 2 and "the model takes" in stderr and "Traceback" not in stderr
    code, _, stderr = cli("run", built / "deploy" / "cpu", "--input", bad, "--runtime", "openvino")
    assert code == 2 and "no openvino model" in stderr


def test_bench(built, cli, tmp_path):
    code, stdout, stderr = cli("bench", built / "deploy" / "cpu", "--runs", "5", "--warmup", "1", "--repeats", "2", "--dim", "batch=2", "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert [r["runtime"] for r in result["results"]] == ["tvm", "onnx"]
    for r in result["results"]:
        assert r["batch"] == 2 and r["runs"] == 10 and len(r["round_medians_ms"]) == 2
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["throughput_per_s"] == pytest.approx(2 / (r["median_ms"] / 1e3))
    code, stdout, _ = cli("bench", built / "deploy" / "cpu", "--runs", "3", "--warmup", "0", "--repeats", "1", "--runtime", "onnx")
    assert code == 0 and "median ms" in stdout and "onnx" in stdout
    code, _, stderr = cli("bench", built / "deploy" / "cpu", "--dim", "batch=x")
    assert code == 2 and "expected NAME=SIZE" in stderr


def test_run_py_bench_on_the_board(built, tmp_path):
    board = tmp_path / "board"
    shutil.copytree(built / "deploy" / "cpu", board / "lenet")
    proc = fresh_python([board / "lenet" / "run.py", "--bench", "--runs", "3", "--warmup", "1", "--repeats", "1", "--runtime", "onnx", "--json"], board)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["runtime"] == "onnx" and result["runs"] == 3 and result["median_ms"] > 0
    proc = fresh_python([board / "lenet" / "run.py"], board)
    assert proc.returncode == 2 and "give an input" in proc.stderr


@pytest.mark.slow
def test_mobilenet_v2_for_arm64_and_cpu(tmp_path, cli):
    """The issue's acceptance build, `-q int8`: mobilenet_v2 bundles for arm64 (ELF aarch64
    objects) and the host CPU (run.py in a fresh interpreter agrees with `lbdlc run` and, within
    the int8 error, with PyTorch's fp32)."""
    from lbdlc.bundle import object_machines

    out = tmp_path / "mobilenet_v2"
    code, _, stderr = cli("build", SPECS / "mobilenet_v2.yaml", "-o", out, "--target", "arm64", "--target", "cpu", "-q", "int8")
    assert code == 0, stderr
    assert set(object_machines(out / "deploy" / "arm64" / "model.tvm.tar").values()) == {183}
    import onnx  # the bundles carry ONNX Runtime's int8 model (dynamic: integer convolutions)

    ops = {n.op_type for n in onnx.load(str(out / "deploy" / "cpu" / "model.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "ConvInteger"} <= ops, ops
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32))
    board = tmp_path / "board"
    shutil.copytree(out / "deploy" / "cpu", board / "m")
    name = json.loads((out / "deploy" / "cpu" / "manifest.json").read_text())["model"]["outputs"][0]["name"]
    reference = run_pytorch(out, {json.loads((out / "manifest.json").read_text())["model"]["inputs"][0]["name"]: np.load(x)})[0]
    for runtime in ("tvm", "onnx"):
        proc = fresh_python([board / "m" / "run.py", "--input", x, "--output", board / f"{runtime}.npz", "--runtime", runtime], board)
        assert proc.returncode == 0, proc.stderr
        code, _, stderr = cli("run", out / "deploy" / "cpu", "--input", x, "--output", tmp_path / f"{runtime}.npz", "--runtime", runtime)
        assert code == 0, stderr
        got = np.load(board / f"{runtime}.npz")[name]
        assert np.array_equal(got, np.load(tmp_path / f"{runtime}.npz")[name])
        assert np.abs(got - reference).max() <= TOLERANCE * max(1.0, float(np.abs(reference).max()))
