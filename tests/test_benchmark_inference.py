"""benchmarks/inference.py: every variant timed in a fresh process that loads only its runtime."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "inference.py"
_spec = importlib.util.spec_from_file_location("bench_inference", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_rounds_rotate_the_order_and_run_the_naive_library_once():
    variants = ["a", "b", "c", bench.NAIVE]
    assert bench.schedule(variants, 3) == [["a", "b", "c", bench.NAIVE], ["b", "c", "a"], ["c", "a", "b"]]
    assert bench.schedule(["a", "b"], 3) == [["a", "b"], ["b", "a"], ["a", "b"]]


def test_a_worker_loads_only_its_runtime_and_checks_its_outputs(tmp_path):
    """An ONNX Runtime worker in a fresh process: no torch there, outputs equal to eager's."""
    row = bench.prepare("mlp", tmp_path, use_tvm=False, naive=False)
    assert row["variants"] == ["PyTorch eager", bench.BASELINE, "lbdlc -O0 ONNX", "lbdlc -O2 ONNX"]
    # specs/mlp.yaml at batch 1: three matmuls (50 -> 25 -> 10 -> 2), their bias adds, two ReLUs (as `lbdlc check`)
    assert row["flops"] == 2 * (50 * 25 + 25 * 10 + 10 * 2) + (25 + 10 + 2) + (25 + 10)
    result = bench.spawn("lbdlc -O2 ONNX", tmp_path, reps=3, warmup=1)
    assert result["runtimes_loaded"] == ["onnxruntime"]
    assert len(result["ms"]) == 3 and all(ms > 0 for ms in result["ms"])
    assert result["diff"] < 1e-5
    assert result["threads"] >= 1
    assert "error" in bench.spawn("no such variant", tmp_path, reps=1, warmup=1)


@pytest.mark.slow
def test_small_run_times_every_variant_in_its_own_process(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--models", "mlp", "--reps", "2", "--rounds", "2", "--json", str(out)],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    timed = [v for v in bench.VARIANTS if v != bench.NAIVE]
    assert row["errors"] == {}
    assert sorted(row["ms"]) == sorted(timed)
    for v in timed:
        assert row["runtimes_loaded"][v] == [bench.RUNTIME[v]]  # one runtime per process
        assert len(row["round_ms"][v]) == 2
        assert row["diff"][v] < 1e-5
    assert set(result["threads"]) == {"torch", "onnxruntime", "tvm"}
    assert all(n >= 1 for counts in result["threads"].values() for n in counts)
    assert all(rate > 0 for rate in result["matmul_gflops"])
    assert "| mlp (50 features) |" in proc.stdout and "threads: PyTorch" in proc.stdout
    args = bench.argparse.Namespace(rounds=2, reps=2, warmup=2, tvm_reps=2, naive_tvm=False, no_tvm=False)
    section = bench.readme_section(result["rows"], tuple(result["matmul_gflops"]), result["threads"], args)
    assert section.startswith(bench.MARK_BEGIN) and section.endswith(bench.MARK_END)
    assert "a fresh process" in section and "one process\nper runtime per round" in section
    assert f"TVM {result['threads']['tvm'][0]} (" in section and "| mlp (50 features) |" in section
