"""BERT-base and ViT-B/16: reference parameter counts, and three-backend parity at tiny size."""
import json

import pytest

from lbdlc.driver import BuildOptions, build
from lbdlc.verify import compare, random_inputs

from conftest import SPECS

TINY = {
    "bert": ("vocab=50", "max_positions=16", "n_layer=2", "d_model=16", "n_head=4", "d_ff=32"),
    "vit_b16": ("image_size=32", "patch=8", "n_layer=2", "d_model=16", "n_head=4", "d_mlp=32", "classes=10"),
}


@pytest.mark.parametrize("spec,params", [("bert", 109_482_240), ("vit_b16", 86_567_656)])
def test_reference_counts(cli, spec, params):
    code, out, err = cli("check", SPECS / f"{spec}.yaml", "--json")
    assert code == 0, err
    assert json.loads(out)["params"] == params  # HF BertModel with pooler; torchvision vit_b_16


def test_vit_patch_grid(cli):
    layers = {l["name"]: l for l in json.loads(cli("check", SPECS / "vit_b16.yaml", "--json")[1])["layers"]}
    assert layers["tokens"]["output_shape"] == ["batch", 196, 768]  # 14 x 14 patches of 16 x 16
    assert layers["class_token"]["output_shape"] == ["batch", 197, 768]


@pytest.mark.parametrize("spec,sizes", [
    ("bert", [{"batch": 1, "seq": 3}, {"batch": 2, "seq": 16}]),
    ("vit_b16", [{"batch": 1}, {"batch": 3}]),
])
def test_tiny_backends_agree(tmp_path, spec, sizes):
    out = build(SPECS / f"{spec}.yaml", tmp_path / "out", BuildOptions(overrides=TINY[spec])).out_dir
    for s in sizes:
        inputs = random_inputs(out, s, seed=s["batch"], int_high=2)  # token ids and segment ids in range
        agreement = compare(out, inputs)
        assert agreement.ok(1e-4), agreement
