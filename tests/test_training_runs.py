"""Training runs end to end (issue [4/10]): `lbdlc train`, the generated train.py standalone,
under torchrun, resumed exactly; trained LeNet and a tiny GPT reach their targets, and the
trained weights compile to ONNX and TVM with the same accuracy."""
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, SPECS
from training_util import build_train, load_train

TINY_GPT = ROOT / "tests" / "specs" / "gpt_tiny_train.yaml"


def rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def clean_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


# -- LeNet on the digits: the protocol written in specs/lenet.yaml ---------------------------------


def accuracy_of_backends(tmp_path: Path, weights: Path, module, overrides=()) -> dict[str, float]:
    """Build lenet.yaml with the trained weights (all backends) and score each on the test split."""
    from lbdlc.driver import BuildOptions, build
    from lbdlc.verify import run_onnx, run_pytorch, run_tvm

    out = build(SPECS / "lenet.yaml", tmp_path / "deployed", BuildOptions(weights=weights, overrides=tuple(overrides))).out_dir
    test = module.make_data()["test"]
    inputs = {"image": test["image"].numpy()}
    labels = test["fc2"].numpy()
    return {name: float((run(out, inputs)[0].argmax(-1) == labels).mean())
            for name, run in (("pytorch", run_pytorch), ("onnx", run_onnx), ("tvm", run_tvm))}


def test_lenet_short_run_and_its_onnx_and_tvm_builds(tmp_path, cli):
    """Fast sibling of the full run: 3 epochs already pass 80%; every backend scores the same."""
    code, _, err = cli("train", SPECS / "lenet.yaml", "-o", tmp_path / "lenet", "--epochs", "3")
    assert code == 0, err
    run = tmp_path / "lenet" / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 * (1258 // 32)  # 1797 digits, 70% for training, batches of 32
    assert summary["test"]["accuracy"] > 0.8, summary
    module = load_train(tmp_path / "lenet")
    scores = accuracy_of_backends(tmp_path, run / "weights.safetensors", module)
    assert scores["pytorch"] == pytest.approx(summary["test"]["accuracy"], abs=1e-9)
    assert scores["onnx"] == scores["pytorch"] and scores["tvm"] == scores["pytorch"], scores


@pytest.mark.slow
def test_lenet_reaches_97_percent_and_onnx_and_tvm_reproduce_it(tmp_path, cli):
    code, _, err = cli("train", SPECS / "lenet.yaml", "-o", tmp_path / "lenet")
    assert code == 0, err
    run = tmp_path / "lenet" / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["accuracy"] >= 0.97, summary
    scores = accuracy_of_backends(tmp_path, run / "weights.safetensors", load_train(tmp_path / "lenet"))
    print("lenet test accuracy:", summary["test"], scores, f"{summary['seconds']} s")
    assert all(s >= 0.97 for s in scores.values()), scores
    assert scores["onnx"] == scores["pytorch"] and scores["tvm"] == scores["pytorch"], scores


# -- train.py on its own -----------------------------------------------------------------------

BLOCK_LBDLC = """\
import importlib.abc, os, runpy, sys

class NoLbdlc(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "lbdlc" or name.startswith("lbdlc."):
            raise ImportError("lbdlc is not importable here")

sys.meta_path.insert(0, NoLbdlc())
sys.path.insert(0, os.getcwd())  # python -I leaves the current directory out
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
assert not any(m == "lbdlc" or m.startswith("lbdlc.") for m in sys.modules)
print("standalone ok")
"""


def test_generated_script_runs_without_lbdlc(tmp_path):
    build = build_train(tmp_path, (SPECS / "lenet.yaml").read_text(), name="lenet.yaml")
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    for name in ("model.py", "train.py", "weights.safetensors"):
        shutil.copy(build / name, alone / name)
    imports = [line for line in (alone / "train.py").read_text().splitlines() if line.startswith(("import ", "from "))]
    assert not [line for line in imports if "lbdlc" in line]
    assert {line.split()[1].split(".")[0] for line in imports} <= {"argparse", "csv", "json", "math", "os", "random", "sys",
                                                                   "time", "pathlib", "numpy", "torch", "safetensors", "model"}
    result = subprocess.run([sys.executable, "-I", "-c", BLOCK_LBDLC, "--steps", "3", "--out", "run"], cwd=alone,
                            env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "standalone ok" in result.stdout and "done: 3 steps" in result.stdout
    assert (alone / "run" / "weights.safetensors").exists() and (alone / "run" / "metrics.csv").exists()


RESUMABLE = """\
lbdlc: 1
name: noisy
inputs:
  x: {shape: [batch, 1, 4, 4]}
layers:
  - {op: flatten}
  - {name: fc1, op: linear, out_features: 32}
  - {op: relu}
  - {op: dropout, p: 0.3}
  - {name: head, op: linear, out_features: 3}
train:
  seed: 4
  data: {kind: synthetic, samples: 160, augment: {flip: true, noise: 0.1}}
  batch_size: 16
  steps: 24
  loss: {kind: cross_entropy, label_smoothing: 0.1}
  optimizer: {kind: adamw, lr: 0.01, weight_decay: 0.1, no_decay: [biases]}
  schedule: {kind: cosine, warmup: 4}
  clip_grad_norm: 0.5
  grad_accumulation: 2
  eval: {every: 6, metrics: [accuracy]}
  checkpoint: {every: 5}
  log: {every: 1}
"""


def test_resume_continues_exactly(tmp_path):
    """Dropout, augmentation, the data order, AdamW state and the schedule all continue: the
    resumed run's loss curve and final weights equal the uninterrupted run's, bit for bit."""
    module = load_train(build_train(tmp_path, RESUMABLE))
    whole, split = tmp_path / "whole", tmp_path / "split"
    module.main(["--out", str(whole)])
    paused = module.main(["--out", str(split), "--stop-at", "13"])  # the last checkpoint is at step 13
    assert paused["steps"] == 13 and "test" not in paused
    module.main(["--out", str(split), "--resume"])
    key = lambda r: (r["step"], r["lr"], r["train_loss"], r["val_loss"], r["val_accuracy"])  # noqa: E731
    assert [key(r) for r in rows(split)] == [key(r) for r in rows(whole)]
    assert len(rows(whole)) == 24
    assert (split / "weights.safetensors").read_bytes() == (whole / "weights.safetensors").read_bytes()


DDP = """\
lbdlc: 1
name: ddp
inputs:
  x: {shape: [batch, 10]}
layers:
  - {name: fc1, op: linear, out_features: 16}
  - {op: tanh}
  - {name: head, op: linear, out_features: 4}
train:
  data: {kind: synthetic, samples: 256}
  batch_size: 32
  steps: 8
  loss: {kind: cross_entropy}
  optimizer: {kind: sgd, lr: 0.5, momentum: 0.9}
  eval: {every: 4, metrics: [accuracy]}
  log: {every: 1}
"""


def test_torchrun_two_processes_match_one(tmp_path):
    """Two gloo processes with half the batch each follow the single-process loss curve."""
    from safetensors.torch import load_file

    build = build_train(tmp_path, DDP)
    env = clean_env()
    single = subprocess.run([sys.executable, "train.py", "--out", "one"], cwd=build, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "--out", "two"],
                            cwd=build, env=env, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr
    assert double.stdout.count("done: 8 steps") == 1  # rank 0 reports
    one, two = rows(build / "one"), rows(build / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [str(k) for k in range(1, 9)]
    losses = [(float(a["train_loss"]), float(b["train_loss"])) for a, b in zip(one, two)]
    assert all(abs(a - b) <= 1e-5 for a, b in losses), losses
    assert losses[-1][0] < losses[0][0] - 0.1  # it trained
    for name in ("val_loss", "val_accuracy"):
        assert [float(a[name]) for a in one if a[name]] == pytest.approx([float(b[name]) for b in two if b[name]], abs=1e-5)
    w1, w2 = load_file(str(build / "one" / "weights.safetensors")), load_file(str(build / "two" / "weights.safetensors"))
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-5
    assert json.loads((build / "two" / "summary.json").read_text())["world_size"] == 2


# -- lbdlc train -----------------------------------------------------------------------------


def test_lbdlc_train_builds_runs_and_resumes(tmp_path, cli):
    spec = tmp_path / "ddp.yaml"
    spec.write_text(DDP)
    out = tmp_path / "out"
    code, stdout, err = cli("train", spec, "-o", out, "--steps", "4", "--seed", "3")
    assert code == 0, err
    assert "running train.py" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.py", "run", "train.py", "weights.safetensors"]
    assert [r["step"] for r in rows(out / "run")] == ["1", "2", "3", "4"]
    code, _, err = cli("train", spec, "-o", out, "--steps", "6", "--resume", "--seed", "3")  # rebuilds, keeps run/
    assert code == 0, err
    assert [r["step"] for r in rows(out / "run")] == ["1", "2", "3", "4", "5", "6"]
    # A failure inside train.py is exit status 1 (here: fp16 without CUDA).
    code, _, err = cli("train", spec, "-o", out, "--steps", "1", "--set", "train.precision=fp16", "--device", "cpu")
    assert code == 1 and "train.py failed" in err


# -- a small GPT on a text file ----------------------------------------------------------------


def unigram_cross_entropy(text: str, val_fraction: float) -> float:
    """Validation cross-entropy (nats per character) of the training part's character frequencies."""
    n_val = round(len(text) * val_fraction)
    train, val = text[:len(text) - n_val], text[len(text) - n_val:]
    counts, vocab = Counter(train), len(set(text))
    return -sum(math.log((counts[c] + 1) / (len(train) + vocab)) for c in val) / len(val)


def gpt_run(tmp_path, cli, *args) -> tuple[dict, float]:
    code, _, err = cli("train", TINY_GPT, "-o", tmp_path / "gpt", *args)
    assert code == 0, err
    summary = json.loads((tmp_path / "gpt" / "run" / "summary.json").read_text())
    text = (ROOT / "tests" / "data" / "declaration.txt").read_text()
    return summary, unigram_cross_entropy(text, 0.1)


def test_tiny_gpt_beats_the_unigram_baseline_quickly(tmp_path, cli):
    summary, unigram = gpt_run(tmp_path, cli, "--steps", "120")
    print(f"tiny GPT, 120 steps: val loss {summary['val']['loss']:.3f} nats/char vs unigram {unigram:.3f}")
    assert summary["val"]["loss"] < 0.87 * unigram, (summary, unigram)
    vocab = json.loads((tmp_path / "gpt" / "run" / "vocab.json").read_text())
    assert "".join(vocab) == "".join(sorted(set((ROOT / "tests" / "data" / "declaration.txt").read_text())))


@pytest.mark.slow
def test_tiny_gpt_validation_loss_falls_well_below_unigram(tmp_path, cli):
    summary, unigram = gpt_run(tmp_path, cli)
    print(f"tiny GPT, full protocol: val loss {summary['val']['loss']:.3f} nats/char "
          f"(perplexity {summary['val']['perplexity']:.2f}) vs unigram {unigram:.3f} ({math.exp(unigram):.2f})")
    assert summary["val"]["loss"] < 0.8 * unigram, (summary, unigram)


def test_train_step_benchmark_compares_the_same_function():
    """benchmarks/train_step.py's nanoGPT reference computes the generated GPT-2's function."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "benchmarks" / "train_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.measure(tiny=True, batch=2, seq=16, reps=1, warmup=0)
    assert result["loss_diff"] < 1e-5 and result["params"] == 141_056
    assert result["generated"] > 0 and result["nanogpt"] > 0
