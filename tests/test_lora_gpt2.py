"""Done-when of LoRA merging: GPT-2 at a small width with random base weights and random
(non-zero) B; the merged model (lora_merge) computes the unmerged LoRA model's outputs within
1e-5 in PyTorch, ONNX Runtime and TVM (MLP linears and the attention's q/v projections adapted;
the merged graph has attention nodes again). One TVM build (the merged model, slow-marked)."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from lbdlc.passes import PassManager
from passes_util import write_artifacts
from lbdlc.passes.lora import LoRA, LoRAMerge

from lbdlc.lower import load, lower
from lbdlc.verify import run_onnx, run_pytorch, run_tvm

ROOT = Path(__file__).resolve().parent.parent
GPT2 = ROOT / "specs" / "gpt2.yaml"
SMALL = ["n_layer=2", "d_model=64", "n_head=4", "vocab=100", "ctx=32"]


@pytest.fixture(scope="module")
def gpt2_lora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_gpt2")
    base = lower(load(GPT2, SMALL))
    g = torch.Generator().manual_seed(11)
    weights = {k: torch.randn(p.shape, generator=g) * 0.2 for k, p in base.params.items()}  # random base
    lora = PassManager([LoRA(targets=["h.*.mlp.*", "*.attn.q_proj", "*.attn.v_proj"], r=4, alpha=8)], "training").run(base, weights)
    for k in lora.weights:
        if k.endswith("lora_B.weight"):
            lora.weights[k] = torch.randn(lora.weights[k].shape, generator=g) * 0.2
    merged = PassManager([LoRAMerge()], "inference").run(lora.graph, lora.weights)
    tokens = {"tokens": np.random.default_rng(0).integers(0, 100, (2, 7)).astype(np.int64)}
    return {
        "base": (base, weights),
        "merged_graph": merged.graph,
        "unmerged": write_artifacts(lora.graph, lora.weights, tmp / "unmerged", GPT2, ("onnx",)),
        "merged": write_artifacts(merged.graph, merged.weights, tmp / "merged", GPT2, ("onnx",)),
        "merged_weights": merged.weights,
        "base_dir": write_artifacts(base, weights, tmp / "base", GPT2, ()),
        "inputs": tokens,
        "tmp": tmp,
    }


def test_merged_equals_unmerged_in_every_backend(gpt2_lora):
    inputs = gpt2_lora["inputs"]
    ref = run_pytorch(gpt2_lora["unmerged"], inputs)[0]
    assert np.abs(run_onnx(gpt2_lora["unmerged"], inputs)[0] - ref).max() < 1e-5
    base = run_pytorch(gpt2_lora["base_dir"], inputs)[0]
    assert np.abs(base - ref).max() > 1e-2  # the adapters change the outputs
    diffs = {name: float(np.abs(run(gpt2_lora["merged"], inputs)[0] - ref).max())
             for name, run in (("pytorch", run_pytorch), ("onnx", run_onnx))}
    print("merged vs unmerged max |diff|:", diffs, "scale", float(np.abs(ref).max()))
    assert all(d < 1e-5 for d in diffs.values()), diffs


@pytest.mark.slow  # the TVM build of the merged model (~10 s with the default CPU schedules)
def test_merged_equals_unmerged_in_tvm(gpt2_lora):
    inputs = gpt2_lora["inputs"]
    ref = run_pytorch(gpt2_lora["unmerged"], inputs)[0]
    out = write_artifacts(gpt2_lora["merged_graph"], gpt2_lora["merged_weights"], gpt2_lora["tmp"] / "merged_tvm", GPT2, ("tvm",))
    diff = float(np.abs(run_tvm(out, inputs)[0] - ref).max())
    print("merged (TVM) vs unmerged max |diff|:", diff)
    assert diff < 1e-5


def test_merged_has_base_shape_and_ops(gpt2_lora):
    base, _ = gpt2_lora["base"]
    merged = gpt2_lora["merged_graph"]
    assert Counter(n.op for n in merged.nodes) == Counter(n.op for n in base.nodes)
    assert {k: tuple(p.shape) for k, p in merged.params.items()} == {k: tuple(p.shape) for k, p in base.params.items()}
    assert sum(p.numel for p in merged.params.values()) == sum(p.numel for p in base.params.values())
