"""`lbdlc diff` over real spec pairs: the numbers it reports are checked against
`lbdlc check --json` of each side (an independent path through the same analysis)."""
import json
import re

import pytest

from conftest import SPECS


def _check(cli, spec) -> dict:
    code, out, err = cli("check", spec, "--json")
    assert code == 0, err
    return json.loads(out)


def _diff(cli, *args) -> tuple[int, dict]:
    code, out, err = cli("diff", *args, "--format", "json")
    assert code in (0, 1), err
    return code, json.loads(out)


def _edit(text: str, pattern: str, repl: str) -> str:
    new, n = re.subn(pattern, repl, text, flags=re.M)
    assert n == 1, pattern
    return new


def _by_name(report: dict) -> dict:
    return {layer["name"]: layer for layer in report["layers"]}


def test_widening_gpt2_shows_every_affected_layer(cli, write_spec):
    """GPT-2 small, d_model 768 -> 1024 (and 16 heads): every layer whose shape or parameters
    change is listed, with the check totals' difference as the parameter delta."""
    text = (SPECS / "gpt2.yaml").read_text()
    wide = _edit(_edit(text, r"^  d_model: 768\b", "  d_model: 1024"), r"^  n_head: 12\b", "  n_head: 16")
    old, new = write_spec(text, "gpt2.yaml"), write_spec(wide, "gpt2_wide.yaml")
    code, d = _diff(cli, old, new)
    assert code == 1 and not d["same"]

    a, b = _check(cli, old), _check(cli, new)
    gpt2 = lambda d: 50257 * d + 1024 * d + 12 * (12 * d * d + 13 * d) + 2 * d  # noqa: E731 (tied head)
    assert d["delta"]["params"] == b["params"] - a["params"] == gpt2(1024) - gpt2(768) == 79_228_672
    assert d["delta"]["flops"] == b["flops"] - a["flops"]
    assert d["old"]["params"] == a["params"] == 124_439_808

    # Independently: the layers whose output shape or parameter count differ in the two checks.
    la, lb = {l["name"]: l for l in a["layers"]}, {l["name"]: l for l in b["layers"]}
    assert la.keys() == lb.keys()
    differing = {n for n in la if (la[n]["output_shape"], la[n]["params"], la[n]["flops"]) != (lb[n]["output_shape"], lb[n]["params"], lb[n]["flops"])}
    reported = _by_name(d)
    assert set(reported) == differing
    assert len(differing) == 125  # all of them: wte, wpe, drop, 12 blocks of 10, ln_f, lm_head
    for name in differing:
        entry = reported[name]
        assert entry["new"]["output_shapes"][0] == "[" + ", ".join(map(str, lb[name]["output_shape"])) + "]"
        assert entry["delta"]["params"] == lb[name]["params"] - la[name]["params"]
    # changed (a hyper-parameter moved) vs affected (only the shapes downstream)
    assert reported["wte"]["status"] == "changed"
    assert reported["wte"]["changes"]["attrs"] == {"embedding_dim": [768, 1024]}
    assert reported["h.3.attn"]["changes"]["attrs"]["heads"] == [12, 16]
    assert reported["h.3.mlp.c_fc"]["changes"]["attrs"]["out_features"] == [3072, 4096]
    assert reported["h.3.ln_1"]["status"] == "affected"
    assert reported["h.3.ln_1"]["changes"]["output_shapes"] == [["[batch, seq, 768]"], ["[batch, seq, 1024]"]]
    assert reported["ln_f"]["status"] == "affected"
    assert reported["lm_head"]["changes"]["param_shapes"] == {"weight": [[50257, 768], [50257, 1024]]}
    assert reported["wte"]["old_loc"]["line"] == reported["wte"]["new_loc"]["line"]
    assert "name: wte" in reported["wte"]["old_loc"]["text"]  # the layer's first line in the spec

    # The terminal text folds the twelve blocks into one line per layer.
    code, out, _ = cli("diff", old, new)
    assert code == 1
    assert "h.*.attn ×12" in out and "embedding_dim: 768 → 1024" in out
    assert "+79,228,672" in out


def test_resnet50_block_counts_swapped(cli, write_spec):
    """Stages 2 and 3 swap their block counts (4, 6 -> 6, 4): blocks added and removed per stage."""
    text = (SPECS / "resnet50.yaml").read_text()
    swapped = _edit(_edit(text, r"name: layer2, op: bottleneck, repeat: 4", "name: layer2, op: bottleneck, repeat: 6"),
                    r"name: layer3, op: bottleneck, repeat: 6", "name: layer3, op: bottleneck, repeat: 4")
    old, new = write_spec(text, "resnet50.yaml"), write_spec(swapped, "resnet50_swapped.yaml")
    code, d = _diff(cli, old, new)
    assert code == 1
    stages = {s["scope"]: s for s in d["structure"]}
    assert set(stages) == {"layer2", "layer3"}
    assert (stages["layer2"]["old"], stages["layer2"]["new"]) == (4, 6)
    assert stages["layer2"]["added"] == ["layer2.4", "layer2.5"] and stages["layer2"]["removed"] == []
    assert (stages["layer3"]["old"], stages["layer3"]["new"]) == (6, 4)
    assert stages["layer3"]["removed"] == ["layer3.4", "layer3.5"] and stages["layer3"]["added"] == []
    assert stages["layer2"]["block"] == "bottleneck"

    a, b = _check(cli, old), _check(cli, new)
    assert d["delta"]["params"] == b["params"] - a["params"]
    assert stages["layer2"]["added_params"] - stages["layer3"]["removed_params"] == d["delta"]["params"]
    names_a, names_b = {l["name"] for l in a["layers"]}, {l["name"] for l in b["layers"]}
    status = {l["name"]: l["status"] for l in d["layers"]}
    assert {n for n, s in status.items() if s == "added"} == names_b - names_a
    assert {n for n, s in status.items() if s == "removed"} == names_a - names_b
    assert len(names_b - names_a) == 20  # two bottlenecks of 10 layers
    # Nothing else changes: the stage after a repeat still reads its last repetition.
    assert not [l for l in d["layers"] if l["status"] not in ("added", "removed")]

    code, out, _ = cli("diff", old, new)
    assert "layer2: 4 → 6 bottleneck repetitions (added layer2.4, layer2.5" in out
    assert "layer3: 6 → 4 bottleneck repetitions (removed layer3.4, layer3.5" in out


REFORMATTED_LENET = """\
# the same LeNet, written differently: other key order, block style, other comments
train:
  loss: {kind: cross_entropy}
  optimizer:
    lr: 0.002
    kind: adam
  epochs: 20
  batch_size: 32
  eval: {metrics: [accuracy, f1]}
  schedule: {warmup: 20, kind: cosine}
  data:
    augment: {crop: {padding: 2}}
    split: {seed: 0, test: 0.2, val: 0.1}
    resize: [28, 28]
    kind: digits
  seed: 0
layers:
    - op: conv2d           # block style
      kernel_size: 5
      out_channels: 6
      name: conv1
    - op: relu
    - {kernel_size: 2, op: max_pool2d, name: pool1}
    - {op: conv2d, name: conv2, kernel_size: 5, out_channels: 16}
    - {op: relu}
    - {op: max_pool2d, name: pool2, kernel_size: 2}
    - {op: flatten}
    - {op: linear, out_features: 120, in_features: 256, name: fc1}
    - {op: relu}
    - {out_features: 10, op: linear, name: fc2}
inputs: {image: {shape: [batch, 1, 28, 28]}}
description: LeNet-like convolutional classifier for 28x28 grey images
name: lenet
lbdlc: 1
"""


def test_reordered_and_reformatted_is_no_model_change(cli, write_spec):
    new = write_spec(REFORMATTED_LENET, "lenet_reformatted.yaml")
    code, d = _diff(cli, SPECS / "lenet.yaml", new)
    assert code == 0 and d["same"], d
    assert d["layers"] == [] and d["sections"] == []
    code, out, _ = cli("diff", SPECS / "lenet.yaml", new)
    assert code == 0 and "no model changes" in out
    code, out, _ = cli("diff", SPECS / "lenet.yaml", new, "--format", "markdown")
    assert code == 0 and "No model changes" in out


def test_rename_is_not_remove_plus_add(cli, write_spec):
    text = (SPECS / "mlp.yaml").read_text()
    old = write_spec(text, "mlp.yaml")
    new = write_spec(_edit(text, r"name: fc2\b", "name: hidden"), "mlp_renamed.yaml")
    code, d = _diff(cli, old, new)
    assert code == 1
    assert [(l["status"], l["old_name"], l["name"]) for l in d["layers"]] == [("renamed", "fc2", "hidden")]
    assert d["counts"] == {"added": 0, "removed": 0, "renamed": 1, "changed": 0, "affected": 0}
    assert d["delta"]["params"] == 0
    code, out, _ = cli("diff", old, new)
    assert "renamed fc2 → hidden" in out


def test_rename_with_a_moved_layer_and_auto_names(cli, write_spec):
    """Dropping mlp's first ReLU renumbers the others (relu_2 becomes relu_1): one layer
    removed, one renamed by its place in the graph, fc2 rewired, fc1/fc3 untouched."""
    text = (SPECS / "mlp.yaml").read_text()
    old = write_spec(text, "mlp.yaml")
    new = write_spec(text.replace("  - {op: relu}\n", "", 1), "mlp_less.yaml")
    code, d = _diff(cli, old, new)
    assert code == 1
    got = {(l["status"], l["old_name"], l["name"]) for l in d["layers"]}
    assert got == {("removed", "relu_1", "relu_1"), ("renamed", "relu_2", "relu_1"), ("changed", "fc2", "fc2")}
    fc2 = _by_name(d)["fc2"]
    assert fc2["changes"]["in"] == [["relu_1"], ["fc1"]]


def test_training_section_changes(cli, write_spec):
    text = (SPECS / "lenet.yaml").read_text()
    new = write_spec(_edit(_edit(text, r"lr: 0.002", "lr: 0.001"), r"^  epochs: 20", "  epochs: 30"), "lenet.yaml")
    code, d = _diff(cli, SPECS / "lenet.yaml", new)
    assert code == 1 and d["layers"] == [] and d["delta"]["params"] == 0
    assert {(s["path"], s["old"], s["new"]) for s in d["sections"]} == {("train.optimizer.lr", 0.002, 0.001), ("train.epochs", 20, 30)}
    code, out, _ = cli("diff", SPECS / "lenet.yaml", new, "--format", "markdown")
    assert "train.optimizer.lr: 0.002 → 0.001" in out and out.startswith("### lbdlc diff")


def test_overrides_per_side(cli):
    code, d = _diff(cli, SPECS / "mlp.yaml", SPECS / "mlp.yaml", "--new-set", "fc1.out_features=30")
    assert code == 1
    fc1 = _by_name(d)["fc1"]
    assert fc1["changes"]["attrs"] == {"out_features": [25, 30]}
    assert d["delta"]["params"] == (50 * 30 + 30 + 30 * 10 + 10) - (50 * 25 + 25 + 25 * 10 + 10)
    assert _by_name(d)["fc2"]["status"] == "affected"


def test_bad_spec_is_a_located_error(cli, write_spec):
    bad = write_spec("lbdlc: 1\ninputs:\n  x: {shape: [batch, 4]}\nlayers:\n  - {op: linear, out_feature: 3}\n", "bad.yaml")
    code, out, err = cli("diff", SPECS / "mlp.yaml", bad)
    assert code == 2
    assert err.startswith(f"{bad}:5:") and "out_feature" in err and "Traceback" not in err
    code, _, err = cli("diff", SPECS / "mlp.yaml", bad.parent / "missing.yaml")
    assert code == 2 and "no such file" in err
    code, _, err = cli("diff", SPECS / "mlp.yaml", SPECS / "mlp.yaml", "--format", "html")
    assert code == 2


@pytest.mark.parametrize("spec", sorted(p.name for p in SPECS.glob("*.yaml")))
def test_every_spec_equals_itself(cli, spec):
    code, d = _diff(cli, SPECS / spec, SPECS / spec)
    assert code == 0 and d["same"]
