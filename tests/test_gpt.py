"""GPT-2 written with one block, a repeat and expressions; sizes change by --set alone."""
import json

import pytest

from lbdlc.driver import BuildOptions, build
from lbdlc.verify import compare, random_inputs, run_pytorch

from conftest import SPECS

MEDIUM = ("--set", "n_layer=24", "--set", "d_model=1024", "--set", "n_head=16")
TINY = ("vocab=64", "ctx=16", "n_layer=2", "d_model=32", "n_head=4")


def report(cli, *args):
    code, out, err = cli("check", SPECS / "gpt2.yaml", "--json", *args)
    assert code == 0, err
    return json.loads(out)


def test_gpt2_small_matches_hugging_face(cli):
    r = report(cli)
    assert r["params"] == 124_439_808  # HF GPT2LMHeadModel, head tied to wte (BOOK.md)
    assert r["outputs"] == [{"name": "lm_head", "shape": ["batch", "seq", 50257], "dtype": "float32"}]
    attn = next(layer for layer in r["layers"] if layer["name"] == "h.11.attn")
    assert attn["params"] == 4 * (768**2 + 768)


def test_gpt2_medium_by_override_alone(cli):
    assert report(cli, *MEDIUM)["params"] == 354_823_168  # HF gpt2-medium


@pytest.fixture(scope="module")
def tiny_gpt(tmp_path_factory):
    return build(SPECS / "gpt2.yaml", tmp_path_factory.mktemp("gpt") / "out", BuildOptions(overrides=TINY)).out_dir


@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 7), (3, 16)])
def test_tiny_gpt_backends_agree(tiny_gpt, batch, seq):
    inputs = random_inputs(tiny_gpt, {"batch": batch, "seq": seq}, seed=seq, int_high=64)
    agreement = compare(tiny_gpt, inputs)
    assert agreement.ok(1e-4), agreement


def test_tiny_gpt_is_causal(tiny_gpt):
    """Changing a later token never changes earlier logits (the causal mask works)."""
    inputs = random_inputs(tiny_gpt, {"batch": 1, "seq": 8}, int_high=64)
    before = run_pytorch(tiny_gpt, inputs)[0]
    inputs["tokens"][0, 5] = (inputs["tokens"][0, 5] + 1) % 64
    after = run_pytorch(tiny_gpt, inputs)[0]
    assert abs(after[0, :5] - before[0, :5]).max() == 0
    assert abs(after[0, 5:] - before[0, 5:]).max() > 0


def test_generated_gpt_ties_the_head(tiny_gpt):
    source = (tiny_gpt / "model.py").read_text()
    assert "F.linear(x, self.wte.weight)" in source
    assert "class MultiHeadAttention(nn.Module)" in source


def test_gpt3_is_checked_without_allocating(cli, monkeypatch):
    import lbdlc.weights

    def no_allocation(*args, **kwargs):
        raise AssertionError("check must not allocate weights")

    monkeypatch.setattr(lbdlc.weights, "initialize", no_allocation)
    code, out, err = cli("check", SPECS / "gpt3.yaml", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["params"] == 174_604_259_328  # BOOK.md, derived; "175B"
    assert next(layer for layer in r["layers"] if layer["name"] == "h.95.mlp.c_fc")["output_shape"] == ["batch", "seq", 49_152]


def test_gpt3_build_is_refused_with_the_memory_it_needs(cli, tmp_path):
    code, _, err = cli("build", SPECS / "gpt3.yaml", "-o", tmp_path / "gpt3")
    assert code == 2
    assert "building gpt3 needs about 1.9 TiB of memory for its 174,604,259,328 parameters (650.5 GiB of weights)" in err
    assert "--max-memory" in err and not (tmp_path / "gpt3").exists()
