"""LoRA adapters between lbdlc and PEFT on a Hugging Face GPT-2 (runs where `peft` and
`transformers` are installed: the dev extra).

The oracle is PEFT itself: an adapter PEFT trains on `GPT2LMHeadModel`, merged with its
`merge_and_unload()`, against the same adapter imported into specs/gpt2.yaml (base weights
converted from the Hugging Face model) and merged by lbdlc's `lora_merge`; and an adapter
lbdlc writes, loaded by `PeftModel.from_pretrained` into the Hugging Face model."""
import types

import pytest
import torch
from conftest import SPECS
from lbdlc.passes import PassManager
from lbdlc.passes.lora import LoRA, LoRAMerge

from lbdlc.adapters import apply_adapter, read_tensors, save_adapter
from lbdlc.errors import SpecError
from lbdlc.backends.pytorch import generate
from lbdlc.lower import load, lower

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LAYERS, WIDTH, HEADS, VOCAB, CTX = 2, 64, 4, 100, 32
SMALL = [f"n_layer={LAYERS}", f"d_model={WIDTH}", f"n_head={HEADS}", f"vocab={VOCAB}", f"ctx={CTX}", "dropout=0.0"]
TARGETS = ["c_attn", "c_proj", "c_fc"]  # PEFT's suffix patterns: every Conv1D layer of GPT-2
# PEFT's module names -> the spec's layer names: the fused q/k/v projection c_attn becomes
# the spec's q_proj, k_proj, v_proj (same A, B split by rows), attn.c_proj its out_proj.
FROM_HF = {f"transformer.h.{i}.attn.c_attn": [f"h.{i}.attn.{p}_proj" for p in "qkv"] for i in range(LAYERS)} \
    | {f"transformer.h.{i}.attn.c_proj": f"h.{i}.attn.out_proj" for i in range(LAYERS)} | {"transformer.": ""}


def hf_gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=CTX, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def spec_weights(hf) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict under specs/gpt2.yaml's names: Conv1D weights ([in, out])
    transposed, the fused c_attn split into q/k/v, the LM head tied to wte (not stored)."""
    sd = {k.removeprefix("transformer."): v.detach().clone() for k, v in hf.state_dict().items()}
    out = {"wte.weight": sd["wte.weight"], "wpe.weight": sd["wpe.weight"], "ln_f.weight": sd["ln_f.weight"], "ln_f.bias": sd["ln_f.bias"]}
    for i in range(LAYERS):
        h = f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[f"{h}{ln}.weight"], out[f"{h}{ln}.bias"] = sd[f"{h}{ln}.weight"], sd[f"{h}{ln}.bias"]
        qkv_w, qkv_b = sd[f"{h}attn.c_attn.weight"].t(), sd[f"{h}attn.c_attn.bias"]
        for k, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{h}attn.{proj}.weight"] = qkv_w[k * WIDTH:(k + 1) * WIDTH].contiguous()
            out[f"{h}attn.{proj}.bias"] = qkv_b[k * WIDTH:(k + 1) * WIDTH]
        out[f"{h}attn.out_proj.weight"], out[f"{h}attn.out_proj.bias"] = sd[f"{h}attn.c_proj.weight"].t().contiguous(), sd[f"{h}attn.c_proj.bias"]
        for fc in ("c_fc", "c_proj"):
            out[f"{h}mlp.{fc}.weight"], out[f"{h}mlp.{fc}.bias"] = sd[f"{h}mlp.{fc}.weight"].t().contiguous(), sd[f"{h}mlp.{fc}.bias"]
    return out


def run_lbdlc(graph, weights, tokens) -> torch.Tensor:
    namespace = types.ModuleType("generated_model")
    exec(compile(generate(graph, "gpt2.yaml", None, "test"), "model.py", "exec"), namespace.__dict__)
    net = namespace.Model().eval()
    net.load_state_dict(weights)
    with torch.no_grad():
        return net(tokens)


@pytest.fixture(scope="module")
def base():
    hf = hf_gpt2()
    graph = lower(load(SPECS / "gpt2.yaml", SMALL))
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    return hf, graph, spec_weights(hf), tokens


def test_spec_runs_the_converted_hugging_face_weights(base):
    """The premise: specs/gpt2.yaml with the converted weights is GPT2LMHeadModel."""
    hf, graph, weights, tokens = base
    with torch.no_grad():
        expected = hf(tokens).logits
    assert (run_lbdlc(graph, weights, tokens) - expected).abs().max() < 1e-4


def test_peft_trained_adapter_merges_like_merge_and_unload(base, tmp_path):
    hf, graph, weights, tokens = base
    model = peft.get_peft_model(hf_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(5):  # a few real steps, so that lora_B is no longer zero
        optimizer.zero_grad()
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
    model.eval()
    assert any(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    model.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        expected = model.merge_and_unload()(tokens).logits

    res = apply_adapter(graph, weights, tmp_path / "peft", rename=FROM_HF)
    assert sorted({n.name for n in res.graph.nodes if n.op == "lora_linear"}) == sorted(
        [f"h.{i}.mlp.{fc}" for i in range(LAYERS) for fc in ("c_fc", "c_proj")]
        + [f"h.{i}.attn.{p}_proj" for i in range(LAYERS) for p in ("q", "k", "v", "out")])
    unmerged = run_lbdlc(res.graph, res.weights, tokens)
    merged = PassManager([LoRAMerge()], "inference").run(res.graph, res.weights)
    assert not any(n.op == "lora_linear" for n in merged.graph.nodes)
    assert sum(n.op == "attention" for n in merged.graph.nodes) == LAYERS  # written out for LoRA, one op again
    got = run_lbdlc(merged.graph, merged.weights, tokens)
    print(f"PEFT merge_and_unload vs lbdlc lora_merge: max diff {(got - expected).abs().max():.2e}")
    assert (got - expected).abs().max() < 1e-4
    assert (unmerged - expected).abs().max() < 1e-4


def test_lbdlc_adapter_loads_in_peft(base, tmp_path):
    hf, graph, weights, tokens = base
    res = PassManager([LoRA(targets=["h.*.mlp.c_fc", "h.*.mlp.c_proj"], r=4, alpha=16, seed=3)], "training").run(graph, weights)
    gen = torch.Generator().manual_seed(5)
    for name in res.weights:
        if ".lora_B." in name:  # as after training: B is no longer zero
            res.weights[name] = 0.1 * torch.randn(res.weights[name].shape, generator=gen)
    to_hf = {f"h.{i}.mlp.{fc}": f"transformer.h.{i}.mlp.{fc}" for i in range(LAYERS) for fc in ("c_fc", "c_proj")}
    save_adapter(res.graph, res.weights, tmp_path / "ours", task_type="CAUSAL_LM", rename=to_hf)
    expected = run_lbdlc(res.graph, res.weights, tokens)
    loaded = peft.PeftModel.from_pretrained(hf_gpt2(), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        got = loaded(tokens).logits
        merged = loaded.merge_and_unload()(tokens).logits
    print(f"lbdlc adapter in PEFT: max diff {(got - expected).abs().max():.2e}")
    assert (got - expected).abs().max() < 1e-4 and (merged - expected).abs().max() < 1e-4


def test_a_fused_projection_must_split_evenly(tmp_path):
    model = peft.get_peft_model(hf_gpt2(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0))
    model.save_pretrained(str(tmp_path / "peft"))
    bad = {"transformer.h.0.attn.c_attn": [f"h.0.part{k}" for k in range(5)], "transformer.": ""}
    with pytest.raises(SpecError, match=r"has 192 output rows, which do not split into 5 equal parts") as exc:
        read_tensors(tmp_path / "peft", bad)
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight" in str(exc.value)
