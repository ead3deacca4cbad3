"""`lbdlc fmt`: canonical, idempotent, keeps every comment, never changes the model."""
import json
import re
import shutil
from collections import Counter

import pytest
import yaml

from conftest import ROOT, SPECS
from lbdlc.fmt import format_text
from lbdlc.source import load_yaml_text

ALL_SPECS = sorted(SPECS.glob("*.yaml")) + sorted((ROOT / "tests" / "specs").glob("*.yaml"))


def _comments(text: str) -> Counter:
    """Comments found line by line, independently of lbdlc.fmt (no spec has '#' in a string)."""
    found = Counter()
    for line in text.splitlines():
        m = re.search(r"(?:^|\s)(#.*)$", line)
        if m:
            found[m.group(1).rstrip()] += 1
    return found


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_idempotent_and_keeps_every_comment(spec):
    text = spec.read_text()
    once = format_text(text, str(spec))
    assert format_text(once, str(spec)) == once
    assert _comments(once) == _comments(text)
    assert load_yaml_text(once, "formatted") == load_yaml_text(text, str(spec))  # same data
    assert "\t" not in once and once.endswith("\n") and not once.endswith("\n\n")


def _without_lines(report: dict) -> dict:
    return {**report, "layers": [{k: v for k, v in layer.items() if k != "line"} for layer in report["layers"]]}


def test_formatting_specs_changes_no_model(cli, tmp_path):
    """fmt over a copy of specs/: `check --json` gives the same report for every spec (line
    numbers aside, where a layer moved to block style) and `lbdlc diff` finds no change."""
    copy = tmp_path / "specs"
    shutil.copytree(SPECS, copy)
    code, _, err = cli("fmt", copy)
    assert code == 0, err
    for spec in sorted(SPECS.glob("*.yaml")):
        code, before, err = cli("check", spec, "--json")
        assert code == 0, err
        code, after, err = cli("check", copy / spec.name, "--json")
        assert code == 0, err
        a, b = json.loads(before), json.loads(after)
        chain = [spec.name] + ([yaml.safe_load(spec.read_text())["extends"]] if "extends:" in spec.read_text() else [])
        same_lines = all(len((SPECS / f).read_text().splitlines()) == len((copy / f).read_text().splitlines()) for f in chain)
        assert (a == b) if same_lines else (_without_lines(a) == _without_lines(b)), spec.name
        code, out, err = cli("diff", spec, copy / spec.name)
        assert code == 0 and "no model changes" in out, (spec.name, out, err)
    code, _, _ = cli("fmt", "--check", copy)
    assert code == 0


MESSY = """\
# header comment

# second header
layers:
    # first layer
    -   op: linear     # the op
        out_features: 25
        name: fc1
    - {op: relu}
    - {name: fc2,
       op: linear,   # inside flow
       out_features: 10}
    # before group
    - name: grp
      layers:
        - {op: relu}   # eol
        # full before fc3
        - {out_features: 2, in: relu_1, name: fc3, op: linear}


inputs:
    x:
        shape: [batch, 50]   # shape comment
name: mlp
lbdlc: 1   # version
description: |
    a multi-line
      description
train:
    seed: 0
    optimizer:
        kind: adam
        lr: 0.002
    data: {kind: digits, resize: [28, 28], flatten: true, split: {val: 0.1, test: 0.2, seed: 0}, augment: {crop: {padding: 2}}}
# trailing
"""

MESSY_FORMATTED = """\
# header comment

# second header
lbdlc: 1   # version
name: mlp
description: |
  a multi-line
    description

inputs:
  x: {shape: [batch, 50]}   # shape comment
layers:
  # first layer
  - {name: fc1, op: linear, out_features: 25}     # the op
  - {op: relu}
  - {name: fc2, op: linear, out_features: 10}   # inside flow
  # before group
  - name: grp
    layers:
      - {op: relu}     # eol
      # full before fc3
      - {name: fc3, op: linear, out_features: 2, in: relu_1}
train:
  seed: 0
  optimizer: {kind: adam, lr: 0.002}
  data:
    kind: digits
    resize: [28, 28]
    flatten: true
    split: {val: 0.1, test: 0.2, seed: 0}
    augment: {crop: {padding: 2}}
# trailing
"""


def test_canonical_layout():
    """Key order, 2-space indent, one-line layers, short mappings in flow style, long ones in
    block style, comments where they were, blank lines collapsed."""
    assert format_text(MESSY, "messy.yaml") == MESSY_FORMATTED
    assert format_text(MESSY_FORMATTED, "messy.yaml") == MESSY_FORMATTED
    assert _comments(MESSY_FORMATTED) == _comments(MESSY)


def test_deployment_finetune_and_quantize_sections_go_in_their_place():
    """deploy:, quantize:, compile: and finetune: have fixed places after train:, whatever the order written."""
    text = ("deploy:\n  targets: [x86, {name: pi, preset: arm64}]\nlbdlc: 1\nquantize: {format: q8_0}\n"
            "inputs:\n  x: {shape: [batch, 4]}\nfinetune:\n  lora: {r: 4}\ncompile: {opt_level: 2}\n"
            "layers:\n  - {name: fc, op: linear, out_features: 3}\n")
    formatted = format_text(text, "t.yaml")
    assert formatted == ("lbdlc: 1\ninputs:\n  x: {shape: [batch, 4]}\nlayers:\n  - {name: fc, op: linear, out_features: 3}\n"
                         "finetune:\n  lora: {r: 4}\ncompile:\n  opt_level: 2\nquantize:\n  format: q8_0\n"
                         "deploy:\n  targets: [x86, {name: pi, preset: arm64}]\n")
    assert format_text(formatted, "t.yaml") == formatted


def test_long_layers_with_nested_mappings_go_block_style():
    text = ("lbdlc: 1\ninputs:\n  x: {shape: [batch, 4]}\nlayers:\n"
            "  - {name: fc, op: linear, out_features: 3, init: {weight: {kind: normal, std: 0.02}, bias: {kind: zeros}}}  # c\n"
            "  - {name: head, op: linear, out_features: 3, bias: false, tie: {weight: fc.weight}, in: x}\n")
    assert format_text(text, "t.yaml") == (
        "lbdlc: 1\ninputs:\n  x: {shape: [batch, 4]}\nlayers:\n"
        "  - name: fc  # c\n    op: linear\n    out_features: 3\n    init: {weight: {kind: normal, std: 0.02}, bias: {kind: zeros}}\n"
        "  - {name: head, op: linear, out_features: 3, bias: false, tie: {weight: fc.weight}, in: x}\n")


def test_cli_check_write_and_skip(cli, tmp_path):
    messy = tmp_path / "messy.yaml"
    messy.write_text(MESSY)
    other = tmp_path / "config.yaml"
    other.write_text("key:   value\nlist: [1,2]\n")  # not a spec: never touched
    code, _, err = cli("fmt", "--check", messy, other)
    assert code == 1 and f"would reformat {messy}" in err
    assert messy.read_text() == MESSY
    code, out, err = cli("fmt", "--diff", messy)
    assert code == 1 and "+  - {name: fc1, op: linear, out_features: 25}" in out and messy.read_text() == MESSY
    code, _, err = cli("fmt", tmp_path)
    assert code == 0 and f"reformatted {messy}" in err
    assert messy.read_text() == MESSY_FORMATTED
    assert other.read_text() == "key:   value\nlist: [1,2]\n"
    code, _, _ = cli("fmt", "--check", tmp_path)
    assert code == 0


def test_errors_and_refusals(cli, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("lbdlc: 1\nlayers:\n  - {op: relu\n")
    code, _, err = cli("fmt", broken)
    assert code == 2 and err.startswith(f"{broken}:") and "YAML syntax error" in err and "Traceback" not in err
    anchors = tmp_path / "anchors.yaml"
    text = "lbdlc: 1\nvars: &v {a: 1}\nother: *v\n"
    anchors.write_text(text)
    code, _, err = cli("fmt", anchors)
    assert code == 0 and "anchors" in err and anchors.read_text() == text
    code, _, err = cli("fmt", tmp_path / "missing.yaml")
    assert code == 2 and "no such file" in err


def test_pre_commit_hooks_file():
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    by_id = {h["id"]: h for h in hooks}
    assert by_id["lbdlc-fmt"]["entry"] == "lbdlc fmt"
    assert by_id["lbdlc-fmt-check"]["entry"] == "lbdlc fmt --check"
    for h in hooks:
        assert h["language"] == "python" and h["types"] == ["yaml"] and h["name"]


@pytest.mark.parametrize("spec", ["resnet50.yaml", "gpt2.yaml", "lenet.yaml", "whisper_tiny.yaml"])
@pytest.mark.parametrize("flow", [False, True])
def test_any_layout_of_a_spec_formats_to_the_same_model(cli, tmp_path, spec, flow):
    """The spec as PyYAML writes it (all block or all flow style, keys sorted, 4-space indent,
    long scalars folded over lines): `${...}` plain scalars get quoted where flow style needs
    it, and the result is idempotent and builds the same model."""
    data = yaml.safe_load((SPECS / spec).read_text())
    if "extends" in data:
        pytest.skip("extends")
    text = yaml.safe_dump(data, default_flow_style=flow, sort_keys=True, width=40, indent=4)
    once = format_text(text, spec)
    assert format_text(once, spec) == once
    assert once.splitlines()[0] == "lbdlc: 1"
    path = tmp_path / spec
    path.write_text(once)
    code, out, err = cli("diff", SPECS / spec, path)
    assert code == 0 and "no model changes" in out, err


def test_repository_specs_are_formatted(cli):
    """CI: every spec in specs/ is in the canonical layout (run `lbdlc fmt specs` to fix)."""
    code, _, err = cli("fmt", "--check", SPECS)
    assert code == 0, err
