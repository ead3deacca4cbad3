"""Every pass on real specs (specs/*.yaml at a small size): the outputs before and after agree
(max abs diff <= 1e-5 in fp32, in ONNX Runtime and in the generated PyTorch module), and the
pass changed the graph as expected (node and parameter counts, the rewrites it logged)."""
import functools

import pytest
import torch

from lbdlc.passes import LEVELS, PassManager

from conftest import SPECS, perturbed_weights
from passes_util import TOLERANCE, before_after, inputs_for, spec_graph

RESNET = ("inputs.image.shape=[batch, 3, 64, 64]", "classes=10")
MOBILENET = ("inputs.image.shape=[batch, 3, 32, 32]", "classes=10")
GPT = ("vocab=64", "ctx=16", "n_layer=2", "d_model=32", "n_head=4")
VIT = ("image_size=32", "patch=8", "n_layer=2", "d_model=32", "n_head=4", "d_mlp=64", "classes=10")
S2S = ("src_vocab=30", "tgt_vocab=20", "emb=8", "enc_hidden=6")
UNET = ("image_size=16", "ch=32", "groups=8")
CLIP = ("image_size=32", "patch=8", "vision_layers=2", "vision_width=16", "vision_heads=2", "vocab=64", "context=8",
        "text_layers=2", "text_width=16", "text_heads=2", "embed_dim=8")
SIZES = {"batch": 2, "seq": 6, "src_len": 5, "tgt_len": 4}


@functools.lru_cache(maxsize=None)
def case(spec, overrides=()):
    """(graph, weights, inputs), shared by the tests: passes never modify what they are given."""
    return fresh_case(spec, overrides)


def fresh_case(spec, overrides=()):
    path = SPECS / f"{spec}.yaml"
    graph = spec_graph(path, overrides)
    return graph, perturbed_weights(path, overrides), inputs_for(graph, SIZES)


def ops_of(graph):
    out = {}
    for n in graph.nodes:
        out[n.op] = out.get(n.op, 0) + 1
    return out


def params_of(graph):
    return sum(p.numel for p in graph.params.values() if not p.buffer)


@pytest.mark.parametrize("backend", ["onnx", "pytorch"])
def test_remove_dropout_gpt2(backend):
    graph, w, x = case("gpt2", GPT)
    result, diff = before_after(graph, w, ["remove_dropout"], x, backend)
    assert diff <= TOLERANCE
    assert ops_of(graph)["dropout"] == 5 and "dropout" not in ops_of(result.graph)  # 1 + 2 per block
    assert len(result.graph.nodes) == len(graph.nodes) - 5
    assert result.log[0].changes == {"dropout removed": 5}


def test_remove_dropout_takes_the_vae_mean_and_drops_what_only_the_variance_needed():
    graph, w, x = case("vae", ("outputs=[recon_logits]",))
    result, diff = before_after(graph, w, ["remove_dropout"], x)
    assert diff <= TOLERANCE
    assert "reparameterize" not in ops_of(result.graph)
    assert "logvar" not in {n.name for n in result.graph.nodes}  # read only by reparameterize
    assert len(result.graph.nodes) == len(graph.nodes) - 2
    assert params_of(graph) - params_of(result.graph) == 400 * 20 + 20  # the logvar layer's parameters
    assert set(result.weights) == set(result.graph.params)


def test_remove_dropout_is_refused_where_the_graph_trains():
    graph, _, _ = case("gpt2", GPT)
    with pytest.raises(Exception, match="remove_dropout.*inference-only"):
        PassManager(["remove_dropout"], mode="training").run(graph)


@pytest.mark.parametrize("backend", ["onnx", "pytorch"])
def test_remove_identities_vit_dropout_zero(backend):
    """ViT-B/16 is written with dropout 0.0: those layers are identities even while training."""
    graph, w, x = case("vit_b16", VIT)
    result, diff = before_after(graph, w, ["remove_identities"], x, backend, mode="training")
    assert diff <= TOLERANCE
    assert ops_of(graph)["dropout"] == 7 and "dropout" not in ops_of(result.graph)  # 1 + 3 per block
    assert result.log[0].changes == {"identity dropout removed": 7}


def test_remove_identities_keeps_real_dropout():
    graph, _, _ = case("gpt2", GPT)  # dropout 0.1
    result = PassManager(["remove_identities"], mode="training").run(graph)
    assert len(result.graph.nodes) == len(graph.nodes)


def test_eliminate_common_subexpressions_unet():
    """Each residual block of the diffusion U-Net applies SiLU to the same time embedding."""
    graph, w, x = case("diffusion_unet", UNET)
    result, diff = before_after(graph, w, ["eliminate_common_subexpressions"], x)
    assert diff <= TOLERANCE
    assert result.log[0].changes == {"duplicate silu merged": 5}
    assert len(result.graph.nodes) == len(graph.nodes) - 5


def test_eliminate_dead_code_vit_features():
    """ViT built as a feature extractor (output: the class token): the head is dead."""
    graph, w, x = case("vit_b16", VIT + ("outputs=[cls]",))
    result, diff = before_after(graph, w, ["eliminate_dead_code"], x)
    assert diff <= TOLERANCE
    assert "head" not in {n.name for n in result.graph.nodes}
    assert len(result.graph.nodes) == len(graph.nodes) - 1
    assert params_of(graph) - params_of(result.graph) == 32 * 10 + 10
    assert "head.weight" not in result.weights


def test_fold_constants_clip_temperature():
    graph, w, x = case("clip", CLIP)
    result, diff = before_after(graph, w, ["fold_constants"], x)
    assert diff <= TOLERANCE
    scale = next(n for n in result.graph.nodes if n.op == "learned_scale")
    assert not scale.attrs.log
    name = scale.params["weight"]
    assert torch.allclose(result.weights[name], w[name].exp())
    assert len(result.graph.nodes) == len(graph.nodes) and result.log[0].changes == {"exp(log-scale) folded": 1}


@pytest.mark.parametrize("spec,overrides,folded", [("resnet50", RESNET, 53), ("mobilenet_v2", MOBILENET, 52)])
@pytest.mark.parametrize("backend", ["onnx", "pytorch"])
def test_fold_batch_norm(spec, overrides, folded, backend):
    graph, w, x = case(spec, overrides)
    result, diff = before_after(graph, w, ["fold_batch_norm"], x, backend)
    assert diff <= TOLERANCE
    assert ops_of(graph)["batch_norm"] == folded and "batch_norm" not in ops_of(result.graph)
    assert len(result.graph.nodes) == len(graph.nodes) - folded
    log = result.log[0]
    assert log.changes == {"batch_norm folded into the layer before it": folded}
    assert log.bytes_after < log.bytes_before
    # Only the batch norms' parameters go; each folded layer keeps its names and has a bias.
    bn = {n.name for n in graph.nodes if n.op == "batch_norm"}
    assert {p.rsplit(".", 1)[0] for p in set(graph.params) - set(result.graph.params)} == bn
    layers = {n.name for n in graph.nodes if n.op == "conv2d"}
    assert {p.rsplit(".", 1)[0] for p in set(result.graph.params) - set(graph.params)} <= layers
    assert all(f"{n.name}.bias" in n.params.values() for n in result.graph.nodes if n.op == "conv2d" and n.outputs[0].name in bn)
    assert set(result.weights) == set(result.graph.params)


def test_fold_batch_norm_keeps_a_shared_parameter():
    """A tied (shared) conv weight must not be rewritten for one of its users."""
    graph, w, x = fresh_case("resnet50", RESNET)
    from dataclasses import replace

    # A second reader of the stem's weight (as `tie:` makes one): folding must leave the stem alone.
    conv = next(n for n in graph.nodes if n.name == "conv1")
    twin = replace(conv, name="twin", outputs=[type(conv.outputs[0])("twin", conv.outputs[0].type)])
    graph.nodes.insert(graph.nodes.index(conv) + 1, twin)
    graph.outputs = graph.outputs + twin.outputs
    result = PassManager(["fold_batch_norm"]).run(graph, w)
    assert result.log[0].changes == {"batch_norm folded into the layer before it": 52}
    assert torch.equal(result.weights["conv1.weight"], w["conv1.weight"])


@pytest.mark.parametrize("backend", ["onnx", "pytorch"])
def test_fuse_conv_activation_resnet50(backend):
    graph, w, x = case("resnet50", RESNET)
    folded = PassManager(["fold_batch_norm"]).run(graph, w)
    result, diff = before_after(folded.graph, folded.weights, ["fuse_conv_activation"], x, backend)
    assert diff <= TOLERANCE
    assert result.log[0].changes == {"conv2d + activation fused": 49, "conv2d + residual add fused": 16}
    assert len(result.graph.nodes) == len(folded.graph.nodes) - 65
    ops = ops_of(result.graph)
    assert ops["fused_conv2d"] == 49 and ops["conv2d"] == 4 and "relu" not in ops and "add" not in ops  # 4: projection shortcuts
    last = next(n for n in result.graph.nodes if n.name == "layer1.0.conv3")
    assert last.attrs.activation == "relu" and len(last.inputs) == 2  # relu(conv3(x) + shortcut)


@pytest.mark.parametrize("backend", ["onnx", "pytorch"])
def test_fuse_linear_activation_gpt2(backend):
    graph, w, x = case("gpt2", GPT)
    clean = PassManager(["remove_dropout"]).run(graph, w)
    result, diff = before_after(clean.graph, clean.weights, ["fuse_linear_activation"], x, backend)
    assert diff <= TOLERANCE
    assert result.log[0].changes == {"linear + activation fused": 2, "linear + residual add fused": 2}
    fc = next(n for n in result.graph.nodes if n.name == "h.0.mlp.c_fc")
    proj = next(n for n in result.graph.nodes if n.name == "h.0.mlp.c_proj")
    assert (fc.op, fc.attrs.activation) == ("fused_linear", "gelu_tanh")
    assert proj.op == "fused_linear" and len(proj.inputs) == 2  # + the residual stream
    assert "lm_head" in {n.name for n in result.graph.nodes if n.op == "linear"}  # tied weight: left as it is


def test_fused_gpt2_code_keeps_its_block_class():
    """The fused nodes keep their names inside `h.<i>`, so the generated code still has one Block class and a loop."""
    from lbdlc.backends.pytorch import generate

    graph, w, _ = case("gpt2", GPT)
    result = PassManager(LEVELS[2]).run(graph, w)
    source = generate(result.graph, "gpt2.yaml", None, "test")
    assert "class Block(nn.Module)" in source and "for block in self.h:" in source
    assert "h = F.gelu(self.mlp.c_fc(h), approximate='tanh')" in source
    assert "h = self.mlp.c_proj(h) + res_1" in source


@pytest.mark.parametrize("backend", ["onnx", "pytorch"])
@pytest.mark.parametrize("mode", ["inference", "training"])
def test_fuse_attention_seq2seq(backend, mode):
    """Luong attention of the GRU seq2seq: matmul (transpose_b), softmax, matmul -> one SDPA, scale 1."""
    graph, w, x = case("gru_seq2seq", S2S)
    result, diff = before_after(graph, w, ["fuse_attention"], x, backend, mode=mode)
    assert diff <= TOLERANCE
    assert result.log[0].changes == {"matmul-softmax-matmul fused": 1}
    ops = ops_of(result.graph)
    assert "matmul" not in ops and "softmax" not in ops and ops["scaled_dot_product_attention"] == 1
    assert len(result.graph.nodes) == len(graph.nodes) - 2
    att = next(n for n in result.graph.nodes if n.op == "scaled_dot_product_attention")
    assert att.name == "context" and att.attrs.scale == 1.0


@pytest.mark.parametrize("level,nodes", [(0, 175), (1, 175), (2, 57), (3, 57)])
def test_levels_resnet50(level, nodes):
    """-O0 and -O1 change no number (ResNet-50 has nothing for -O1 to clean up); -O2 folds and fuses."""
    graph, w, x = case("resnet50", RESNET)
    result, diff = before_after(graph, w, LEVELS[level], x)
    assert len(result.graph.nodes) == nodes
    assert diff == 0.0 if level < 2 else diff <= TOLERANCE


def test_level1_changes_no_number_gpt2():
    graph, w, x = case("gpt2", GPT)
    result, diff = before_after(graph, w, LEVELS[1], x)
    assert diff == 0.0 and len(result.graph.nodes) == len(graph.nodes) - 5
