"""Every user mistake prints file:line:col, the line with a caret, a hint, and exits 2."""
import re

import pytest

from conftest import located

MLP = """\
lbdlc: 1
inputs:
  x: {shape: [batch, 50]}
layers:
  - {name: fc1, op: linear, out_features: 25}
  - {op: relu}
  - {name: fc2, op: linear, out_features: 2}
"""


def check_fails(cli, path):
    code, out, err = cli("check", path)
    assert code == 2, (out, err)
    return err


def test_valid_spec_passes(cli, write_spec):
    code, out, _ = cli("check", write_spec(MLP))
    assert code == 0 and "1,327 parameters" in out  # 50*25+25 + 25*2+2


def test_yaml_syntax_error(cli, write_spec):
    path = write_spec(MLP.replace("{name: fc2, op: linear, out_features: 2}", "{name: fc2, op: linear, out_features: 2"))
    err = check_fails(cli, path)
    # The parser notices the missing brace at the end of the file.
    assert err.startswith(f"{path}:8:1: error: YAML syntax error"), err


def test_duplicate_key(cli, write_spec):
    path = write_spec(MLP.replace("out_features: 25}", "out_features: 25, out_features: 30}"))
    err = check_fails(cli, path)
    assert "duplicate key 'out_features'" in located(err, path, 5, "out_features: 30")


def test_unknown_key_with_did_you_mean(cli, write_spec):
    path = write_spec(MLP.replace("out_features: 25", "out_featurs: 25"))
    err = check_fails(cli, path)
    first = located(err, path, 5, "out_featurs")
    assert "unknown key 'out_featurs' in layer 'fc1' (linear)" in first
    assert "hint: did you mean 'out_features'?" in err


def test_unknown_top_level_key(cli, write_spec):
    path = write_spec(MLP + "layerz: []\n")
    err = check_fails(cli, path)
    assert "unknown key 'layerz'" in located(err, path, 8, "layerz")
    assert "did you mean 'layers'?" in err


def test_wrong_type(cli, write_spec):
    path = write_spec(MLP.replace("out_features: 25", "out_features: many"))
    err = check_fails(cli, path)
    first = located(err, path, 5, "many")
    assert "out_features" in first and "'many'" in first


def test_negative_size(cli, write_spec):
    path = write_spec(MLP.replace("out_features: 25", "out_features: -3"))
    err = check_fails(cli, path)
    assert "greater than 0" in located(err, path, 5, "-3")


def test_unknown_op(cli, write_spec):
    path = write_spec(MLP.replace("op: relu", "op: rleu"))
    err = check_fails(cli, path)
    assert "unknown op 'rleu'" in located(err, path, 6, "rleu")
    assert "did you mean 'relu'?" in err


def test_missing_op(cli, write_spec):
    path = write_spec(MLP.replace("{op: relu}", "{name: act}"))
    err = check_fails(cli, path)
    assert "a layer needs an `op` key" in located(err, path, 6, "{name: act}")


def test_missing_required_attribute(cli, write_spec):
    path = write_spec(MLP.replace("{name: fc2, op: linear, out_features: 2}", "{name: fc2, op: linear}"))
    err = check_fails(cli, path)
    assert "missing required key 'out_features' in layer 'fc2' (linear)" in located(err, path, 7, "{name: fc2")


def test_reference_to_missing_layer(cli, write_spec):
    path = write_spec(MLP.replace("{op: relu}", "{op: relu, in: fc_1}"))
    err = check_fails(cli, path)
    assert "no layer or input named 'fc_1'" in located(err, path, 6, "fc_1")
    assert "did you mean 'fc1'?" in err


def test_forward_reference_is_allowed(cli, write_spec):
    path = write_spec(MLP.replace("{name: fc2, op: linear, out_features: 2}", "{name: fc2, op: linear, out_features: 2, in: act}")
                      .replace("{op: relu}", "{name: act, op: relu, in: fc1}") + "outputs: [fc2]\n")
    code, out, err = cli("check", path)
    assert code == 0, err


def test_cycle(cli, write_spec):
    path = write_spec(MLP.replace("{op: relu}", "{op: relu, in: fc2}"))
    err = check_fails(cli, path)
    assert "the layers form a cycle: fc2 -> relu_1 -> fc2" in located(err, path, 6, "fc2")
    assert "7:5: note: 'fc2' reads 'relu_1'" in err


def test_shape_mismatch_names_both_shapes(cli, write_spec):
    path = write_spec(MLP.replace("{name: fc2, op: linear, out_features: 2}", "{name: fc2, op: linear, in_features: 30, out_features: 2}"))
    err = check_fails(cli, path)
    first = located(err, path, 7, "30")
    assert "linear layer 'fc2': in_features is 30, but the incoming tensor [batch, 25] has 25 in its last dim" in first
    # The note points at the layer that produced the incoming tensor.
    assert re.search(r":6:5: note: input 'relu_1' has shape \[batch, 25\]", err), err
    assert "hint: set in_features: 25, or leave it out to infer it" in err


def test_conv_window_too_large(cli, write_spec):
    path = write_spec(
        "lbdlc: 1\ninputs:\n  image: {shape: [batch, 1, 4, 4]}\nlayers:\n  - {op: conv2d, out_channels: 2, kernel_size: 7}\n"
    )
    err = check_fails(cli, path)
    assert "does not fit an input of size 4" in located(err, path, 5, "7")


def test_missing_version(cli, write_spec):
    path = write_spec(MLP.replace("lbdlc: 1\n", ""))
    err = check_fails(cli, path)
    assert "language version" in located(err, path, 1, "")


def test_future_version_refused(cli, write_spec):
    path = write_spec(MLP.replace("lbdlc: 1", "lbdlc: 7"))
    err = check_fails(cli, path)
    assert "unsupported spec language version 7" in located(err, path, 1, "7")


def test_duplicate_layer_name(cli, write_spec):
    path = write_spec(MLP.replace("name: fc2", "name: fc1"))
    err = check_fails(cli, path)
    assert "the name 'fc1' is already used" in located(err, path, 7, "fc1")


def test_unused_input_warns_and_strict_refuses(cli, write_spec):
    path = write_spec(MLP.replace("  x: {shape: [batch, 50]}", "  x: {shape: [batch, 50]}\n  mask: {shape: [batch, 50]}"))
    code, _, err = cli("check", path)
    assert code == 0 and f"{path}:4:3: warning: input 'mask' is never used" in err
    code, _, err = cli("check", path, "--strict")
    assert code == 2
    assert "input 'mask' is never used" in located(err, path, 4, "mask")


def test_unused_layer_warns(cli, write_spec):
    path = write_spec(MLP + "  - {name: dead, op: relu, in: fc1}\n" + "outputs: [fc2]\n")
    code, _, err = cli("check", path)
    assert code == 0 and f"{path}:8:5: warning: the output of layer 'dead' is never used" in err


def test_several_errors_reported_together(cli, write_spec):
    path = write_spec(MLP.replace("out_features: 25", "out_featurs: 25").replace("op: relu", "op: rleu"))
    err = check_fails(cli, path)
    assert "unknown key 'out_featurs'" in err and "unknown op 'rleu'" in err and "2 errors" in err


def test_missing_file(cli, tmp_path):
    code, _, err = cli("check", tmp_path / "nope.yaml")
    assert code == 2 and "no such file" in err and "Traceback" not in err


@pytest.mark.parametrize("text", ["", "- just\n- a list\n"])
def test_not_a_mapping(cli, write_spec, text):
    err = check_fails(cli, write_spec(text))
    assert "error:" in err


def test_integer_input_into_a_float_op(cli, write_spec):
    path = write_spec(MLP.replace("x: {shape: [batch, 50]}", "x: {shape: [batch, 50], dtype: int64}"))
    err = check_fails(cli, path)
    assert "linear takes floating-point tensors, got [batch, 50] int64" in located(err, path, 5, "linear")
    assert "op: embedding" in err


def test_matmul_inner_sizes_disagree(cli, write_spec):
    path = write_spec(MLP + "  - {name: prod, op: matmul, in: [fc1, fc2]}\noutputs: [prod]\n")
    path.write_text(path.read_text().replace("x: {shape: [batch, 50]}", "x: {shape: [batch, 3, 50]}"))
    err = check_fails(cli, path)
    assert "matmul needs the inner sizes to agree: [batch, 3, 25] @ [batch, 3, 2] (25 vs 3)" in located(err, path, 8, "matmul")


def test_mean_over_a_dimension_twice(cli, write_spec):
    path = write_spec(MLP + "  - {name: avg, op: mean, dims: [1, -1]}\n")
    err = check_fails(cli, path)
    assert "dims [1, -1] name a dimension twice" in located(err, path, 8, "[1, -1]")
