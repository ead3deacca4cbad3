"""Deployment targets (lbdlc/targets.py): presets, raw TVM dicts, cross builds for aarch64
(ELF objects checked byte by byte), GPU builds without a GPU, and the errors that name a fix."""
import json
import shutil
import struct
import tarfile

import numpy as np
import pytest
from conftest import SPECS, located

from lbdlc.bundle import elf_machine, object_machines
from lbdlc.targets import ELF_MACHINES, PRESETS, gpu_present, host_cpu_name

LENET = (SPECS / "lenet.yaml").read_text()
EM_AARCH64 = 183
GPU = gpu_present()


def _safetensors_dtypes(path) -> set[str]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


@pytest.fixture(scope="module")
def cross(tmp_path_factory):
    """One build of lenet for five targets named in the spec's `deploy:`: the arm64 preset, a raw
    TVM dict (Cortex-A72), an H100 in fp16, a Jetson (CUDA with an aarch64 host) and a
    Raspberry Pi 4 (TVM's tag), none of which this machine can run natively."""
    from typer.testing import CliRunner

    from lbdlc.cli import app

    root = tmp_path_factory.mktemp("cross")
    spec = root / "lenet_deploy.yaml"
    spec.write_text(LENET + "deploy:\n  targets:\n    - arm64\n"
                    "    - {kind: llvm, mtriple: aarch64-linux-gnu, mcpu: cortex-a72, mattr: [+neon], name: a72}\n"
                    "    - h100:fp16\n    - jetson-orin-nano\n    - rpi4\n")
    out = root / "out"
    result = CliRunner().invoke(app, ["build", str(spec), "-o", str(out), "-b", "tvm", "-b", "onnx"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_presets_listed(cli):
    code, stdout, _ = cli("targets", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(stdout)["presets"]}
    assert list(rows) == ["cpu", "arm64", "rpi4", "jetson-orin-nano", "cuda", "h100"] == list(PRESETS)
    # cpu: this machine's CPU by LLVM's name, which fixes its SIMD features
    assert rows["cpu"]["tvm"]["mcpu"] == host_cpu_name() and rows["cpu"]["runs_here"]
    assert rows["arm64"]["tvm"]["mtriple"] == "aarch64-linux-gnu" and rows["arm64"]["tvm"]["mattr"] == ["+neon"]
    assert rows["arm64"]["cross"] and ".tar" in rows["arm64"]["library"]
    # rpi4 comes from TVM's raspberry-pi tag
    assert rows["rpi4"]["tvm"]["mcpu"] == "cortex-a72" and rows["rpi4"]["tvm"]["mtriple"] == "aarch64-linux-gnu"
    assert rows["jetson-orin-nano"]["tvm"]["arch"] == "sm_87"
    assert rows["jetson-orin-nano"]["tvm"]["host"]["mtriple"] == "aarch64-linux-gnu"
    assert rows["h100"]["tvm"]["arch"] == "sm_90" and rows["h100"]["onnxruntime"] == "CUDAExecutionProvider"
    assert rows["cuda"]["available"] == GPU
    code, stdout, _ = cli("targets")
    assert code == 0 and "jetson-orin-nano" in stdout and "h100:fp16" in stdout


def test_arm64_objects_are_elf_aarch64(cross):
    out, stdout = cross
    assert sorted(p.name for p in (out / "deploy").iterdir()) == ["a72", "arm64", "h100-fp16", "jetson-orin-nano", "rpi4"]
    for name in ("arm64", "a72", "rpi4", "jetson-orin-nano"):
        tar = out / "deploy" / name / "model.tvm.tar"
        machines = object_machines(tar)
        assert machines and set(machines.values()) == {EM_AARCH64}, machines  # e_machine of every object
        with tarfile.open(tar) as t:  # reproducible: no timestamps, owners or shuffled order
            members = t.getmembers()
            assert [m.name for m in members] == sorted(m.name for m in members)
            assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(0, 0, 0, "")}
        manifest = json.loads((out / "deploy" / name / "manifest.json").read_text())
        assert manifest["target"]["arch"] == "aarch64" and manifest["target"]["cross"] is True
        has_so = shutil.which("aarch64-linux-gnu-g++") is not None
        assert (out / "deploy" / name / "model.tvm.so").exists() == has_so
        if has_so:
            assert elf_machine(out / "deploy" / name / "model.tvm.so") == EM_AARCH64
    a72 = json.loads((out / "deploy" / "a72" / "manifest.json").read_text())["target"]
    assert a72["preset"] is None and a72["tvm"]["mcpu"] == "cortex-a72"
    rpi4 = json.loads((out / "deploy" / "rpi4" / "manifest.json").read_text())["target"]
    assert rpi4["tvm"]["mcpu"] == "cortex-a72" and rpi4["tvm"]["num-cores"] == 4
    jetson = json.loads((out / "deploy" / "jetson-orin-nano" / "manifest.json").read_text())["target"]
    assert (jetson["device"], jetson["arch"], jetson["tvm"]["arch"]) == ("cuda", "aarch64", "sm_87")
    with tarfile.open(out / "deploy" / "jetson-orin-nano" / "model.tvm.tar") as t:  # aarch64 host code + CUDA kernels
        assert b"__global__" in t.extractfile("devc.o").read()
    assert "bundle arm64 (cpu, aarch64, fp32)" in stdout


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="needs g++-aarch64-linux-gnu")
def test_arm64_shared_library_with_the_cross_compiler(cross):
    out, _ = cross
    assert elf_machine(out / "deploy" / "arm64" / "model.tvm.so") == EM_AARCH64
    manifest = json.loads((out / "deploy" / "arm64" / "manifest.json").read_text())
    assert manifest["runtimes"]["tvm"]["library"] == "model.tvm.so"


def test_aarch64_bundle_on_this_machine_says_where_to_run(cross, cli, tmp_path):
    if ELF_MACHINES.get(__import__("platform").machine()) == EM_AARCH64:
        pytest.skip("this machine is aarch64")
    out, _ = cross
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 1, 28, 28), np.float32))
    code, _, stderr = cli("run", out / "deploy" / "arm64", "--input", x, "--runtime", "tvm")
    assert code == 2 and "aarch64 machine code" in stderr and "--runtime onnx" in stderr and "Traceback" not in stderr
    code, stdout, _ = cli("run", out / "deploy" / "arm64", "--input", x)  # falls to model.onnx, which runs anywhere
    assert code == 0 and "(onnx)" in stdout


def test_h100_fp16_bundle_builds_without_a_gpu(cross):
    out, _ = cross
    bundle = out / "deploy" / "h100-fp16"
    manifest = json.loads((bundle / "manifest.json").read_text())
    t = manifest["target"]
    assert (t["device"], t["precision"], t["tvm"]["kind"], t["tvm"]["arch"]) == ("cuda", "fp16", "cuda", "sm_90")
    assert elf_machine(bundle / "model.tvm.so") == ELF_MACHINES["x86_64"]  # the host side: x86-64
    assert b"__global__" in (bundle / "model.tvm.so").read_bytes()  # CUDA kernels, compiled when loaded
    assert _safetensors_dtypes(bundle / "weights.safetensors") == {"F16"}
    assert (bundle / "weights.safetensors").stat().st_size < 0.55 * (out / "deploy" / "arm64" / "weights.safetensors").stat().st_size
    import onnx

    model = onnx.load(str(bundle / "model.onnx"))
    assert {i.data_type for i in model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 in, fp32 out
    assert manifest["runtimes"]["onnx"]["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    readme = (bundle / "README.md").read_text()
    assert "cuda-bindings" in readme and "CUDAExecutionProvider" in readme


@pytest.mark.skipif(GPU, reason="this machine has a GPU")
def test_gpu_bundle_without_a_gpu_is_a_clear_error(cross, cli, tmp_path):
    out, _ = cross
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 1, 28, 28), np.float32))
    for runtime in ([], ["--runtime", "onnx"], ["--runtime", "tvm"]):
        code, _, stderr = cli("run", out / "deploy" / "h100-fp16", "--input", x, *runtime)
        assert code == 2 and "NVIDIA GPU, and this machine has none" in stderr and "onnxruntime-gpu" in stderr, stderr
        assert "Traceback" not in stderr


@pytest.mark.skipif(GPU, reason="this machine has a GPU")
def test_local_gpu_target_without_a_gpu(cli, tmp_path):
    code, _, stderr = cli("build", SPECS / "mlp.yaml", "-o", tmp_path / "o", "-b", "onnx", "--target", "cuda")
    assert code == 2 and "this machine has none" in stderr and "--target h100" in stderr and "NVIDIA driver" in stderr
    assert not (tmp_path / "o").exists()  # a failed build leaves nothing


def test_unknown_targets_and_options(cli, tmp_path, write_spec):
    code, _, stderr = cli("build", SPECS / "mlp.yaml", "-o", tmp_path / "o", "-b", "onnx", "--target", "arm46")
    assert code == 2 and "unknown target 'arm46'" in stderr and "did you mean 'arm64'?" in stderr
    code, _, stderr = cli("build", SPECS / "mlp.yaml", "-o", tmp_path / "o", "-b", "onnx", "--target", "h100:fp61")
    assert code == 2 and "unknown target option 'fp61'" in stderr and "did you mean 'fp16'?" in stderr
    code, _, stderr = cli("build", SPECS / "mlp.yaml", "-o", tmp_path / "o", "-b", "onnx", "--target", '{"kind": "llvm"')
    assert code == 2 and "not a JSON object" in stderr
    # in a spec: located at the entry, found by `lbdlc check` already
    spec = write_spec((SPECS / "mlp.yaml").read_text() + "deploy:\n  targets: [cpu, rpi5]\n")
    code, _, stderr = cli("check", spec)
    line = len(spec.read_text().splitlines())
    assert code == 2
    assert "unknown target 'rpi5'" in located(stderr, spec, line, "rpi5") and "did you mean 'rpi4'?" in stderr
    # a raw dict TVM rejects: located at the dict, at build time
    spec = write_spec((SPECS / "mlp.yaml").read_text() + "deploy:\n  targets:\n    - {kind: llvmm, mtriple: aarch64-linux-gnu}\n", "raw.yaml")
    code, _, stderr = cli("build", spec, "-o", tmp_path / "o", "-b", "onnx")
    line = len(spec.read_text().splitlines())
    assert code == 2 and "not a valid TVM target" in located(stderr, spec, line, "{kind") and "llvmm" in stderr
    assert not (tmp_path / "o").exists()


def test_shared_library_needs_the_cross_compiler(cli, tmp_path, monkeypatch):
    from lbdlc import targets

    real = shutil.which
    monkeypatch.setattr(targets.shutil, "which", lambda cmd, *a, **k: None if "aarch64" in cmd else real(cmd, *a, **k))
    code, _, stderr = cli("build", SPECS / "mlp.yaml", "-o", tmp_path / "o", "-b", "onnx", "--target", "arm64:so")
    assert code == 2 and "aarch64-linux-gnu-g++ is not on PATH" in stderr
    assert "apt-get install g++-aarch64-linux-gnu" in stderr and "without `so`" in stderr
    assert not (tmp_path / "o").exists()


def test_command_line_targets_replace_the_specs(cli, tmp_path, write_spec):
    """--target replaces `deploy:`; an ONNX-only build makes ONNX-only bundles (no TVM compile)."""
    spec = write_spec((SPECS / "mlp.yaml").read_text() + "deploy: {targets: [arm64, rpi4]}\n")
    code, stdout, stderr = cli("build", spec, "-o", tmp_path / "o", "-b", "onnx", "--target", "cpu")
    assert code == 0, stderr
    assert "bundle cpu (cpu, x86_64, fp32)" in stdout or "bundle cpu (cpu, aarch64, fp32)" in stdout
    assert [p.name for p in (tmp_path / "o" / "deploy").iterdir()] == ["cpu"]
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert list(manifest["deploy"]) == ["cpu"] and manifest["deploy"]["cpu"]["runtimes"] == ["onnx"]
    files = sorted(p.name for p in (tmp_path / "o" / "deploy" / "cpu").iterdir())
    assert files == ["README.md", "manifest.json", "model.onnx", "run.py"]
    code, _, stderr = cli("build", spec, "-o", tmp_path / "p", "-b", "onnx")  # the spec's own list
    assert code == 0, stderr
    assert sorted(p.name for p in (tmp_path / "p" / "deploy").iterdir()) == ["arm64", "rpi4"]
    code, _, stderr = cli("build", spec, "-o", tmp_path / "q", "-b", "pytorch", "--target", "cpu")
    assert code == 2 and "need the tvm or onnx backend" in stderr


@pytest.mark.skipif(not GPU, reason="needs an NVIDIA GPU")
def test_local_gpu_bundle_matches_pytorch(cli, tmp_path):
    """On a GPU machine: the `cuda` preset (TVM with dlight schedules, ONNX Runtime's CUDA
    provider, asserted loaded) agrees with PyTorch."""
    from lbdlc.runner import open_bundle
    from lbdlc.verify import run_pytorch

    out = tmp_path / "o"
    code, _, stderr = cli("build", SPECS / "lenet.yaml", "-o", out, "--target", "cuda")
    assert code == 0, stderr
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    want = run_pytorch(out, {"image": x})[0]
    for runtime in ("tvm", "onnx"):
        _, _, session = open_bundle(out / "deploy" / "cuda", runtime)
        if runtime == "onnx":
            assert "CUDAExecutionProvider" in session.session.get_providers()
        got = session.run({"image": x})[0]
        assert np.abs(got - want).max() <= 1e-4


@pytest.mark.slow
def test_bundles_are_reproducible(cli, tmp_path):
    """Invariant 4 for bundles: two builds give byte-identical files (the .tar has no
    timestamps; the cross .so, the CUDA library and the fp16 ONNX model are deterministic)."""
    code, stdout, stderr = cli("build", SPECS / "lenet.yaml", "-o", tmp_path / "o", "-b", "tvm", "-b", "onnx", "--target", "cpu",
                               "--target", "arm64", "--target", "h100:fp16", "--check-reproducible")
    assert code == 0, stdout + stderr
    assert "byte-identical" in stdout
