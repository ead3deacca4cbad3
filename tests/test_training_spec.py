"""The `train:` section: schema, expansion, overrides, and located errors for every mistake
that needs the graph (issue [4/10]). Nothing here trains; see test_training_options.py and
test_training_runs.py."""
import json

import pytest

from conftest import located

BASE = """\
lbdlc: 1
vars: {lr0: 0.01, hidden: 16}
inputs:
  x: {shape: [batch, 12]}
layers:
  - {name: fc1, op: linear, out_features: "${hidden}"}
  - {name: norm, op: layer_norm}
  - {op: relu}
  - {name: cls, op: linear, out_features: 3}
  - {name: reg, op: linear, in: relu_1, out_features: 2}
outputs: [cls, reg]
train:
  data: {kind: synthetic, samples: 256}
  batch_size: 32
  steps: 20
  losses:
    - {kind: cross_entropy, output: cls}
    - {kind: mse, output: reg, weight: 0.5}
  optimizer: {kind: adam, lr: "${lr0 * 2}"}
  schedule: {kind: cosine, warmup: 5}
  eval: {metrics: [accuracy]}
"""


def fails(cli, path, *args):
    code, out, err = cli("check", path, *args)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    return err


def spec_with(write_spec, old: str, new: str, text: str = BASE):
    assert old in text, old
    return write_spec(text.replace(old, new, 1))


def test_valid_protocol_checks_and_expands_expressions(cli, write_spec):
    path = write_spec(BASE)
    code, out, err = cli("check", path)
    assert code == 0, err
    code, shown, err = cli("show", path)
    assert code == 0, err
    train_line = next(line for line in shown.splitlines() if line.startswith("train:"))
    assert "lr: 0.02" in train_line  # ${lr0 * 2}, evaluated with the spec's vars
    assert "kind: cosine" in train_line and "warmup: 5" in train_line


def test_resolved_spec_round_trips_the_protocol(cli, write_spec, tmp_path):
    from lbdlc.lower import load

    path = write_spec(BASE)
    code, shown, _ = cli("show", path)
    flat = tmp_path / "flat.yaml"
    flat.write_text(shown)
    assert load(path).spec.train == load(flat).spec.train


def test_overrides_reach_the_protocol(cli, write_spec, tmp_path):
    from lbdlc.lower import load

    path = write_spec(BASE)
    spec = load(path, ["train.optimizer.lr=0.5", "train.optimizer.betas=[0.8, 0.9]", "train.steps=7"]).spec
    assert spec.train.optimizer.lr == 0.5 and spec.train.optimizer.betas == (0.8, 0.9) and spec.train.steps == 7
    code, _, err = cli("check", path, "--set", "train.optimizer.betaz=[0.8, 0.9]")
    assert code == 2 and "no key 'betaz' to override" in err and "did you mean 'betas'?" in err


def test_build_writes_train_py_into_the_manifest(cli, write_spec, tmp_path):
    path = write_spec(BASE)
    code, out, err = cli("build", path, "-o", tmp_path / "out", "-b", "pytorch")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "train.py" in manifest["artifacts"]
    assert manifest["resolved_spec"]["train"]["optimizer"] == {
        "kind": "adam", "lr": 0.02, "l2": 0.0, "no_decay": [], "groups": [], "betas": [0.9, 0.999], "eps": 1e-8, "amsgrad": False}
    assert "LR = 0.02  # spec.yaml:19" in (tmp_path / "out" / "train.py").read_text()


def test_spec_without_train_builds_no_train_py(cli, write_spec, tmp_path):
    path = write_spec(BASE.split("train:")[0])
    code, _, err = cli("build", path, "-o", tmp_path / "out", "-b", "pytorch")
    assert code == 0, err
    assert not (tmp_path / "out" / "train.py").exists()


# -- the schema ----------------------------------------------------------------------------


def test_unknown_option_with_did_you_mean(cli, write_spec):
    path = spec_with(write_spec, "{kind: cross_entropy, output: cls}", "{kind: cross_entropy, output: cls, labl_smoothing: 0.1}")
    err = fails(cli, path)
    assert "unknown key 'labl_smoothing' in `train.losses.0`" in located(err, path, 17, "labl_smoothing")
    assert "did you mean 'label_smoothing'?" in err


def test_unknown_kinds(cli, write_spec):
    path = spec_with(write_spec, "kind: adam,", "kind: adamm,")
    err = fails(cli, path)
    assert "unknown optimizer kind 'adamm'" in located(err, path, 19, "adamm")
    assert "did you mean 'adam'?" in err
    path = spec_with(write_spec, "kind: mse,", "kind: msee,")
    assert "unknown loss kind 'msee'" in located(fails(cli, path), path, 18, "msee")
    path = spec_with(write_spec, "kind: synthetic", "kind: mnist")
    err = fails(cli, path)
    assert "unknown data source kind 'mnist'" in located(err, path, 13, "mnist")
    assert "digits" in err  # the kinds are listed


def test_missing_kind(cli, write_spec):
    path = spec_with(write_spec, "{kind: cosine, warmup: 5}", "{warmup: 5}")
    err = fails(cli, path)
    assert "`train.schedule` needs a `kind`" in located(err, path, 20, "{warmup")
    assert "constant, step, exponential, cosine, linear" in err


def test_weight_decay_is_decoupled_and_only_for_adamw(cli, write_spec):
    path = spec_with(write_spec, 'lr: "${lr0 * 2}"}', 'lr: 0.1, weight_decay: 0.01}')
    err = fails(cli, path)
    assert "unknown key 'weight_decay'" in located(err, path, 19, "weight_decay")
    assert "`l2: ...` for an L2 penalty" in err and "adamw" in err


def test_values_out_of_range(cli, write_spec):
    path = spec_with(write_spec, "{kind: cross_entropy, output: cls}", "{kind: cross_entropy, output: cls, label_smoothing: 1.5}")
    err = fails(cli, path)
    assert "label_smoothing: input should be less than 1, got 1.5" in located(err, path, 17, "1.5")
    path = spec_with(write_spec, "batch_size: 32", "batch_size: 0")
    assert "batch_size: input should be greater than 0, got 0" in located(fails(cli, path), path, 14, "0")


def test_missing_required_key(cli, write_spec):
    path = spec_with(write_spec, "  batch_size: 32\n", "")
    err = fails(cli, path)
    assert "missing required key 'batch_size' in `train`" in located(err, path, 13, "data")


def test_section_that_is_not_a_mapping(cli, write_spec):
    path = spec_with(write_spec, "eval: {metrics: [accuracy]}", "eval: [accuracy]")
    assert "`train.eval` is a mapping of options" in located(fails(cli, path), path, 21, "[accuracy]")


def test_expression_errors_are_located_in_train(cli, write_spec):
    path = spec_with(write_spec, '"${lr0 * 2}"', '"${lr00 * 2}"')
    err = fails(cli, path)
    assert "lr00" in err and err.startswith(f"{path}:19:")


# -- checks against the graph --------------------------------------------------------------


def test_length_of_the_run(cli, write_spec):
    path = spec_with(write_spec, "  steps: 20\n", "")
    err = fails(cli, path)
    assert "does not say how long to train" in located(err, path, 13, "data")
    path = spec_with(write_spec, "  steps: 20\n", "  steps: 20\n  epochs: 2\n")
    assert "`epochs` and `steps` both set" in located(fails(cli, path), path, 15, "steps")


def test_loss_and_losses(cli, write_spec):
    path = spec_with(write_spec, "  schedule:", "  loss: {kind: mse, output: reg}\n  schedule:")
    err = fails(cli, path)
    assert "`loss` and `losses` both set" in located(err, path, 16, "losses")


def test_loss_output_must_be_a_model_output(cli, write_spec):
    path = spec_with(write_spec, "output: reg,", "output: regg,")
    err = fails(cli, path)
    assert "the loss reads 'regg', which is not an output of the model" in located(err, path, 18, "regg")
    assert "did you mean 'reg'?" in err
    path = spec_with(write_spec, "output: reg,", "output: fc1,")
    err = fails(cli, path)
    assert "'fc1', which is not an output" in located(err, path, 18, "fc1")
    assert "list it under `outputs:`" in err


def test_several_outputs_need_loss_outputs(cli, write_spec):
    path = spec_with(write_spec, "{kind: mse, output: reg, weight: 0.5}", "{kind: mse, weight: 0.5}")
    err = fails(cli, path)
    assert "the model has 2 outputs; say which one this loss is for" in located(err, path, 18, "{kind: mse")
    assert "cls, reg" in err


def test_class_and_value_targets_on_one_output_conflict(cli, write_spec):
    path = spec_with(write_spec, "{kind: mse, output: reg, weight: 0.5}", "{kind: mse, output: cls, weight: 0.5}")
    err = fails(cli, path)
    assert "mse and cross_entropy both read 'cls' but need different targets" in located(err, path, 18, "mse")


def test_next_token_needs_token_input(cli, write_spec):
    path = spec_with(write_spec, "{kind: cross_entropy, output: cls}", "{kind: next_token, output: cls}")
    err = fails(cli, path)
    assert "next_token reads logits [batch, seq, vocab]" in located(err, path, 17, "next_token")


def test_digits_shape_must_fit_the_input(cli, write_spec):
    digits = BASE.replace("kind: synthetic, samples: 256", "kind: digits").replace(
        "    - {kind: mse, output: reg, weight: 0.5}\n", "").replace("outputs: [cls, reg]", "outputs: [cls]").replace(
        "out_features: 3}", "out_features: 10}").replace("  - {name: reg, op: linear, in: relu_1, out_features: 2}\n", "")
    path = write_spec(digits)
    err = fails(cli, path)
    assert "the digits data gives samples of shape [1, 8, 8], but input 'x' is [batch, 12]" in located(err, path, 12, "digits}")
    assert "flatten: true" in err
    path = write_spec(digits.replace("[batch, 12]", "[batch, 1, 28, 28]").replace("kind: digits", "kind: digits, resize: [28, 27]"))
    err = fails(cli, path)
    assert "gives samples of shape [1, 28, 27]" in located(err, path, 12, "[28, 27]")
    assert "write `resize: [28, 28]`" in err
    path = write_spec(digits.replace("[batch, 12]", "[batch, 64]").replace("kind: digits", "kind: digits, flatten: true"))
    assert cli("check", path)[0] == 0
    path = write_spec(digits.replace("[batch, 12]", "[batch, 64]").replace("kind: digits", "kind: digits, flatten: true").replace(
        "out_features: 10}", "out_features: 5}"))
    assert "the digits labels are classes 0-9" in located(fails(cli, path), path, 12, "digits,")


def test_synthetic_data_needs_sizes_of_symbolic_dims(cli, write_spec):
    path = spec_with(write_spec, "[batch, 12]", "[batch, seq, 12]")
    err = fails(cli, path)
    assert "input 'x' has the symbolic dimension 'seq'; give its size" in located(err, path, 13, "{kind: synthetic")
    assert "sizes: {seq: 16}" in err
    path = spec_with(write_spec, "samples: 256}", "samples: 256, sizes: {sq: 4}}")
    err = fails(cli, path)
    assert "'sq' is not a symbolic dimension of the inputs" in located(err, path, 13, "sq")


def test_text_data_fits_a_language_model(cli, write_spec):
    lm = """\
lbdlc: 1
inputs:
  tokens: {shape: [batch, seq], dtype: int64}
layers:
  - {name: wte, op: embedding, num_embeddings: 100, embedding_dim: 8}
  - {name: wpe, op: position_embedding, max_positions: 16}
  - {name: head, op: linear, out_features: 100}
train:
  data: {kind: text, path: corpus.txt, seq_len: 16, tokenizer: byte}
  batch_size: 4
  steps: 2
  loss: {kind: next_token}
  optimizer: {kind: sgd, lr: 0.1}
"""
    path = write_spec(lm)
    err = fails(cli, path)
    assert "the byte tokenizer gives ids 0-255, but the embedding of 'tokens' has 100 entries" in located(err, path, 9, "byte")
    path = write_spec(lm.replace("tokenizer: byte", "tokenizer: char").replace("seq_len: 16", "seq_len: 32"))
    err = fails(cli, path)
    assert "seq_len 32 is longer than the 16 positions of layer 'wpe'" in located(err, path, 9, "32")
    path = write_spec(lm.replace("tokenizer: byte", "tokenizer: char").replace("{kind: next_token}", "{kind: mse}"))
    assert "text data gives token windows only" in located(fails(cli, path), path, 9, "text")


def test_no_decay_needs_decay_and_matching_parameters(cli, write_spec):
    path = spec_with(write_spec, 'lr: "${lr0 * 2}"}', 'lr: 0.1, no_decay: [biases]}')
    err = fails(cli, path)
    assert "`no_decay` has no effect: nothing sets weight_decay or l2" in located(err, path, 19, "no_decay")
    path = spec_with(write_spec, 'lr: "${lr0 * 2}"}', 'lr: 0.1, l2: 0.01, no_decay: [biases, "fc9.*"]}')
    err = fails(cli, path)
    assert "'fc9.*' matches no parameter of the model" in located(err, path, 19, 'fc9.*')
    path = spec_with(write_spec, 'lr: "${lr0 * 2}"}', 'lr: 0.1, l2: 0.01, no_decay: [embeddings]}')
    err = fails(cli, path)
    assert "'embeddings' matches no parameter" in located(err, path, 19, "embeddings")
    assert "the model has no embedding parameters" in err


def test_group_patterns_and_decoupled_decay_in_groups(cli, write_spec):
    path = spec_with(write_spec, 'lr: "${lr0 * 2}"}', 'lr: 0.1, groups: [{params: ["reg.*"], weight_decay: 0.1}]}')
    err = fails(cli, path)
    assert "adam has no decoupled weight decay" in located(err, path, 19, "weight_decay")


def test_nesterov_needs_momentum(cli, write_spec):
    path = spec_with(write_spec, '{kind: adam, lr: "${lr0 * 2}"}', "{kind: sgd, lr: 0.1, nesterov: true}")
    assert "nesterov momentum needs `momentum` > 0" in located(fails(cli, path), path, 19, "true")


def test_metrics_fit_the_loss(cli, write_spec):
    path = spec_with(write_spec, "eval: {metrics: [accuracy]}", "eval: {metrics: [accuracy], output: reg}")
    err = fails(cli, path)
    assert "accuracy needs class targets; 'reg' is trained with mse" in located(err, path, 21, "accuracy")
    path = spec_with(write_spec, "eval: {metrics: [accuracy]}", "eval: {metrics: [mse]}")
    assert "mse compares values" in located(fails(cli, path), path, 21, "mse")


def test_early_stopping_watches_a_computed_metric(cli, write_spec):
    path = spec_with(write_spec, "eval: {metrics: [accuracy]}", "eval: {metrics: [accuracy]}\n  early_stopping: {metric: f1}")
    err = fails(cli, path)
    assert "early stopping watches 'f1', which `eval.metrics` does not compute" in located(err, path, 22, "f1")


def test_accumulation_must_divide_the_batch(cli, write_spec):
    path = spec_with(write_spec, "batch_size: 32", "batch_size: 32\n  grad_accumulation: 5")
    assert "grad_accumulation 5 does not divide batch_size 32" in located(fails(cli, path), path, 15, "5")


def test_warmup_shorter_than_the_run(cli, write_spec):
    path = spec_with(write_spec, "warmup: 5", "warmup: 20")
    assert "warmup of 20 steps is not shorter than the run (20 steps)" in located(fails(cli, path), path, 20, "20")


def test_lbdlc_train_needs_a_protocol(cli, write_spec, tmp_path):
    path = write_spec(BASE.split("train:")[0])
    code, _, err = cli("train", path, "-o", tmp_path / "out")
    assert code == 2
    assert "has no `train:` section" in err and "docs/training.md" in err


def test_lbdlc_train_refuses_missing_data_files(cli, write_spec, tmp_path):
    path = spec_with(write_spec, "{kind: synthetic, samples: 256}", "{kind: npz, path: nowhere.npz}")
    code, _, err = cli("train", path, "-o", tmp_path / "out")
    assert code == 2
    assert "no such data file" in located(err, path, 13, "nowhere.npz")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ["train: 3\n", "train: {data: {kind: digits}, batch_size: 1, epochs: 1, loss: {kind: nll}, optimizer: {kind: sgd}}\n"])
def test_malformed_sections_never_trace_back(cli, write_spec, text):
    path = write_spec(BASE.split("train:")[0] + text)
    err = fails(cli, path)
    assert err.startswith(f"{path}:")


def test_json_schema_describes_the_protocol(cli):
    import jsonschema
    import yaml

    from conftest import ROOT, SPECS

    code, out, _ = cli("schema")
    schema = json.loads(out)
    validator = jsonschema.Draft202012Validator(schema)
    for path in (SPECS / "lenet.yaml", ROOT / "tests" / "specs" / "gpt_tiny_train.yaml"):
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text()))), path
    spec = yaml.safe_load(BASE)
    assert not list(validator.iter_errors(spec))  # expressions (`lr: "${lr0 * 2}"`) are accepted
    spec["train"]["optimizer"]["lrr"] = 0.1
    assert list(validator.iter_errors(spec))
    assert "label_smoothing" in schema["$defs"]["TrainCrossEntropyLoss"]["properties"]


def test_vae_and_clip_outputs_are_checked(cli, write_spec):
    from conftest import SPECS

    head = f"lbdlc: 1\nextends: {(SPECS / 'vae.yaml').as_posix()}\ntrain:\n  data: {{kind: digits, resize: [28, 28]}}\n  batch_size: 8\n  steps: 2\n"
    path = write_spec(head + "  loss: {kind: vae, output: recon_logits, mu: muu, logvar: logvar}\n  optimizer: {kind: sgd, lr: 0.1}\n")
    err = fails(cli, path)
    assert "vae: 'muu' is not an output of the model" in located(err, path, 7, "muu")
    assert "did you mean 'mu'?" in err
    path = write_spec(head + "  loss: {kind: vae, output: mu, mu: mu, logvar: logvar}\n  optimizer: {kind: sgd, lr: 0.1}\n")
    assert "does not have the shape of input 'image'" in located(fails(cli, path), path, 7, "mu,")
    path = write_spec(head + "  loss: {kind: clip, output: mu}\n  optimizer: {kind: sgd, lr: 0.1}\n")
    assert "clip reads a [batch, batch] matrix of pair logits" in located(fails(cli, path), path, 7, "clip")
    path = write_spec(head + "  loss: {kind: vae, output: recon_logits, mu: mu, logvar: logvar}\n  optimizer: {kind: sgd, lr: 0.1}\n"
                      "  eval: {metrics: [mse]}\n")
    assert "metrics compare an output with its targets" in located(fails(cli, path), path, 9, "[mse]")


def test_the_documented_example_is_valid(cli, tmp_path):
    from conftest import ROOT

    doc = (ROOT / "docs" / "training.md").read_text()
    example = doc.split("## A complete example", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "lenet.yaml"
    path.write_text(example)
    code, _, err = cli("build", path, "-o", tmp_path / "out", "-b", "pytorch")
    assert code == 0, err
    source = (tmp_path / "out" / "train.py").read_text()
    for constant in ("CLIP_GRAD_NORM = 1.0", "EVAL_EVERY = 100", "PATIENCE = 3", "CHECKPOINT_EVERY = 200", 'NO_DECAY = ("*.bias",)'):
        assert constant in source, constant
