"""The encoder-decoder Transformer: torch.nn.Transformer's count, its outputs, three backends."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lbdlc.driver import BuildOptions, build
from lbdlc.verify import compare, random_inputs, run_pytorch

from conftest import SPECS

TINY = ("vocab=50", "d_model=16", "heads=4", "d_ff=24", "n_layers=2", "max_len=32")


@pytest.mark.parametrize("norm_first", ["false", "true"])
def test_layer_stacks_match_torch_nn_transformer(cli, norm_first):
    code, out, err = cli("check", SPECS / "transformer.yaml", "--json", "--set", f"norm_first={norm_first}")
    assert code == 0, err
    layers = json.loads(out)["layers"]
    stacks = sum(layer["params"] for layer in layers if layer["name"].startswith(("encoder.", "decoder.")))
    reference = torch.nn.Transformer(d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048)
    assert stacks == sum(p.numel() for p in reference.parameters()) == 44_140_544


def _torch_state(weights: dict, norm_first: bool) -> dict:
    """Our parameters under torch.nn.Transformer's names (q, k, v fused into in_proj)."""
    state = {}
    for stack, attns in (("encoder", ["self_attn"]), ("decoder", ["self_attn", "multihead_attn"])):
        for i in range(2):
            ours, theirs = f"{stack}.layers.{i}.", f"{stack}.layers.{i}."
            for attn in attns:
                for kind in ("weight", "bias"):
                    state[f"{theirs}{attn}.in_proj_{kind}"] = torch.cat([weights[f"{ours}{attn}.{p}_proj.{kind}"] for p in "qkv"])
                    state[f"{theirs}{attn}.out_proj.{kind}"] = weights[f"{ours}{attn}.out_proj.{kind}"]
            for name in ("linear1", "linear2"):
                for kind in ("weight", "bias"):
                    state[f"{theirs}{name}.{kind}"] = weights[f"{ours}{name}.{kind}"]
            for k in range(1, (4 if stack == "decoder" else 3)):
                src = f"{ours}{'pre_' if norm_first else ''}norm{k}"
                for kind in ("weight", "bias"):
                    state[f"{theirs}norm{k}.{kind}"] = weights[f"{src}.{kind}"]
        for kind in ("weight", "bias"):
            state[f"{stack}.norm.{kind}"] = weights[f"{stack}.norm.{kind}"]
    return state


@pytest.mark.parametrize("norm_first", [False, True])
def test_outputs_match_torch_nn_transformer(tmp_path, norm_first):
    out = build(SPECS / "transformer.yaml", tmp_path / "out",
                BuildOptions(backends=("pytorch",), overrides=TINY + (f"norm_first={str(norm_first).lower()}",))).out_dir
    weights = load_file(str(out / "weights.safetensors"))
    reference = torch.nn.Transformer(d_model=16, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                                     dim_feedforward=24, batch_first=True, norm_first=norm_first).eval()
    reference.load_state_dict(_torch_state(weights, norm_first))
    inputs = random_inputs(out, {"batch": 2, "src_seq": 7, "tgt_seq": 5}, int_high=50)
    src, tgt = (torch.from_numpy(inputs[k]) for k in ("src", "tgt"))
    t = torch.arange(32, dtype=torch.float64)[:, None]
    angle = t / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    pe = torch.zeros(32, 16, dtype=torch.float64)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(angle), torch.cos(angle)
    pe = pe.float()
    with torch.no_grad():
        s = torch.nn.functional.embedding(src, weights["src_embed.weight"]) + pe[:7]
        d = torch.nn.functional.embedding(tgt, weights["tgt_embed.weight"]) + pe[:5]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(5)
        y = reference(s, d, tgt_mask=mask)
        expected = torch.nn.functional.linear(y, weights["generator.weight"], weights["generator.bias"])
    np.testing.assert_allclose(run_pytorch(out, inputs)[0], expected.numpy(), atol=1e-5)


def test_tiny_transformer_backends_agree(tmp_path):
    out = build(SPECS / "transformer.yaml", tmp_path / "out", BuildOptions(overrides=TINY)).out_dir
    for sizes in ({"batch": 1, "src_seq": 3, "tgt_seq": 4}, {"batch": 2, "src_seq": 9, "tgt_seq": 2}):
        agreement = compare(out, random_inputs(out, sizes, int_high=50))
        assert agreement.ok(1e-4), agreement
