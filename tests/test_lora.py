"""LoRA: the lora_linear op in the three backends, the `lora` pass (exact at step 0) and
`lora_merge` (the base model's parameters and ops; outputs of the unmerged model)."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lbdlc.passes import PassManager
from lbdlc.passes.lora import LoRA, LoRAMerge, lora_scale
from safetensors.torch import save_file
from test_parity import TOLERANCE

from lbdlc.driver import BuildOptions, build
from lbdlc.errors import SpecError
from lbdlc.lower import load, lower
from lbdlc.verify import compare, random_inputs, run_pytorch
from lbdlc.weights import initialize

ROOT = Path(__file__).resolve().parent.parent
OPS_SPEC = ROOT / "tests" / "specs" / "lora_ops.yaml"
GPT2 = ROOT / "specs" / "gpt2.yaml"
SMALL = ["n_layer=2", "d_model=64", "n_head=4", "vocab=100", "ctx=32"]


def _random_b(weights, seed=1, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    for k in weights:
        if k.endswith("lora_B.weight"):
            weights[k] = torch.randn(weights[k].shape, generator=g) * scale
    return weights


@pytest.fixture(scope="module")
def ops_build(tmp_path_factory):
    """lora_ops.yaml with random (non-zero) B: PyTorch and ONNX (TVM: the slow test below)."""
    out = tmp_path_factory.mktemp("lora_ops")
    weights = _random_b(initialize(lower(load(OPS_SPEC)), seed=3))
    save_file(weights, str(out / "w.safetensors"))
    build(OPS_SPEC, out / "build", BuildOptions(backends=("pytorch", "onnx"), weights=out / "w.safetensors"))
    return out / "build", weights


@pytest.mark.slow  # the module's only TVM build (~10 s with the default CPU schedules)
def test_lora_linear_in_tvm(ops_build, tmp_path):
    out, _ = ops_build
    tvm_out = build(OPS_SPEC, tmp_path / "tvm", BuildOptions(backends=("pytorch", "tvm"), weights=out.parent / "w.safetensors")).out_dir
    agreement = compare(tvm_out, random_inputs(tvm_out, {"batch": 3, "seq": 4}), ("pytorch", "tvm"))
    assert agreement.ok(TOLERANCE), agreement.max_abs_diff


def test_lora_linear_backends_agree_with_reference(ops_build):
    out, w = ops_build
    inputs = random_inputs(out, {"batch": 3, "seq": 4})
    agreement = compare(out, inputs, ("pytorch", "onnx"))
    assert agreement.ok(TOLERANCE), agreement.max_abs_diff
    x, xs = (torch.from_numpy(v) for v in inputs.values())
    ref_a = F.linear(x, w["a.weight"], w["a.bias"]) + 0.5 * F.linear(F.linear(x, w["a.lora_A.weight"]), w["a.lora_B.weight"])
    ref_b = F.linear(xs, w["b.weight"]) + 2.0 * (xs @ w["b.lora_A.weight"].T @ w["b.lora_B.weight"].T)
    got = run_pytorch(out, inputs)
    assert np.abs(got[0] - ref_a.numpy()).max() < 1e-5
    assert np.abs(got[1] - ref_b.numpy()).max() < 1e-5
    # the adapter really contributes (B is non-zero): the base alone differs
    assert np.abs(got[0] - F.linear(x, w["a.weight"], w["a.bias"]).numpy()).max() > 1e-2


def test_lora_linear_parameters_and_names():
    g = lower(load(OPS_SPEC))
    assert {k: tuple(p.shape) for k, p in g.params.items()} == {
        "a.weight": (5, 12), "a.bias": (5,), "a.lora_A.weight": (3, 12), "a.lora_B.weight": (5, 3),
        "b.weight": (7, 10), "b.lora_A.weight": (2, 10), "b.lora_B.weight": (7, 2)}
    assert sum(p.numel for p in g.params.values()) == 5 * 12 + 5 + 3 * 12 + 5 * 3 + 7 * 10 + 2 * 10 + 7 * 2 == 220


def test_generated_module_freezes_the_base(ops_build):
    import importlib.util

    out, _ = ops_build
    spec = importlib.util.spec_from_file_location("_lora_model_check", out / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (out / "model.py").read_text()
    assert "class LoRALinear(nn.Module)" in text and "LoRALinear(12, 5, r=3, scale=0.5)" in text
    model = module.Model()
    trainable = sorted(k for k, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["a.lora_A.weight", "a.lora_B.weight", "b.lora_A.weight", "b.lora_B.weight"]
    assert sorted(model.state_dict()) == sorted(lower(load(OPS_SPEC)).params)


def test_scale():
    assert lora_scale(8, 16) == 2.0
    assert lora_scale(16, 16, rslora=True) == 4.0


def test_lora_pass_exact_at_step_0_and_merge_restores_base():
    g = lower(load(GPT2, SMALL))
    w = initialize(g, seed=5)
    res = PassManager([LoRA(r=4, alpha=8)], "training").run(g, w)
    adapted = sorted(n.name for n in res.graph.nodes if n.op == "lora_linear")
    attn = [f"h.{i}.attn.{p}" for i in (0, 1) for p in ("k_proj", "out_proj", "q_proj", "v_proj")]
    mlp = ["h.0.mlp.c_fc", "h.0.mlp.c_proj", "h.1.mlp.c_fc", "h.1.mlp.c_proj"]
    assert adapted == sorted(attn + mlp)  # the default targets every untied linear; lm_head is tied to wte
    assert res.log[0].params_after - res.log[0].params_before == 4 * 4 * (64 + 256) + 8 * 4 * (64 + 64)
    a = res.weights["h.0.mlp.c_fc.lora_A.weight"]
    assert a.shape == (4, 64) and a.abs().max() <= 1 / 8 and a.abs().max() > 0.05  # U(±1/√in)
    assert torch.equal(res.weights["h.0.mlp.c_fc.lora_B.weight"], torch.zeros(256, 4))
    merged = PassManager([LoRAMerge()], "inference").run(res.graph, _random_b(dict(res.weights)))
    assert Counter(n.op for n in merged.graph.nodes) == Counter(n.op for n in g.nodes)
    assert {k: tuple(p.shape) for k, p in merged.graph.params.items()} == {k: tuple(p.shape) for k, p in g.params.items()}
    assert not torch.equal(merged.weights["h.0.mlp.c_fc.weight"], w["h.0.mlp.c_fc.weight"])


def test_lora_pass_errors():
    g = lower(load(GPT2, SMALL))
    with pytest.raises(SpecError, match="rank r must be at least 1"):
        LoRA(r=0)
    with pytest.raises(SpecError, match="'h.*.mlp.c_gate' matches no linear layer") as exc:
        PassManager([LoRA(targets=["h.*.mlp.c_gate"])]).run(g)
    assert "h.0.mlp.c_fc" in exc.value.hint
    with pytest.raises(SpecError, match="matches no linear layer") as exc:
        PassManager([LoRA(targets=["*.attn.qkv"])]).run(g)
    with pytest.raises(SpecError, match="inference-only"):
        PassManager([LoRAMerge()], "training").run(g)


# --- PEFT adapter files ---------------------------------------------------------------

def _gpt2_lora(seed=7):
    g = lower(load(GPT2, SMALL))
    w = initialize(g, seed=seed)
    res = PassManager([LoRA(targets=["h.*.mlp.c_fc"], r=4, alpha=16, dropout=0.05)], "training").run(g, w)
    _random_b(res.weights)
    return g, w, res


def test_adapter_files_roundtrip(tmp_path):
    import json

    from safetensors.torch import load_file

    from lbdlc.adapters import apply_adapter, save_adapter

    g, w, res = _gpt2_lora()
    save_adapter(res.graph, res.weights, tmp_path / "ad", base_model="gpt2-small-test", task_type="CAUSAL_LM")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert {k: cfg[k] for k in ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora",
                                "base_model_name_or_path", "task_type")} == {
        "peft_type": "LORA", "r": 4, "lora_alpha": 16.0, "lora_dropout": 0.05, "target_modules": ["h.0.mlp.c_fc", "h.1.mlp.c_fc"],
        "bias": "none", "use_rslora": False, "base_model_name_or_path": "gpt2-small-test", "task_type": "CAUSAL_LM"}
    tensors = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert sorted(tensors) == sorted(f"base_model.model.h.{i}.mlp.c_fc.lora_{p}.weight" for i in (0, 1) for p in "AB")
    assert tensors["base_model.model.h.0.mlp.c_fc.lora_A.weight"].shape == (4, 64)
    again = apply_adapter(g, w, tmp_path / "ad")
    assert [n.attrs.scale for n in again.graph.nodes if n.op == "lora_linear"] == [4.0, 4.0]
    for k, v in res.weights.items():
        assert torch.equal(again.weights[k], v), k


def test_adapter_rename_map(tmp_path):
    from safetensors.torch import load_file, save_file

    from lbdlc.adapters import apply_adapter, save_adapter

    g, w, res = _gpt2_lora()
    save_adapter(res.graph, res.weights, tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_model.safetensors"
    t = load_file(str(path))  # as a Hugging Face GPT-2 would name them
    save_file({k.replace("model.h.", "model.transformer.h.").replace("c_fc", "fc_in"): v for k, v in t.items()}, str(path))
    again = apply_adapter(g, w, tmp_path / "ad", rename={"transformer.": "", "fc_in": "c_fc"})
    assert torch.equal(again.weights["h.1.mlp.c_fc.lora_B.weight"], res.weights["h.1.mlp.c_fc.lora_B.weight"])


def test_adapter_errors(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from lbdlc.adapters import apply_adapter, load_adapter, save_adapter

    g, w, res = _gpt2_lora()
    save_adapter(res.graph, res.weights, tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_model.safetensors"
    good = load_file(str(path))
    # target missing in the model
    save_file({k.replace("c_fc", "c_gate"): v for k, v in good.items()}, str(path))
    with pytest.raises(SpecError, match=r"adapter key 'base_model.model.h.0.mlp.c_gate.lora_A.weight' targets 'h.0.mlp.c_gate'"):
        apply_adapter(g, w, tmp_path / "ad")
    # wrong rank in the file (config says 4)
    bad = dict(good)
    bad["base_model.model.h.1.mlp.c_fc.lora_A.weight"] = torch.zeros(2, 64)
    save_file(bad, str(path))
    with pytest.raises(SpecError, match=r"'base_model.model.h.1.mlp.c_fc.lora_A.weight' has rank 2 but adapter_config.json says r=4") as exc:
        load_adapter(res.graph, tmp_path / "ad")
    assert exc.value.loc is not None and "gpt2.yaml" in str(exc.value.loc)  # the layer's spec line
    # shape mismatch (in_features)
    bad = dict(good)
    bad["base_model.model.h.1.mlp.c_fc.lora_A.weight"] = torch.zeros(4, 65)
    save_file(bad, str(path))
    with pytest.raises(SpecError, match=r"has shape \[4, 65\], layer 'h.1.mlp.c_fc' needs \[4, 64\]") as exc:
        load_adapter(res.graph, tmp_path / "ad")
    assert exc.value.loc is not None
    # a missing B matrix
    save_file({k: v for k, v in good.items() if "h.0.mlp.c_fc.lora_B" not in k}, str(path))
    with pytest.raises(SpecError, match=r"no tensor for 'h.0.mlp.c_fc.lora_B.weight'"):
        load_adapter(res.graph, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(SpecError, match="peft_type is 'IA3'"):
        load_adapter(res.graph, tmp_path / "ad")


# --- the spec's `finetune:` section ------------------------------------------------------

FT_SPEC = """lbdlc: 1
name: ft
inputs:
  x: {shape: [batch, 16]}
layers:
  - {name: fc1, op: linear, out_features: 32}
  - {op: relu}
  - {name: head, op: linear, out_features: 4}
finetune:
  lora:
    targets: ["fc*"]
    r: 4
    alpha: 8
  train_also: ["head.*"]
"""


def test_finetune_section(write_spec):
    from lbdlc.lora import lora_pass, trainable

    path = write_spec(FT_SPEC)
    loaded = load(path)
    g = lower(loaded)
    p = lora_pass(loaded)
    assert (p.targets, p.r, p.scale) == (["fc*"], 4, 2.0)
    res = PassManager([p], "training").run(g, initialize(g))
    assert [n.op for n in res.graph.nodes] == ["lora_linear", "relu", "linear"]
    assert sorted(trainable(loaded, res.graph)) == ["fc1.lora_A.weight", "fc1.lora_B.weight", "head.bias", "head.weight"]
    n_train = 4 * 16 + 32 * 4 + 4 * 32 + 4
    assert sum(res.graph.params[k].numel for k in trainable(loaded, res.graph)) == n_train


def test_finetune_errors_are_located(cli, write_spec):
    from conftest import located

    from lbdlc.errors import render
    from lbdlc.lora import lora_pass, trainable

    path = write_spec(FT_SPEC.replace("r: 4", "r: 0"))
    code, _, stderr = cli("check", path)
    assert code == 2
    located(stderr, path, 12, "0")
    path = write_spec(FT_SPEC.replace('["fc*"]', '["fc*", "c_attn"]'), "bad_target.yaml")
    loaded = load(path)
    with pytest.raises(SpecError) as exc:
        PassManager([lora_pass(loaded)], "training").run(lower(loaded))
    text = render(exc.value)
    assert text.startswith(f"{path}:11:") and "'c_attn' matches no linear layer" in text and "hint: linear layers: fc1, head" in text
    path = write_spec(FT_SPEC.replace('["head.*"]', '["neck.*"]'), "bad_also.yaml")
    loaded = load(path)
    with pytest.raises(SpecError, match="finetune.train_also pattern 'neck.\\*' matches no parameter") as exc:
        trainable(loaded, lower(loaded))
    assert str(exc.value.loc).startswith(f"{path}:14:")


# --- interoperability with PEFT (runs only where `peft` is installed: the dev extra) -------

@pytest.mark.slow  # importing peft costs ~10 s; tests/test_peft_hf.py covers PEFT in the default run
def test_peft_adapter_roundtrip(tmp_path, write_spec):
    peft = pytest.importorskip("peft")
    from lbdlc.adapters import apply_adapter, save_adapter

    class Net(torch.nn.Module):  # the same module names as FT_SPEC's layers
        def __init__(self):
            super().__init__()
            self.fc1, self.head = torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)

        def forward(self, x):
            return self.head(torch.relu(self.fc1(x)))

    loaded = load(write_spec(FT_SPEC))
    g = lower(loaded)
    w = initialize(g, seed=2)
    net = Net()
    net.load_state_dict(w)
    model = peft.get_peft_model(net, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    model.save_pretrained(str(tmp_path / "peft"))
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(4))
    model.eval()
    expect = model.merge_and_unload()(x).detach()
    # PEFT's files -> lbdlc, merged with lora_merge
    res = apply_adapter(g, w, tmp_path / "peft")
    merged = PassManager([LoRAMerge()], "inference").run(res.graph, res.weights)
    mw = merged.weights
    got = F.linear(torch.relu(F.linear(x, mw["fc1.weight"], mw["fc1.bias"])), mw["head.weight"], mw["head.bias"])
    assert (got - expect).abs().max() < 1e-4
    # lbdlc's files -> PEFT
    save_adapter(res.graph, res.weights, tmp_path / "ours", alpha=8.0)
    net2 = Net()
    net2.load_state_dict(w)
    again = peft.PeftModel.from_pretrained(net2, str(tmp_path / "ours")).merge_and_unload()
    assert (again(x).detach() - expect).abs().max() < 1e-4
