"""`train.distributed: {strategy: fsdp}` (backends/train_fsdp.py): train.py shards the repeated
blocks and the model with FSDP2 under torchrun, and still writes single-process files."""
import csv
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from test_training_runs import clean_env
from training_util import build_train

FSDP = """\
lbdlc: 1
name: fsdp
inputs:
  x: {shape: [batch, 16]}
blocks:
  mlp_block:
    layers:
      - {name: fc, op: linear, out_features: 16}
      - {name: act, op: tanh}
      - {name: res, op: add, in: [x, act]}
layers:
  - {name: stem, op: linear, out_features: 16}
  - {name: body, op: mlp_block, repeat: 3}
  - {name: head, op: linear, out_features: 4}
train:
  data: {kind: synthetic, samples: 256}
  batch_size: 32
  steps: 8
  loss: {kind: cross_entropy}
  optimizer: {kind: adamw, lr: 0.01}
  eval: {every: 4, metrics: [accuracy]}
  log: {every: 1}
  checkpoint: {every: 4}
  distributed: {strategy: fsdp}
"""


def losses(run) -> list[tuple[str, float]]:
    with open(run / "metrics.csv", newline="") as f:
        return [(r["step"], float(r["train_loss"])) for r in csv.DictReader(f)]


def test_train_py_shards_before_the_optimizer_and_drops_ddp(tmp_path):
    source = (build_train(tmp_path, FSDP) / "train.py").read_text()
    assert "from torch.distributed.fsdp import fully_shard" in source
    shard = source.index("        units = shard_model(raw_model)\n")
    assert shard < source.index("    optimizer = make_optimizer(raw_model)\n")
    assert "    model = raw_model  # FSDP: sharded by shard_model above, no DDP wrapper\n" in source
    assert "model = DistributedDataParallel(" not in source
    assert "    weights, optimizer_state = weights_of(model), optimizer_state_of(model, optimizer)" in source
    plain = (build_train(tmp_path, FSDP.replace("  distributed: {strategy: fsdp}\n", "")) / "train.py").read_text()
    assert "fully_shard" not in plain and "model = DistributedDataParallel(" in plain


def test_fsdp_with_lora_fine_tuning_is_a_located_error(cli, tmp_path):
    from conftest import SPECS, located

    (tmp_path / "mlp_digits.yaml").write_text((SPECS / "mlp_digits.yaml").read_text())
    text = (SPECS / "mlp_digits_lora.yaml").read_text().replace("  optimizer:", "  distributed: {strategy: fsdp}\n  optimizer:")
    path = tmp_path / "lora.yaml"
    path.write_text(text)
    code, _, err = cli("build", path, "-o", tmp_path / "out", "-b", "pytorch")
    line = next(k for k, t in enumerate(text.splitlines(), 1) if "distributed:" in t)
    assert code == 2 and "fsdp is not supported with LoRA fine-tuning" in located(err, path, line, "{strategy: fsdp}")


@pytest.mark.slow
def test_two_fsdp_processes_match_one_and_resume_exactly(tmp_path):
    build = build_train(tmp_path, FSDP)
    env = clean_env()
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]

    def run(*args):
        proc = subprocess.run(list(args), cwd=build, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    run(sys.executable, "train.py", "--out", "one")
    assert "FSDP: 3 blocks and the model sharded over 2 processes" in run(*two, "--out", "two")
    one, sharded = losses(build / "one"), losses(build / "two")
    assert [s for s, _ in one] == [s for s, _ in sharded] == [str(k) for k in range(1, 9)]
    assert all(abs(a - b) <= 1e-5 for (_, a), (_, b) in zip(one, sharded)), (one, sharded)
    assert sharded[-1][1] < sharded[0][1] - 0.2  # it trained
    # The files hold full tensors under the spec's names, as one process writes them.
    for path in ("weights.safetensors", "checkpoint/weights.safetensors"):
        w1, w2 = load_file(str(build / "one" / path)), load_file(str(build / "two" / path))
        assert sorted(w1) == sorted(w2) and all(w1[k].shape == w2[k].shape for k in w1)
        assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-5
    # Paused at step 4 and resumed (sharded optimizer state gathered, saved, scattered back).
    run(*two, "--out", "split", "--stop-at", "4")
    assert "resumed from" in run(*two, "--out", "split", "--resume")
    assert losses(build / "split") == sharded
    assert (build / "split" / "weights.safetensors").read_bytes() == (build / "two" / "weights.safetensors").read_bytes()
