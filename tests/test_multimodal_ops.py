"""Ops for CLIP, Whisper, PSPNet and diffusion (quick_gelu, l2_normalize, learned_scale,
argmax, select_at, adaptive_avg_pool2d, timestep_embedding; attention's key_bias and the
sin_cos position layout): the three backends agree on tests/specs/multimodal_ops.yaml, every
output matches a reference written with torch.nn / torch.nn.functional, and mistakes are
reported at their YAML line."""
import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lbdlc.driver import BuildOptions, build
from lbdlc.lower import load, lower
from lbdlc.verify import compare, random_inputs, run_onnx, run_pytorch, run_tvm
from lbdlc.weights import initialize

from conftest import ROOT, located
from test_parity import TOLERANCE, random_weights

SPEC = ROOT / "tests" / "specs" / "multimodal_ops.yaml"


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("multimodal_weights") / "trained.safetensors"
    save_file(random_weights(SPEC), str(path))
    return path


@pytest.fixture(scope="module")
def mm_build(weights_file):
    """The file's only TVM build; every batch size and length runs on it."""
    out = weights_file.parent / "build"
    build(SPEC, out, BuildOptions(weights=weights_file))
    return out


def inputs_for(out, batch: int, seq: int, seed: int, int_high: int) -> dict[str, np.ndarray]:
    inputs = random_inputs(out, {"batch": batch, "seq": seq}, seed=seed, int_high=int_high)
    inputs["times"] = np.random.default_rng(seed).uniform(0, 1000, batch).astype(np.float32)  # diffusion-sized times
    return inputs


@pytest.mark.parametrize("batch,seq,int_high", [(1, 1, 2), (3, 5, 2), (2, 7, 1000)])
def test_backends_agree(mm_build, batch, seq, int_high):
    """int_high=2: token ids 0/1, so argmax meets ties (every backend takes the first)."""
    agreement = compare(mm_build, inputs_for(mm_build, batch, seq, seed=batch + seq, int_high=int_high))
    assert agreement.ok(TOLERANCE), agreement


def whisper_sinusoids(length: int, channels: int, max_timescale: float = 10000) -> torch.Tensor:
    """openai/whisper's model.sinusoids, as published (float32)."""
    log_timescale_increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length)[:, np.newaxis] * inv_timescales[np.newaxis, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


def get_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1.0, max_period=10000):
    """diffusers' get_timestep_embedding, with the frequencies computed in float64 and rounded
    once (diffusers computes them in float32; for t near 1000 that moves the angle by an ulp)."""
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(start=0, end=half_dim, dtype=torch.float64)
    exponent = exponent / (half_dim - downscale_freq_shift)
    emb = torch.exp(exponent).float()
    emb = timesteps[:, None].float() * emb[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half_dim:], emb[:, :half_dim]], dim=-1)
    return emb


def reference(w: dict, x, tokens, image, steps, times) -> list[torch.Tensor]:
    """multimodal_ops.yaml written by hand with torch.nn and torch.nn.functional."""
    with torch.no_grad():
        qg = x * torch.sigmoid(1.702 * x)  # OpenAI CLIP's QuickGELU
        temp = F.normalize(qg, dim=-1) * w["temp.weight"].exp()  # logits_per_image's logit_scale.exp()
        gain = F.normalize(x, dim=1, eps=1.5) * w["gain.weight"]
        at_eos = temp[torch.arange(temp.shape[0]), tokens.argmax(dim=-1)]  # CLIP's text.argmax(dim=-1)
        peak = gain.argmax(dim=1, keepdim=True)

        mha = nn.MultiheadAttention(8, 2, batch_first=True)
        zeros = torch.zeros(8)  # Whisper's k_proj has no bias: nn.MultiheadAttention with that third zeroed
        mha.load_state_dict({
            "in_proj_weight": torch.cat([w["attn.q_proj.weight"], w["attn.k_proj.weight"], w["attn.v_proj.weight"]]),
            "in_proj_bias": torch.cat([w["attn.q_proj.bias"], zeros, w["attn.v_proj.bias"]]),
            "out_proj.weight": w["attn.out_proj.weight"], "out_proj.bias": w["attn.out_proj.bias"],
        })
        attn = mha.eval()(x, x, x, need_weights=False)[0]
        pos = attn + whisper_sinusoids(32, 8)[: x.shape[1]]

        bins3 = F.adaptive_avg_pool2d(image, 3)
        bins2x6 = F.adaptive_avg_pool2d(image, (2, 6))
        temb = get_timestep_embedding(steps, 16)
        temb_flip = get_timestep_embedding(times, 10, flip_sin_to_cos=True, downscale_freq_shift=0, max_period=100)
    return [at_eos, gain, peak, pos, bins3, bins2x6, temb, temb_flip]


@pytest.mark.parametrize("runner", [run_pytorch, run_onnx, run_tvm], ids=["pytorch", "onnx", "tvm"])
def test_every_backend_matches_torch_reference(mm_build, runner):
    """An oracle that is not ours, applied to each backend separately."""
    inputs = inputs_for(mm_build, 3, 6, seed=11, int_high=1000)
    want = reference(load_file(str(mm_build / "weights.safetensors")), *(torch.from_numpy(v) for v in inputs.values()))
    got = runner(mm_build, inputs)
    assert len(got) == len(want)
    for g, r in zip(got, want):
        assert g.shape == tuple(r.shape) and g.dtype == r.numpy().dtype
        np.testing.assert_allclose(g, r.numpy(), atol=TOLERANCE, rtol=0)


def test_parameters_and_initial_values():
    graph = lower(load(SPEC))
    assert graph.params["temp.weight"].shape == () and graph.params["gain.weight"].shape == ()
    assert "attn.k_proj.bias" not in graph.params and "attn.q_proj.bias" in graph.params
    assert sum(p.numel for p in graph.params.values()) == 2 + 4 * 8 * 8 + 3 * 8
    weights = initialize(graph)
    assert weights["temp.weight"].item() == np.float32(math.log(1 / 0.07))  # CLIP's logit_scale init
    assert weights["gain.weight"].item() == 0.5
    key_free = nn.MultiheadAttention(8, 2)
    assert sum(p.numel() for p in key_free.parameters()) - 8 == 4 * 8 * 8 + 3 * 8


def test_generated_module_starts_from_the_same_values(mm_build):
    """model.py's own initialisation (LearnedScale, constant tables) equals the IR's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mm_model", mm_build / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.Model()
    assert model.temp.weight.item() == np.float32(math.log(1 / 0.07)) and model.gain.weight.item() == 0.5
    assert set(model.state_dict()) == set(load_file(str(mm_build / "weights.safetensors")))  # tables are not weights
    from lbdlc.ops.attention import sinusoidal_table
    from lbdlc.ops.multimodal import timestep_frequencies

    assert torch.equal(model.pos.pe, torch.from_numpy(sinusoidal_table(32, 8, layout="sin_cos")))
    assert torch.equal(model.temb_flip.freqs, torch.from_numpy(timestep_frequencies(5, 100.0, 0.0)))
    # Whisper's own float32 table, to float rounding
    np.testing.assert_allclose(sinusoidal_table(1500, 384, layout="sin_cos"), whisper_sinusoids(1500, 384).numpy(), atol=2e-4)


@pytest.mark.parametrize("opset", [18, 23])
def test_onnx_opsets_pass_full_check(weights_file, opset):
    """Opset 23 takes the native Attention op; its projections keep k_proj bias-free."""
    out = weights_file.parent / f"opset{opset}"
    build(SPEC, out, BuildOptions(weights=weights_file, opset=opset, backends=("pytorch", "onnx")))
    model = onnx.load(out / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert {"GatherND", "ArgMax", "AveragePool", "ReduceL2", "Sin", "Cos"} <= {n.op_type for n in model.graph.node}
    agreement = compare(out, inputs_for(out, 2, 4, seed=opset, int_high=1000), backends=("pytorch", "onnx"))
    assert agreement.ok(TOLERANCE), agreement


# -- mistakes, reported at their YAML line --------------------------------------------------


def check_fails(cli, path):
    code, out, err = cli("check", path)
    assert code == 2, (out, err)
    return err


HEAD = """\
lbdlc: 1
inputs:
  image: {shape: [batch, 4, 10, 10]}
  free: {shape: [batch, 4, h, w]}
  x: {shape: [batch, seq, 6]}
  tokens: {shape: [batch, seq], dtype: int64}
  t: {shape: [batch], dtype: int64}
layers:
"""


def test_adaptive_pool_needs_divisible_sides(cli, write_spec):
    path = write_spec(HEAD + "  - {name: p, op: adaptive_avg_pool2d, output_size: 3, in: image}\n")
    err = check_fails(cli, path)
    assert "adaptive_avg_pool2d to 3x3 needs input sides that are multiples of it, but 10 is not a multiple of 3" in located(err, path, 9, "3,")
    assert "ONNX has no adaptive pooling" in err and "(1, 2, 5, 10)" in err


def test_adaptive_pool_needs_fixed_sides(cli, write_spec):
    path = write_spec(HEAD + "  - {name: p, op: adaptive_avg_pool2d, output_size: [2, 2], in: free}\n")
    err = check_fails(cli, path)
    assert "adaptive_avg_pool2d needs a fixed height and width, got [batch, 4, h, w]" in located(err, path, 9, "adaptive_avg_pool2d")


def test_timestep_embedding_needs_an_even_width(cli, write_spec):
    path = write_spec(HEAD + "  - {name: e, op: timestep_embedding, embedding_dim: 15, in: t}\n")
    err = check_fails(cli, path)
    assert "embedding_dim=15 is odd" in located(err, path, 9, "15")


def test_timestep_embedding_shift_needs_two_frequencies(cli, write_spec):
    path = write_spec(HEAD + "  - {name: e, op: timestep_embedding, embedding_dim: 2, in: t}\n")
    err = check_fails(cli, path)
    assert "too few for downscale_freq_shift=1.0" in located(err, path, 9, "2,")


def test_learned_scale_log_needs_a_positive_scale(cli, write_spec):
    path = write_spec(HEAD + "  - {name: s, op: learned_scale, scale: 0, log: true, in: x}\n")
    err = check_fails(cli, path)
    assert "scale=0.0 has no logarithm" in located(err, path, 9, "0,")


def test_select_at_needs_integer_positions(cli, write_spec):
    path = write_spec(HEAD + "  - {name: m, op: mean, dims: [1], in: x}\n  - {name: s, op: select_at, in: [x, m]}\n")
    err = check_fails(cli, path)
    assert "select_at reads positions from an integer input [batch], got [batch, 6] float32" in located(err, path, 10, "select_at")


def test_select_at_needs_one_position_per_sample(cli, write_spec):
    path = write_spec(HEAD + "  - {name: s, op: select_at, in: [x, tokens]}\n")
    err = check_fails(cli, path)
    assert "positions [batch, seq] must be [batch] for x [batch, seq, 6]" in located(err, path, 9, "select_at")


def test_select_at_reads_floats(cli, write_spec):
    path = write_spec(HEAD + "  - {name: s, op: select_at, in: [tokens, t]}\n")
    err = check_fails(cli, path)
    assert "select_at takes floating-point tensors, got [batch, seq] int64" in located(err, path, 9, "select_at")


def test_argmax_dim_is_checked(cli, write_spec):
    path = write_spec(HEAD + "  - {name: a, op: argmax, dim: 2, in: tokens}\n")
    err = check_fails(cli, path)
    assert "dim=2 is out of range for a rank-2 tensor" in located(err, path, 9, "2,")


def test_sin_cos_positions_need_an_even_width(cli, write_spec):
    path = write_spec(HEAD.replace("seq, 6]", "seq, 5]") + "  - {name: p, op: sinusoidal_position, layout: sin_cos, in: x}\n")
    err = check_fails(cli, path)
    assert "layout sin_cos needs an even embedding_dim of at least 4" in located(err, path, 9, "sin_cos")


def test_quick_gelu_refuses_token_ids(cli, write_spec):
    path = write_spec(HEAD + "  - {name: g, op: quick_gelu, in: tokens}\n")
    err = check_fails(cli, path)
    assert "quick_gelu takes floating-point tensors" in located(err, path, 9, "quick_gelu")
