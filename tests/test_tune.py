"""`lbdlc build --tune N` (lbdlc/tune.py): MetaSchedule tuning of a target's TVM library, its
database kept in <build>/tuning and reused by the next build of an unchanged graph."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import SPECS

from lbdlc.targets import gpu_present
from lbdlc.verify import run_pytorch, run_tvm

TRIALS = 16  # per build; tuning lenet with 64 trials is recorded in benchmarks/README.md


def test_tune_needs_a_target_and_tvm(cli, tmp_path):
    code, _, stderr = cli("build", SPECS / "mlp.yaml", "-o", tmp_path / "o", "--tune", "8", "-b", "onnx")
    assert code == 2 and "--tune tunes a deploy target's library: name one" in stderr and "--target cpu" in stderr
    code, _, stderr = cli("build", SPECS / "mlp.yaml", "-o", tmp_path / "o", "--tune", "8", "-b", "onnx", "--target", "cpu")
    assert code == 2 and "needs the tvm backend" in stderr
    code, _, stderr = cli("build", SPECS / "mlp.yaml", "-o", tmp_path / "o", "--tune", "8", "-b", "tvm", "--target", "arm64")
    assert code == 2 and "aarch64 code this machine cannot run" in stderr and "--target cpu --tune N" in stderr
    if not gpu_present():
        code, _, stderr = cli("build", SPECS / "mlp.yaml", "-o", tmp_path / "o", "--tune", "8", "-b", "tvm", "--target", "h100")
        assert code == 2 and "needs an NVIDIA GPU, which this machine lacks" in stderr
    code, _, stderr = cli("build", SPECS / "mlp.yaml", "-o", tmp_path / "o", "-b", "onnx", "--target", "cpu", "--static", "seq=4")
    assert code == 2 and "no symbolic dimension 'seq'" in stderr and "batch" in stderr
    code, _, stderr = cli("build", SPECS / "mlp.yaml", "-o", tmp_path / "o", "-b", "onnx", "--target", "cpu", "--static", "batch=0")
    assert code == 2 and "positive size" in stderr
    assert not (tmp_path / "o").exists()


def test_missing_tuner_packages_name_the_extra(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgboost", None)  # import xgboost -> ImportError
    code, _, stderr = cli("build", SPECS / "mlp.yaml", "-o", tmp_path / "o", "--tune", "8", "-b", "tvm", "--target", "cpu")
    assert code == 2 and "--tune needs xgboost" in stderr and "pip install 'lbdlc[tune]'" in stderr


def test_module_key_follows_graph_shapes_and_target():
    import tvm
    from tvm import relax

    from lbdlc.bundle import relax_module
    from lbdlc.lower import load, lower
    from lbdlc.targets import resolve
    from lbdlc.tune import module_key

    def key(spec, dims, target="cpu", overrides=()):
        t = resolve(target)
        with t.tvm_target():
            mod = relax.get_pipeline("zero")(relax_module(lower(load(spec, list(overrides))), t, dims))
        return module_key(mod, t.tvm_target())

    base = key(SPECS / "mlp.yaml", {"batch": 1})
    assert base == key(SPECS / "mlp.yaml", {"batch": 1})  # deterministic
    assert len({base, key(SPECS / "mlp.yaml", {"batch": 2}), key(SPECS / "mlp.yaml", {"batch": 1}, "arm64"),
                key(SPECS / "mlp.yaml", {"batch": 1}, "cpu:fp16"), key(SPECS / "mlp.yaml", {"batch": 1}, overrides=["layers.fc1.out_features=30"])}) == 5
    assert tvm.__version__


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    pytest.importorskip("xgboost", reason="tuning needs the `tune` extra")
    from typer.testing import CliRunner

    from lbdlc.cli import app

    out = tmp_path_factory.mktemp("tune") / "lenet"
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["build", str(SPECS / "lenet.yaml"), "-o", str(out), "--target", "cpu", "--tune", str(TRIALS)])
    assert result.exit_code == 0, result.output
    return out, time.perf_counter() - start, result.output


@pytest.mark.slow
def test_second_build_reuses_the_database(tuned):
    """A second build of the unchanged spec, in another process (the key is stable across
    processes), applies the recorded schedules without tuning: same library bytes, no new trials."""
    out, first_seconds, stdout = tuned
    manifest = json.loads((out / "manifest.json").read_text())
    tuning = manifest["tuning"]["cpu"]
    assert tuning["reused"] is False and tuning["trials"] == TRIALS and tuning["tasks"] >= 4
    database = out / tuning["database"]
    records = (database / "database_tuning_record.json").read_text().splitlines()
    assert len(records) >= tuning["tasks"]  # at least one measured schedule per task
    meta = json.loads((database / "meta.json").read_text())
    assert f"tuning cpu: {TRIALS} trials over {tuning['tasks']} tasks in" in stdout
    # lbdlc's default schedules were measured first: a record for every task they schedule,
    # the first of its workload, so MetaSchedule's choice is never slower than the default
    seeded = int(stdout.split("default schedules measured as the first candidates of ")[1].split()[0])
    assert seeded >= tuning["tasks"] - 1
    first = {}
    for line in records:
        workload, (trace, run_secs, *_) = json.loads(line)
        first.setdefault(workload, (len(trace[0]), run_secs))
    assert sum(1 for insts, secs in first.values() if insts > 0 and secs) >= seeded
    library = (out / "deploy" / "cpu" / "model.tvm.so").read_bytes()
    bundle_manifest = json.loads((out / "deploy" / "cpu" / "manifest.json").read_text())
    assert bundle_manifest["model"]["inputs"][0]["shape"] == [1, 1, 28, 28]  # tuned: batch fixed at 1
    assert bundle_manifest["model"]["static_dims"] == {"batch": 1}

    # an untuned build in between keeps the database (a cache next to the build)
    from typer.testing import CliRunner

    from lbdlc.cli import app

    result = CliRunner().invoke(app, ["build", str(SPECS / "lenet.yaml"), "-o", str(out), "--target", "cpu", "-b", "tvm"])
    assert result.exit_code == 0, result.output
    assert "tuning" not in json.loads((out / "manifest.json").read_text()) and (database / "meta.json").is_file()

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "from lbdlc.cli import main; main()", "build", str(SPECS / "lenet.yaml"), "-o", str(out), "--target", "cpu",
                           "--tune", str(TRIALS)], capture_output=True, text=True, timeout=600)
    second_seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    again = json.loads((out / "manifest.json").read_text())["tuning"]["cpu"]
    assert again == {**tuning, "reused": True}
    assert "tuning cpu: reused" in proc.stdout and "MetaSchedule trials" not in proc.stderr
    assert (out / "deploy" / "cpu" / "model.tvm.so").read_bytes() == library  # the same schedules
    assert (database / "database_tuning_record.json").read_text().splitlines() == records
    assert json.loads((database / "meta.json").read_text()) == meta
    assert second_seconds < 120  # no tuning: imports and one compile (13 s on a quiet machine, 16 s in a subprocess)


@pytest.mark.slow
def test_tuned_output_equals_untuned(tuned):
    from lbdlc.runner import open_bundle

    out, _, _ = tuned
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    _, _, session = open_bundle(out / "deploy" / "cpu", "tvm")
    got = session.run({"image": x})[0]
    untuned = run_tvm(out, {"image": x})[0]  # the build's own library: same graph, default schedules
    assert np.abs(got - untuned).max() <= 1e-5
    assert np.abs(got - run_pytorch(out, {"image": x})[0]).max() <= 1e-4

