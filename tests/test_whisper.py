"""Whisper tiny: OpenAI's and Hugging Face's parameter counts, output shapes, three-backend
parity at a tiny size, and the tiny model against a transcription of OpenAI's Whisper
forward pass (model.py: AudioEncoder, TextDecoder) written with torch.nn."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lbdlc.driver import BuildOptions, build
from lbdlc.verify import compare, random_inputs, run_pytorch

from conftest import SPECS, perturbed_weights

SPEC = SPECS / "whisper_tiny.yaml"
TINY = ("n_mels=8", "n_audio_ctx=10", "n_text_ctx=16", "vocab=64", "d_model=24", "heads=3",
        "encoder_layers=2", "decoder_layers=2")
VOCAB, D, HEADS = 64, 24, 3


def test_whisper_tiny_matches_openai_and_hugging_face_counts(cli):
    code, out, err = cli("check", SPEC, "--json")
    assert code == 0, err
    r = json.loads(out)
    # OpenAI's whisper tiny keeps the encoder's sinusoidal table as a buffer, as here;
    # Hugging Face's WhisperForConditionalGeneration stores it as a frozen 1500 x 384 embedding.
    assert r["params"] == 37_184_640 == 37_760_640 - 1500 * 384
    assert r["outputs"] == [{"name": "proj_out", "shape": ["batch", "seq", 51865], "dtype": "float32"}]
    layers = {layer["name"]: layer for layer in r["layers"]}
    assert layers["encoder.conv2"]["output_shape"] == ["batch", 384, 1500]  # 3000 mel frames, stride 2
    assert layers["encoder.layer_norm"]["output_shape"] == ["batch", 1500, 384]
    assert layers["decoder.layers.3.encoder_attn"]["output_shape"] == ["batch", "seq", 384]
    # Attention without k_proj's bias: 4·384² + 3·384.
    assert layers["encoder.layers.0.self_attn"]["params"] == 4 * 384**2 + 3 * 384
    # By formula: convs, 4 encoder layers, LN; embeddings, 448 positions, 4 decoder layers, LN
    # (the output head is tied to decoder.embed_tokens: no parameters of its own).
    attn, mlp, ln = 4 * 384**2 + 3 * 384, 2 * 384 * 1536 + 1536 + 384, 2 * 384
    encoder = (80 * 3 * 384 + 384) + (384 * 3 * 384 + 384) + 4 * (attn + mlp + 2 * ln) + ln
    decoder = 51865 * 384 + 448 * 384 + 4 * (2 * attn + mlp + 3 * ln) + ln
    assert encoder + decoder == 37_184_640


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whisper")
    save_file(perturbed_weights(SPEC, TINY), str(tmp / "w.safetensors"))
    return build(SPEC, tmp / "out", BuildOptions(weights=tmp / "w.safetensors", overrides=TINY)).out_dir


@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 5), (3, 16)])
def test_tiny_whisper_backends_agree(tiny_whisper, batch, seq):
    inputs = random_inputs(tiny_whisper, {"batch": batch, "seq": seq}, seed=batch + seq, int_high=VOCAB)
    agreement = compare(tiny_whisper, inputs)
    assert agreement.ok(1e-4), agreement


def sinusoids(length, channels, max_timescale=10000):
    """openai/whisper's model.sinusoids."""
    log_timescale_increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length)[:, np.newaxis] * inv_timescales[np.newaxis, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


def openai_whisper(w: dict, mel: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """OpenAI's AudioEncoder + TextDecoder (ResidualAttentionBlock: attn_ln, attn, cross_attn_ln,
    cross_attn, mlp_ln, mlp; key without bias; logits = x @ token_embedding.weight.T), at the
    tiny size, on our weights (Hugging Face's names)."""

    def attention(prefix, q_src, kv_src, mask=None):
        mha = nn.MultiheadAttention(D, HEADS, batch_first=True)
        mha.load_state_dict({
            "in_proj_weight": torch.cat([w[f"{prefix}.{p}_proj.weight"] for p in "qkv"]),
            "in_proj_bias": torch.cat([w[f"{prefix}.q_proj.bias"], torch.zeros(D), w[f"{prefix}.v_proj.bias"]]),
            "out_proj.weight": w[f"{prefix}.out_proj.weight"], "out_proj.bias": w[f"{prefix}.out_proj.bias"],
        })
        return mha.eval()(q_src, kv_src, kv_src, need_weights=False, attn_mask=mask)[0]

    def ln(x, name):
        return F.layer_norm(x, (D,), w[f"{name}.weight"], w[f"{name}.bias"])

    def mlp(x, prefix):
        h = F.gelu(F.linear(ln(x, f"{prefix}.final_layer_norm"), w[f"{prefix}.fc1.weight"], w[f"{prefix}.fc1.bias"]))
        return x + F.linear(h, w[f"{prefix}.fc2.weight"], w[f"{prefix}.fc2.bias"])

    with torch.no_grad():
        x = F.gelu(F.conv1d(mel, w["encoder.conv1.weight"], w["encoder.conv1.bias"], padding=1))
        x = F.gelu(F.conv1d(x, w["encoder.conv2.weight"], w["encoder.conv2.bias"], stride=2, padding=1))
        x = x.permute(0, 2, 1)
        assert x.shape[1:] == (10, D)  # OpenAI asserts the full audio context
        x = x + sinusoids(10, D)
        for i in range(2):
            p = f"encoder.layers.{i}"
            h = ln(x, f"{p}.self_attn_layer_norm")
            x = mlp(x + attention(f"{p}.self_attn", h, h), p)
        audio = ln(x, "encoder.layer_norm")

        seq = tokens.shape[1]
        mask = torch.empty(seq, seq).fill_(-np.inf).triu_(1)
        x = w["decoder.embed_tokens.weight"][tokens] + w["decoder.embed_positions.weight"][:seq]
        for i in range(2):
            p = f"decoder.layers.{i}"
            h = ln(x, f"{p}.self_attn_layer_norm")
            x = x + attention(f"{p}.self_attn", h, h, mask)
            x = x + attention(f"{p}.encoder_attn", ln(x, f"{p}.encoder_attn_layer_norm"), audio)
            x = mlp(x, p)
        x = ln(x, "decoder.layer_norm")
        return x @ w["decoder.embed_tokens.weight"].T


def test_tiny_whisper_matches_openai_forward(tiny_whisper):
    inputs = random_inputs(tiny_whisper, {"batch": 2, "seq": 7}, seed=9, int_high=VOCAB)
    want = openai_whisper(load_file(str(tiny_whisper / "weights.safetensors")), *(torch.from_numpy(v) for v in inputs.values()))
    (logits,) = run_pytorch(tiny_whisper, inputs)
    assert logits.shape == (2, 7, VOCAB)
    np.testing.assert_allclose(logits, want.numpy(), atol=1e-4, rtol=0)


def test_tiny_whisper_decoder_is_causal_and_listens(tiny_whisper):
    inputs = random_inputs(tiny_whisper, {"batch": 1, "seq": 8}, seed=4, int_high=VOCAB)
    before = run_pytorch(tiny_whisper, inputs)[0]
    later = {**inputs, "tokens": inputs["tokens"].copy()}
    later["tokens"][0, 5] = (later["tokens"][0, 5] + 1) % VOCAB
    after = run_pytorch(tiny_whisper, later)[0]
    assert np.array_equal(after[0, :5], before[0, :5]) and np.abs(after[0, 5:] - before[0, 5:]).max() > 0
    louder = {**inputs, "mel": inputs["mel"] * 2}
    assert np.abs(run_pytorch(tiny_whisper, louder)[0] - before).max() > 1e-3  # every position hears the audio


def test_generated_whisper_reads_like_code(tiny_whisper):
    source = (tiny_whisper / "model.py").read_text()
    assert "key_bias=False" in source and "layout='sin_cos'" in source
    assert "F.linear(x, self.decoder.embed_tokens.weight)" in source  # the tied output head
