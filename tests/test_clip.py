"""CLIP ViT-B/32: OpenAI's parameter count, output shapes, three-backend parity at a tiny
size, and the tiny model against a transcription of OpenAI's CLIP forward pass written with
torch.nn.MultiheadAttention."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lbdlc.driver import BuildOptions, build
from lbdlc.verify import compare, random_inputs, run_pytorch

from conftest import SPECS, perturbed_weights

SPEC = SPECS / "clip.yaml"
TINY = ("image_size=32", "patch=8", "vision_layers=2", "vision_width=16", "vision_heads=2", "vocab=64",
        "context=16", "text_layers=2", "text_width=24", "text_heads=3", "embed_dim=8")
VOCAB = 64


def report(cli, *args):
    code, out, err = cli("check", SPEC, "--json", *args)
    assert code == 0, err
    return json.loads(out)


def test_clip_vit_b32_matches_openai_count(cli):
    r = report(cli)
    assert r["params"] == 151_277_313  # OpenAI CLIP ViT-B/32, logit_scale included
    assert r["outputs"] == [{"name": "logits_per_image", "shape": ["batch", "batch"], "dtype": "float32"},
                            {"name": "logits_per_text", "shape": ["batch", "batch"], "dtype": "float32"}]
    layers = {layer["name"]: layer for layer in r["layers"]}
    assert layers["visual.class_embedding"]["output_shape"] == ["batch", 50, 768]  # 7 x 7 patches + class token
    assert layers["visual.proj"]["output_shape"] == ["batch", 512]
    assert layers["eos_features"]["output_shape"] == ["batch", 512]
    assert layers["logits_per_image"]["params"] == 1
    # The towers by formula: conv 3·32²·768, class token, 50 positions, ln_pre/ln_post, 12 blocks
    # of 12·768² + 13·768, projection; text: embeddings, 77 positions, 12 blocks, ln_final, projection.
    block = lambda d: 12 * d * d + 13 * d  # noqa: E731 (attention 4(d² + d), MLP 8d² + 5d, two LayerNorms 4d)
    visual = 3 * 32 * 32 * 768 + 768 + 50 * 768 + 2 * 1536 + 12 * block(768) + 768 * 512
    text = 49408 * 512 + 77 * 512 + 12 * block(512) + 1024 + 512 * 512
    assert visual == 87_849_216 and visual + text + 1 == 151_277_313


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clip")
    save_file(perturbed_weights(SPEC, TINY), str(tmp / "w.safetensors"))
    return build(SPEC, tmp / "out", BuildOptions(weights=tmp / "w.safetensors", overrides=TINY)).out_dir


@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 7), (3, 16)])
def test_tiny_clip_backends_agree(tiny_clip, batch, seq):
    inputs = random_inputs(tiny_clip, {"batch": batch, "seq": seq}, seed=batch + seq, int_high=VOCAB)
    agreement = compare(tiny_clip, inputs)
    assert agreement.ok(1e-4), agreement


def openai_clip(w: dict, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """logits_per_image of OpenAI's clip/model.py (VisionTransformer, the text Transformer,
    encode_text's text.argmax(dim=-1), logit_scale.exp()), at the tiny size, on our weights."""

    def block(x, prefix, heads, mask):
        d = x.shape[-1]
        attn = nn.MultiheadAttention(d, heads, batch_first=True)
        attn.load_state_dict({
            "in_proj_weight": torch.cat([w[f"{prefix}.attn.{p}_proj.weight"] for p in "qkv"]),
            "in_proj_bias": torch.cat([w[f"{prefix}.attn.{p}_proj.bias"] for p in "qkv"]),
            "out_proj.weight": w[f"{prefix}.attn.out_proj.weight"], "out_proj.bias": w[f"{prefix}.attn.out_proj.bias"],
        })
        ln = lambda t, name: F.layer_norm(t, (d,), w[f"{prefix}.{name}.weight"], w[f"{prefix}.{name}.bias"])  # noqa: E731
        h = ln(x, "ln_1")
        x = x + attn.eval()(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.linear(ln(x, "ln_2"), w[f"{prefix}.mlp.c_fc.weight"], w[f"{prefix}.mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        return x + F.linear(h, w[f"{prefix}.mlp.c_proj.weight"], w[f"{prefix}.mlp.c_proj.bias"])

    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"])

    with torch.no_grad():
        x = F.conv2d(image, w["visual.conv1.weight"], stride=8)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = w["visual.class_embedding.token"].reshape(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + w["visual.positional_embedding.weight"]
        x = ln(x, "visual.ln_pre")
        for i in range(2):
            x = block(x, f"visual.transformer.resblocks.{i}", 2, None)
        image_features = F.linear(ln(x[:, 0, :], "visual.ln_post"), w["visual.proj.weight"])

        seq = text.shape[1]
        mask = torch.full((seq, seq), float("-inf")).triu_(1)  # OpenAI's build_attention_mask
        x = w["token_embedding.weight"][text] + w["positional_embedding.weight"][:seq]
        for i in range(2):
            x = block(x, f"transformer.resblocks.{i}", 3, mask)
        x = ln(x, "ln_final")
        text_features = F.linear(x[torch.arange(x.shape[0]), text.argmax(dim=-1)], w["text_projection.weight"])

        image_features = image_features / image_features.norm(dim=1, keepdim=True)
        text_features = text_features / text_features.norm(dim=1, keepdim=True)
        return w["logits_per_image.weight"].exp() * image_features @ text_features.t()


def test_tiny_clip_matches_openai_forward(tiny_clip):
    inputs = random_inputs(tiny_clip, {"batch": 3, "seq": 9}, seed=5, int_high=VOCAB)
    want = openai_clip(load_file(str(tiny_clip / "weights.safetensors")), *(torch.from_numpy(v) for v in inputs.values()))
    logits_per_image, logits_per_text = run_pytorch(tiny_clip, inputs)
    np.testing.assert_allclose(logits_per_image, want.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(logits_per_text, logits_per_image.T)


def test_initial_temperature_bounds_the_logits(tmp_path):
    """With the initial logit_scale ln(1/0.07), logits are cosine similarities times 1/0.07."""
    out = build(SPEC, tmp_path / "out", BuildOptions(overrides=TINY, backends=("pytorch",))).out_dir
    assert load_file(str(out / "weights.safetensors"))["logits_per_image.weight"].item() == np.float32(math.log(1 / 0.07))
    logits, _ = run_pytorch(out, random_inputs(out, {"batch": 4, "seq": 6}, int_high=VOCAB))
    assert logits.shape == (4, 4) and np.abs(logits).max() <= 1 / 0.07 + 1e-4


def test_text_is_read_at_the_eos_token(tiny_clip):
    """Tokens after the EOS (the largest id) change nothing (causal tower, read at EOS);
    tokens before it do."""
    inputs = random_inputs(tiny_clip, {"batch": 2, "seq": 8}, seed=3, int_high=VOCAB - 1)
    inputs["text"][:, 4] = VOCAB - 1  # the EOS token at position 4
    before = run_pytorch(tiny_clip, inputs)[0]
    after_eos = {**inputs, "text": inputs["text"].copy()}
    after_eos["text"][:, 6] = (after_eos["text"][:, 6] + 1) % (VOCAB - 1)
    assert np.array_equal(run_pytorch(tiny_clip, after_eos)[0], before)
    before_eos = {**inputs, "text": inputs["text"].copy()}
    before_eos["text"][:, 2] = (before_eos["text"][:, 2] + 1) % (VOCAB - 1)
    assert np.abs(run_pytorch(tiny_clip, before_eos)[0] - before).max() > 1e-3
