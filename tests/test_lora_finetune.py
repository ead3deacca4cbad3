"""`finetune:` wired into `lbdlc build` / `lbdlc train` (lbdlc/finetune.py, backends/train_lora.py):
base weights loaded and checked (located errors naming the tensor), the LoRA pass applied,
train.py freezing all but the trainable parameters and saving PEFT adapter files, `--adapter`
and `--merge`, the digits `classes:` filter, and (slow) the digits demo: pre-train on 0-4,
LoRA fine-tune to 5-9, merged ONNX/TVM build reproducing the fine-tuned accuracy."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, SPECS, located
from training_util import load_train

from lbdlc.driver import BuildOptions, build
from lbdlc.lower import load, lower
from lbdlc.verify import run_onnx, run_pytorch
from lbdlc.weights import initialize

BASE = SPECS / "mlp_digits.yaml"
LORA = SPECS / "mlp_digits_lora.yaml"
N_BASE = 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10  # 17,226
N_LORA = 4 * (64 + 128) + 4 * (128 + 64) + 4 * (64 + 10)  # r (in + out) per adapted layer: 1,832


def _base_weights(tmp_path: Path, seed=3) -> Path:
    """Random 'pre-trained' base weights of mlp_digits.yaml (the spec's names)."""
    g = torch.Generator().manual_seed(seed)
    w = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in initialize(lower(load(BASE))).items()}
    path = tmp_path / "base.safetensors"
    save_file(w, str(path))
    return path


def test_build_loads_the_base_and_train_py_trains_only_the_adapters(tmp_path):
    base = _base_weights(tmp_path)
    res = build(LORA, tmp_path / "b", BuildOptions(backends=("pytorch", "onnx"), weights=base))
    ft = res.manifest["finetune"]
    assert ft["adapted_layers"] == ["fc1", "fc2", "head"] and ft["r"] == 4 and ft["weights_are"] == "base"
    assert (ft["params"], ft["trainable_params"], ft["lora_params"]) == (N_BASE + N_LORA, N_LORA, N_LORA)
    assert ft["trainable_fraction"] == pytest.approx(1832 / 19058)
    assert res.manifest["model"]["params"] == N_BASE + N_LORA
    # the build's weights are the base's, adapters added (B = 0): outputs are the base model's
    saved = load_file(str(tmp_path / "b" / "weights.safetensors"))
    for k, v in load_file(str(base)).items():
        assert torch.equal(saved[k], v), k
    assert torch.equal(saved["fc1.lora_B.weight"], torch.zeros(128, 4))
    x = {"x": np.random.default_rng(0).random((3, 64), dtype=np.float32)}
    plain = build(BASE, tmp_path / "plain", BuildOptions(backends=("pytorch",), weights=base))
    assert np.abs(run_pytorch(tmp_path / "b", x)[0] - run_pytorch(plain.out_dir, x)[0]).max() == 0
    assert np.abs(run_onnx(tmp_path / "b", x)[0] - run_pytorch(plain.out_dir, x)[0]).max() < 1e-5
    # train.py: freeze all but TRAINABLE, report the fraction, save the adapters as PEFT does
    module = load_train(tmp_path / "b")
    assert module.TRAINABLE == [f"{l}.lora_{p}.weight" for l in ("fc1", "fc2", "head") for p in "AB"]
    model = module.Model()
    model.load_state_dict(saved)
    assert module.freeze_for_finetune(model) == (N_LORA, N_BASE + N_LORA)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(module.TRAINABLE)
    assert [len(g["params"]) for g in module.make_optimizer(model).param_groups] == [6]
    with torch.no_grad():
        model.fc1.lora_B.weight.normal_(generator=torch.Generator().manual_seed(1))
    module.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == ("LORA", 4, 8.0, ["fc1", "fc2", "head"])
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(tensors) == sorted(f"base_model.model.{l}.lora_{p}.weight" for l in ("fc1", "fc2", "head") for p in "AB")
    assert torch.equal(tensors["base_model.model.fc1.lora_B.weight"], model.fc1.lora_B.weight)


def test_adapter_and_merge_options(tmp_path):
    """--adapter DIR fills A and B; --merge folds them: the base model's parameters, the
    adapted model's outputs (ONNX of the merged build vs model.py of the unmerged one)."""
    from lbdlc.adapters import save_adapter
    from lbdlc.passes import PassManager
    from lbdlc.lora import lora_pass

    base = _base_weights(tmp_path)
    loaded = load(LORA)
    res = PassManager([lora_pass(loaded)], "training").run(lower(loaded), load_file(str(base)))
    g = torch.Generator().manual_seed(2)
    for k in res.weights:
        if ".lora_" in k:
            res.weights[k] = torch.randn(res.weights[k].shape, generator=g) * 0.3
    save_adapter(res.graph, res.weights, tmp_path / "ad", alpha=8.0)
    x = {"x": np.random.default_rng(1).random((4, 64), dtype=np.float32)}
    unmerged = build(LORA, tmp_path / "u", BuildOptions(backends=("pytorch",), weights=base, adapter=tmp_path / "ad"))
    merged = build(LORA, tmp_path / "m", BuildOptions(backends=("pytorch", "onnx"), weights=base, adapter=tmp_path / "ad", merge=True))
    assert merged.manifest["model"]["params"] == N_BASE and merged.manifest["finetune"]["merged"] is True
    assert "train.py" in merged.manifest["artifacts"] and "LoRALinear" not in (tmp_path / "m" / "model.py").read_text()
    ref = run_pytorch(unmerged.out_dir, x)[0]
    base_out = run_pytorch(build(BASE, tmp_path / "p", BuildOptions(backends=("pytorch",), weights=base)).out_dir, x)[0]
    assert np.abs(ref - base_out).max() > 1e-2  # the adapter changes the outputs
    assert np.abs(run_onnx(merged.out_dir, x)[0] - ref).max() < 1e-5
    # an adapter without a `finetune:` section: its own targets, rank and alpha
    plain = build(BASE, tmp_path / "pm", BuildOptions(backends=("pytorch",), weights=base, adapter=tmp_path / "ad", merge=True))
    assert np.abs(run_pytorch(plain.out_dir, x)[0] - ref).max() < 1e-5


def test_cli_build_reports_finetune_and_refuses_merge_without_adapters(cli, tmp_path):
    code, out, err = cli("check", LORA)
    assert code == 0, err
    assert "finetune: LoRA r=4 on 3 layers (fc1, fc2, head): +1,832 parameters; 1,832 of 19,058 train (9.61%)" in out
    code, out, err = cli("build", LORA, "-o", tmp_path / "ft", "-b", "pytorch")
    assert code == 0, err
    assert "finetune: 1,832 of 19,058 parameters trainable (9.61%), LoRA on fc1, fc2, head" in out
    code, out, err = cli("build", LORA, "-o", tmp_path / "m", "-b", "pytorch", "--merge")
    assert code == 0 and "built mlp_digits_lora: 17,226 parameters" in out and "adapters merged into the base weights" in out
    code, _, err = cli("build", BASE, "-o", tmp_path / "o", "-b", "pytorch", "--merge")
    assert code == 2 and "--merge folds LoRA adapters into the base weights, and this build has none" in err
    assert "Traceback" not in err


FT = """lbdlc: 1
extends: {base}
name: ftb
finetune:
  base: base.safetensors
  lora:
    targets: [fc1]
"""


@pytest.mark.parametrize("change, message", [
    (None, "finetune.base: no such weights file"),
    (("fc2.weight", torch.zeros(64, 100)), "tensor 'fc2.weight' is [64, 100] float32, the spec's parameter is [64, 128] float32"),
    (("fc3.weight", torch.zeros(3)), "has tensor 'fc3.weight', which is no parameter of this spec"),
    (("head.bias", None), "has no tensor 'head.bias'"),
])
def test_base_weight_errors_are_located(cli, write_spec, tmp_path, change, message):
    import shutil

    shutil.copy(BASE, tmp_path / "mlp_digits.yaml")
    path = write_spec(FT.format(base="mlp_digits.yaml"), "ftb.yaml")
    if change is not None:
        w = load_file(str(_base_weights(tmp_path)))
        if change[1] is None:
            del w[change[0]]
        else:
            w[change[0]] = change[1]
        save_file(w, str(tmp_path / "base.safetensors"))
    code, _, err = cli("build", path, "-o", tmp_path / "o", "-b", "pytorch")
    assert code == 2
    first = located(err, path, 5, "base.safetensors")
    assert message in first, err
    if change is not None and change[0] != "fc3.weight":  # a note at the layer's line
        assert f"{tmp_path / 'mlp_digits.yaml'}:" in err and f"belongs to layer '{change[0].split('.')[0]}'" in err


def test_digits_classes_option(write_spec, tmp_path, cli):
    from training_util import build_train

    out = build_train(tmp_path, BASE.read_text())
    data = load_train(out).make_data()
    labels = torch.cat([data[s]["head"] for s in ("train", "val", "test")])
    assert set(labels.tolist()) == {0, 1, 2, 3, 4} and len(labels) == 901  # 178+182+177+183+181 digits 0-4
    text = BASE.read_text().replace("classes: [0, 1, 2, 3, 4]", "classes: [0, 1, 1]")
    path = write_spec(text, "dup.yaml")
    code, _, err = cli("build", path, "-o", tmp_path / "o", "-b", "pytorch")
    assert code == 2
    assert "digit 1 is listed twice in `classes`" in located(err, path, 21, "1]")
    path = write_spec(BASE.read_text().replace("classes: [0, 1, 2, 3, 4]", "classes: [0, 10]"), "range.yaml")
    code, _, err = cli("build", path, "-o", tmp_path / "o", "-b", "pytorch")
    assert code == 2 and "10" in located(err, path, 21, "10")


def test_gpt2_finetune_on_attention_projections(tmp_path):
    """The issue's example on specs/gpt2.yaml (small width): q and v projections adapted
    inside the attention layers, outputs at step 0 equal the base model's."""
    small = ("n_layer=2", "d_model=64", "n_head=4", "vocab=100", "ctx=32")
    spec = tmp_path / "gpt2_lora.yaml"
    spec.write_text(f"""lbdlc: 1
extends: {os.path.relpath(SPECS / 'gpt2.yaml', tmp_path)}
name: gpt2_lora
finetune:
  lora:
    targets: ["*.attn.q_proj", "*.attn.v_proj"]
    r: 8
    alpha: 16
  train_also: ["ln_f.*"]
""")
    base = build(SPECS / "gpt2.yaml", tmp_path / "base", BuildOptions(backends=("pytorch",), overrides=small, seed=4))
    ft = build(spec, tmp_path / "ft", BuildOptions(backends=("pytorch",), overrides=small, weights=base.out_dir / "weights.safetensors"))
    report = ft.manifest["finetune"]
    assert report["adapted_layers"] == [f"h.{i}.attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert report["trainable_params"] == 4 * 8 * (64 + 64) + 2 * 64
    tokens = {"tokens": np.random.default_rng(2).integers(0, 100, (2, 5)).astype(np.int64)}
    assert np.abs(run_pytorch(ft.out_dir, tokens)[0] - run_pytorch(base.out_dir, tokens)[0]).max() <= 1e-6


# -- the digits demo ---------------------------------------------------------------------------


def _accuracy(out: Path, module, run) -> tuple[float, int]:
    test = module.make_data()["test"]
    pred = run(out, {"x": test["x"].numpy()})[0].argmax(-1)
    right = int((pred == test["head"].numpy()).sum())
    return right / len(pred), len(pred)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """mlp_digits.yaml trained as written (digits 0-4): its weights and test accuracy."""
    from typer.testing import CliRunner

    from lbdlc.cli import app

    tmp = tmp_path_factory.mktemp("pretrained")
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        result = CliRunner().invoke(app, ["train", str(BASE), "-o", str(tmp / "base")])
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old
    assert result.exit_code == 0, result.stderr
    run = tmp / "base" / "run"
    return run / "weights.safetensors", json.loads((run / "summary.json").read_text())["test"]["accuracy"]


@pytest.mark.slow
def test_digits_lora_demo(tmp_path, cli, monkeypatch, capfd, pretrained):
    """Pre-train on digits 0-4, fine-tune to 5-9 with LoRA (1,832 of 19,058 parameters),
    merged ONNX/TVM build reproduces the fine-tuned accuracy."""
    from lbdlc.verify import run_tvm

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base_w, pre = pretrained
    code, _, err = cli("train", LORA, "-o", tmp_path / "ft", "--weights", base_w)
    assert code == 0, err
    printed = capfd.readouterr().out
    assert "trainable parameters: 1,832 of 19,058 (9.61%)" in printed
    run = tmp_path / "ft" / "run"
    after = json.loads((run / "summary.json").read_text())["test"]["accuracy"]
    module = load_train(tmp_path / "ft")  # the 5-9 test split
    before, n = _accuracy(build(BASE, tmp_path / "b0", BuildOptions(backends=("pytorch",), weights=base_w)).out_dir, module, run_pytorch)
    assert (run / "adapter_config.json").exists() and (run / "adapter_model.safetensors").exists()
    merged = build(LORA, tmp_path / "merged", BuildOptions(weights=run / "weights.safetensors", merge=True))
    assert merged.manifest["model"]["params"] == N_BASE
    scores = {name: _accuracy(merged.out_dir, module, r)[0] for name, r in (("pytorch", run_pytorch), ("onnx", run_onnx), ("tvm", run_tvm))}
    # the same through the adapter files train.py wrote
    via_adapter = build(LORA, tmp_path / "via", BuildOptions(backends=("onnx",), weights=base_w, adapter=run, merge=True))
    scores["onnx via adapter"] = _accuracy(via_adapter.out_dir, module, run_onnx)[0]
    print(f"digits 0-4 pre-training: test accuracy {pre:.4f}; on 5-9 ({n} test digits): base {before:.4f}, "
          f"LoRA fine-tuned {after:.4f}; merged builds {scores}")
    assert before < 0.05 and after > 0.85, (before, after)
    assert all(abs(s - after) * n <= 1 for s in scores.values()), (after, scores)


def test_specs_parameter_counts_and_backends(tmp_path):
    """mlp_digits: the torch.nn count; mlp_digits_lora built from a fine-tuned checkpoint
    (a --weights file holding the adapters, random B): PyTorch and ONNX Runtime agree with a
    hand-written reference (TVM runs lora_linear in tests/test_lora.py, and the merged demo
    build in the slow test below)."""
    from test_parity import TOLERANCE

    from lbdlc.passes import PassManager
    from lbdlc.lora import lora_pass
    from lbdlc.verify import compare, random_inputs

    ref = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    assert sum(p.numel() for p in ref.parameters()) == N_BASE == sum(p.numel for p in lower(load(BASE)).params.values())
    loaded = load(LORA)
    res = PassManager([lora_pass(loaded)], "training").run(lower(loaded), initialize(lower(loaded)))
    g = torch.Generator().manual_seed(9)
    tuned = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in res.weights.items()}
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    out = build(LORA, tmp_path / "b", BuildOptions(backends=("pytorch", "onnx"), weights=tmp_path / "tuned.safetensors"))
    assert out.manifest["finetune"]["weights_are"] == "fine-tuned" and out.manifest["model"]["params"] == N_BASE + N_LORA
    assert out.manifest["model"]["outputs"] == [{"dtype": "float32", "name": "head", "shape": ["batch", 10]}]
    inputs = random_inputs(out.out_dir, {"batch": 3})
    agreement = compare(out.out_dir, inputs, ("pytorch", "onnx"))
    assert agreement.ok(TOLERANCE), agreement.max_abs_diff
    x = torch.from_numpy(inputs["x"])
    h = x
    for layer, act in (("fc1", True), ("fc2", True), ("head", False)):
        w = tuned[f"{layer}.weight"] + 2.0 * tuned[f"{layer}.lora_B.weight"] @ tuned[f"{layer}.lora_A.weight"]
        h = torch.nn.functional.linear(h, w, tuned[f"{layer}.bias"])
        h = torch.relu(h) if act else h
    assert np.abs(run_pytorch(out.out_dir, inputs)[0] - h.numpy()).max() < 1e-4


def _adapter(tmp_path: Path, name: str, targets, r, alpha, rslora=False, seed=0) -> tuple[Path, dict, float]:
    from lbdlc.adapters import save_adapter
    from lbdlc.passes import PassManager
    from lbdlc.passes.lora import LoRA, lora_scale

    res = PassManager([LoRA(targets=targets, r=r, alpha=alpha, rslora=rslora)], "training").run(lower(load(BASE)), None)
    g = torch.Generator().manual_seed(seed)
    w = {k: torch.randn(p.shape, generator=g) * 0.2 for k, p in res.graph.params.items() if ".lora_" in k}
    save_adapter(res.graph, w, tmp_path / name, alpha=alpha, rslora=rslora)
    return tmp_path / name, w, lora_scale(r, alpha, rslora)


def test_several_adapters_merged_with_weights(cli, tmp_path):
    """--adapter A --adapter B --adapter-weights 0.5,1.5 --merge: W + Σ λ_i (α_i/r_i) B_i A_i,
    overlapping on fc2; one with rsLoRA (α/√r)."""
    base = _base_weights(tmp_path)
    a1, w1, s1 = _adapter(tmp_path, "a1", ["fc1", "fc2"], 4, 8, seed=1)
    a2, w2, s2 = _adapter(tmp_path, "a2", ["fc2", "head"], 2, 4, rslora=True, seed=2)
    assert (s1, s2) == (2.0, 4 / 2 ** 0.5)
    code, out, err = cli("build", BASE, "-o", tmp_path / "m", "-b", "pytorch", "-b", "onnx", "--weights", base,
                         "--adapter", a1, "--adapter", a2, "--adapter-weights", "0.5,1.5", "--merge")
    assert code == 0, err
    got, b = load_file(str(tmp_path / "m" / "weights.safetensors")), load_file(str(base))

    def delta(w, layer, lam, s):
        return lam * s * (w[f"{layer}.lora_B.weight"].double() @ w[f"{layer}.lora_A.weight"].double())

    want = {"fc1.weight": b["fc1.weight"].double() + delta(w1, "fc1", 0.5, s1),
            "fc2.weight": b["fc2.weight"].double() + delta(w1, "fc2", 0.5, s1) + delta(w2, "fc2", 1.5, s2),
            "head.weight": b["head.weight"].double() + delta(w2, "head", 1.5, s2)}
    for k, v in want.items():
        assert torch.equal(got[k], v.float()), k
    assert all(torch.equal(got[k], b[k]) for k in ("fc1.bias", "fc2.bias", "head.bias"))
    m = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert [(a["weight"], a["layers"]) for a in m["finetune"]["adapters"]] == [(0.5, ["fc1", "fc2"]), (1.5, ["fc2", "head"])]
    assert m["model"]["params"] == N_BASE
    x = {"x": np.random.default_rng(3).random((2, 64), dtype=np.float32)}
    assert np.abs(run_onnx(tmp_path / "m", x)[0] - run_pytorch(tmp_path / "m", x)[0]).max() < 1e-5
    # mistakes
    for args, message in ((["--adapter", a1, "--adapter", a2], "2 adapters with weights can only be built merged"),
                          (["--adapter", a1, "--adapter-weights", "0.5,1", "--merge"], "--adapter-weights has 2 weights for 1 adapters"),
                          (["--adapter", a1, "--adapter-weights", "half", "--merge"], "--adapter-weights must be comma-separated numbers")):
        code, _, err = cli("build", BASE, "-o", tmp_path / "bad", "-b", "pytorch", "--weights", base, *args)
        assert code == 2 and message in err and "Traceback" not in err, err


@pytest.mark.slow
def test_digits_qlora_demo(tmp_path, cli, monkeypatch, capfd, pretrained):
    """The same fine-tune as QLoRA: the base's three weight matrices in Q4_1, frozen, fp32
    adapters; merged kept fp32 reproduces the fine-tuned accuracy, merged requantized is
    reported next to it."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base_w, _ = pretrained
    spec = tmp_path / "qlora.yaml"
    spec.write_text(f"""lbdlc: 1
extends: {os.path.relpath(LORA, tmp_path)}
name: mlp_digits_qlora
finetune:
  qlora: {{format: q4_1, merge: float32}}
""")
    code, _, err = cli("train", spec, "-o", tmp_path / "ft", "--weights", base_w)
    assert code == 0, err
    assert "trainable parameters: 1,832 of 19,058 (9.61%)" in capfd.readouterr().out  # the quantized base counted as values
    run = tmp_path / "ft" / "run"
    after = json.loads((run / "summary.json").read_text())["test"]["accuracy"]
    module = load_train(tmp_path / "ft")
    fp32 = build(spec, tmp_path / "f", BuildOptions(backends=("onnx",), weights=run / "weights.safetensors", merge=True))
    requant = spec.with_name("requant.yaml")
    requant.write_text(spec.read_text().replace("merge: float32", "merge: requantize"))
    rq = build(requant, tmp_path / "r", BuildOptions(backends=("onnx",), weights=run / "weights.safetensors", merge=True))
    scores = {"merged fp32": _accuracy(fp32.out_dir, module, run_onnx)[0], "merged q4_1": _accuracy(rq.out_dir, module, run_onnx)[0]}
    n = _accuracy(fp32.out_dir, module, run_onnx)[1]
    print(f"QLoRA (q4_1 base) fine-tuned on 5-9: test accuracy {after:.4f}; {scores}; "
          f"{fp32.manifest['finetune']['precision']} / {rq.manifest['finetune']['precision']}")
    assert after > 0.85
    assert abs(scores["merged fp32"] - after) * n <= 1
    assert scores["merged q4_1"] > 0.8


def test_mismatched_adapter_is_located_at_the_layer(cli, tmp_path):
    """--adapter with another rank than the spec's finetune.lora.r: the error names the adapter
    key and points at the layer's line (in the spec the fine-tune extends)."""
    a, _, _ = _adapter(tmp_path, "r2", ["fc1", "fc2", "head"], 2, 4, seed=4)
    code, _, err = cli("build", LORA, "-o", tmp_path / "o", "-b", "pytorch", "--adapter", a)
    assert code == 2
    first = located(err, BASE, 11, "{name: fc1")
    assert "adapter key 'base_model.model.fc1.lora_A.weight' has shape [2, 64], layer 'fc1' needs [4, 64] (rank mismatch)" in first
    # a target the model lacks (renamed in the file)
    t = load_file(str(a / "adapter_model.safetensors"))
    save_file({k.replace("fc2", "fc9"): v for k, v in t.items()}, str(a / "adapter_model.safetensors"))
    code, _, err = cli("build", BASE, "-o", tmp_path / "o", "-b", "pytorch", "--adapter", a, "--merge")
    assert code == 2 and "adapter key 'base_model.model.fc9.lora_A.weight' targets 'fc9', which is not a layer of this model" in err


def test_check_train_counts_only_what_the_fine_tune_trains(cli):
    """`lbdlc check --train` on the fine-tune: gradients and Adam state for the 1,832 adapter
    values only; the activations (34,304 bytes at batch 32) equal saved_tensors_hooks' count
    (measured by hand, see the report of issue #8)."""
    code, out, err = cli("check", LORA, "--train", "--batch", "32", "--device", "cpu", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["trainable_params"] == N_LORA
    assert d["bytes"]["grads"] == 4 * N_LORA and d["bytes"]["optimizer"] == 2 * 4 * N_LORA + 4 * 6  # + Adam's step, per A and B
    assert d["bytes"]["weights"] == 4 * (N_BASE + N_LORA) and d["bytes"]["activations"] == 34304
    code, out, _ = cli("check", BASE, "--train", "--batch", "32", "--device", "cpu", "--json")
    assert json.loads(out)["trainable_params"] == N_BASE
