"""Activation checkpointing: the planner (lbdlc/checkpointing.py), the code model.py gets,
gradients that do not change, the memory it saves, and located errors."""
import json

import pytest
import torch
from conftest import SPECS, located
from memory_util import (
    GPT_24,
    GPT_SMALL,
    config,
    graph_of,
    inputs,
    loss_of,
    measured_peak,
    model,
    one_thread,
)

from lbdlc.checkpointing import loops, make_plan, plan_for_spec, segments_of_length
from lbdlc.driver import BuildOptions, build
from lbdlc.lower import load, lower
from lbdlc.memory import estimate, human_size, measure_saved
from lbdlc.training.schema import CheckpointBudget, NextTokenLoss

TRAIN = """
train:
  data: {{kind: synthetic, sizes: {{seq: 64}}}}
  batch_size: 8
  steps: 1
  loss: {{kind: next_token}}
  optimizer: {{kind: adamw, lr: 0.001}}
  checkpointing: {policy}
"""


def gpt_spec(write_spec, policy: str):
    """specs/gpt2.yaml with a train: section; (path, line of `checkpointing:`)."""
    text = (SPECS / "gpt2.yaml").read_text() + TRAIN.format(policy=policy)
    path = write_spec(text)
    line = next(k for k, t in enumerate(text.splitlines(), 1) if t.strip().startswith("checkpointing:"))
    return path, line


def gradients(net, xs, loss_fn) -> dict:
    torch.manual_seed(1)  # dropout: the same masks in both runs (checkpoint replays the RNG state)
    loss = loss_fn(net(*xs))
    loss.backward()
    return {"loss": loss.detach()} | {n: p.grad for n, p in net.named_parameters()}


def assert_same_gradients(graph, sizes: dict, plan) -> None:
    """The loss and every gradient of model.py with `plan` equal those without it, bit for bit."""
    with one_thread():
        plain, recomputed = model(graph), model(graph, plan)
        recomputed.load_state_dict(plain.state_dict())
        xs = inputs(graph, sizes)
        expected, got = gradients(plain, xs, loss_of(graph, xs)), gradients(recomputed, xs, loss_of(graph, xs))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


@pytest.mark.parametrize("policy", ["all", "sqrt", "selective", ["h.1"], CheckpointBudget(budget=2_200_000)],
                         ids=["all", "sqrt", "selective", "h.1", "budget"])
def test_gpt2_gradients_are_bitwise_equal(policy):
    graph, sizes = graph_of("gpt2")  # dropout 0.1 on: recomputation replays the same masks
    plan = make_plan(graph, policy, config(sizes))
    assert plan.segments
    assert_same_gradients(graph, sizes, plan)


def test_transformer_decoder_blocks_take_the_encoder_output_through_checkpoint():
    """Loops whose blocks read a second input (the decoder's memory): `run_blocks(blocks, x, memory)`."""
    graph, sizes = graph_of("transformer")
    plan = make_plan(graph, "sqrt", config(sizes))
    assert {s.root for s in plan.segments} == {"encoder.layers", "decoder.layers"}
    assert_same_gradients(graph, sizes, plan)


@pytest.mark.parametrize("policy", ["sqrt", "selective"])
def test_resnet50_gradients_are_bitwise_equal(policy):
    graph, sizes = graph_of("resnet50")
    plan = make_plan(graph, policy, config(sizes))
    if policy == "sqrt":
        assert [(s.root, s.start, s.stop) for s in plan.segments] == [
            ("layer1", 0, 3), ("layer2", 0, 4), ("layer3", 0, 3), ("layer3", 3, 6), ("layer4", 0, 3)]
    else:  # every bottleneck block, one per checkpoint
        assert len(plan.segments) == 16 and all(s.selective and s.stop == s.start + 1 for s in plan.segments)
    assert_same_gradients(graph, sizes, plan)


def test_sqrt_cuts_saved_activations_3x_on_a_24_block_gpt():
    graph = lower(load(SPECS / "gpt2.yaml", GPT_24))
    sizes = {"batch": 4, "seq": 64}
    cfg = config(sizes)
    plan = make_plan(graph, "sqrt", cfg)
    assert [(s.start, s.stop) for s in plan.segments] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 24)]  # sqrt(24) ~ 5
    with one_thread():
        xs = inputs(graph, sizes)
        torch.manual_seed(0)
        before = measure_saved(model(graph), *xs)
        torch.manual_seed(0)
        after = measure_saved(model(graph, plan), *xs)
    print(f"24-block GPT, batch 4, seq 64: saved {before:,} -> {after:,} bytes ({before / after:.0f}x)")
    assert before >= 3 * after
    assert abs(plan.activations_before - before) <= 0.15 * before and abs(plan.activations_after - after) <= 0.15 * after


@pytest.mark.parametrize("budget_mb", [pytest.param(30, marks=pytest.mark.slow), 45, pytest.param(60, marks=pytest.mark.slow)])
def test_budget_lands_within_10_percent_under_it(write_spec, budget_mb):
    """The spec's {budget: ...}, planned at its own batch and sizes (8 x 64 tokens), measured
    on a real training step (next-token loss, AdamW) of the generated model."""
    path, _ = gpt_spec(write_spec, f"{{budget: {budget_mb}MB}}")
    loaded = load(path, GPT_24 + ["dropout=0.0"])  # CUDA's kernels and the CPU's keep the same then
    graph = lower(loaded)
    plan = plan_for_spec(loaded, graph)
    budget = budget_mb * 10**6
    assert plan.budget == budget and plan.segments
    sizes = {"batch": 8, "seq": 64}
    with one_thread():
        net = model(graph, plan)
        xs = inputs(graph, sizes)
        measured = measured_peak(net, xs, loss_of(graph, xs), torch.optim.AdamW(net.parameters()))
    print(f"budget {budget:,}: {plan.describe()}; peak predicted {plan.peak_after:,} measured {measured:,}")
    assert 0.9 * budget <= plan.peak_after <= budget
    assert 0.9 * budget <= measured <= budget
    # The least recomputation that fits: without its last segment the plan is over the budget.
    fewer = estimate(graph, plan.config, plan.segments[:-1], [NextTokenLoss(kind="next_token")])
    assert fewer.peak > budget


def test_an_unreachable_budget_is_a_located_error_with_the_minimum(cli, write_spec):
    path, line = gpt_spec(write_spec, "{budget: 10MB}")
    args = [a for o in GPT_24 for a in ("--set", o)]
    code, out, err = cli("check", path, "--train", *args)
    assert code == 2
    first = located(err, path, line, "{budget")
    assert "the budget of 9.5 MiB cannot be met: the least peak any checkpointing plan reaches is" in first
    assert "of which weights, gradients and optimizer state take" in first and "hint: raise the budget to at least" in err
    loaded = load(path, GPT_24)
    graph = lower(loaded)
    cfg = plan_for_spec(loaded, graph, policy="sqrt").config  # the spec's batch 8, seq 64
    peaks = [estimate(graph, cfg, segments_of_length(loops(graph), k), [NextTokenLoss(kind="next_token")]) for k in range(1, 25)]
    least = min(r.peak for r in peaks)
    assert f"reaches is {human_size(least)} ({least:,} bytes;" in first
    assert peaks[0].weights < 10 * 10**6 < peaks[0].weights + peaks[0].grads + peaks[0].optimizer < least
    code, out, err = cli("build", path, "-b", "pytorch", "-o", path.parent / "out", *args)
    assert code == 2 and "cannot be met" in err and "Traceback" not in err


def test_policy_errors_are_located(cli, write_spec):
    path, line = gpt_spec(write_spec, "sqrtt")
    code, out, err = cli("check", path, "--train")
    assert code == 2
    assert "unknown checkpointing policy 'sqrtt' (did you mean 'sqrt'?)" in located(err, path, line, "sqrtt")
    path, line = gpt_spec(write_spec, "[h.1, hh.3]")
    code, out, err = cli("check", path, "--train")
    assert code == 2
    assert "'hh.3' is not a repeated block of this model" in located(err, path, line, "hh.3")
    assert "did you mean 'h.3'?" in err
    path, line = gpt_spec(write_spec, "{budget: lots}")
    code, out, err = cli("check", path, "--train")
    assert code == 2 and "'lots' is not a size" in located(err, path, line, "lots")
    mlp = write_spec((SPECS / "mlp.yaml").read_text() + TRAIN.format(policy="sqrt").replace("next_token", "mse").replace(", sizes: {seq: 64}", ""), "mlp.yaml")
    code, out, err = cli("check", mlp, "--train")
    mlp_line = next(k for k, t in enumerate(mlp.read_text().splitlines(), 1) if "checkpointing" in t)
    assert code == 2 and "this model has no repeated blocks to recompute" in located(err, mlp, mlp_line, "sqrt")


def built_small_gpt(write_spec, out, policy: str):
    """(model.py's source, the manifest's checkpointing report or None, line of `checkpointing:`)
    of a 4-block GPT-2 built with `policy`."""
    path, line = gpt_spec(write_spec, policy)
    overrides = ("n_layer=4", "d_model=32", "n_head=2", "vocab=50", "ctx=64")
    result = build(path, out, BuildOptions(backends=("pytorch",), overrides=overrides))
    return (result.out_dir / "model.py").read_text(), json.loads((result.out_dir / "manifest.json").read_text()).get("checkpointing"), line


def test_model_py_recomputes_what_the_plan_says_and_the_manifest_reports_it(write_spec, tmp_path):
    source, report, line = built_small_gpt(write_spec, tmp_path / "out", "sqrt")
    assert "from torch.utils.checkpoint import checkpoint\n" in source
    assert f"        for start, stop in ((0, 2), (2, 4)):  # recomputed in backward (spec.yaml:{line})\n" \
           "            x = checkpoint(run_blocks, self.h[start:stop], x, use_reentrant=False)\n" in source
    assert report["policy"] == "sqrt" and report["segments"] == [{"blocks": "h", "start": 0, "stop": 2}, {"blocks": "h", "start": 2, "stop": 4}]
    assert report["predicted_for"]["batch"] == 8 and report["predicted_for"]["sizes"] == {"seq": 64}
    assert 0 < report["activations_bytes"]["with"] < report["activations_bytes"]["without"]
    assert report["extra_flops_per_step"] > 0 and 0 < report["extra_compute"] < 0.34  # at most one forward of 3
    # One block per checkpoint: the loop itself.
    source, _, line = built_small_gpt(write_spec, tmp_path / "all", "all")
    assert f"        for block in self.h:  # recomputed in backward (spec.yaml:{line})\n" \
           "            x = checkpoint(block, x, use_reentrant=False)\n" in source
    assert "def run_blocks" not in source
    # Without checkpointing, model.py is what it always was.
    plain, report, _ = built_small_gpt(write_spec, tmp_path / "none", "none")
    assert "checkpoint" not in plain and report is None


def test_selective_recomputation_keeps_kernel_outputs_in_model_py(write_spec, tmp_path):
    """`selective`: each block under checkpoint with a policy that keeps what mm/addmm/bmm,
    convolutions and attention kernels compute; the plan counts none of their FLOPs as extra."""
    source, report, line = built_small_gpt(write_spec, tmp_path / "out", "selective")
    assert "from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts\n" in source
    assert f"        for block in self.h:  # recomputed selectively in backward (spec.yaml:{line})\n" \
           "            x = checkpoint(block, x, use_reentrant=False, context_fn=keep_products)\n" in source
    assert "torch.ops.aten.addmm.default" in source and "return create_selective_checkpoint_contexts(keep_kernel_outputs)" in source
    assert report["policy"] == "selective" and report["selective"] and report["recomputed_blocks"] == 4
    acts = report["activations_bytes"]
    assert 0 < acts["with"] < acts["without"]
    # The only forward FLOPs recomputed are the pointwise ops and norms: a few percent of a step.
    _, every, _ = built_small_gpt(write_spec, tmp_path / "all", "all")
    assert 0 < report["extra_compute"] < 0.05 < every["extra_compute"]
    assert report["extra_flops_per_step"] < every["extra_flops_per_step"] / 10


def test_check_train_shows_the_plan(cli, write_spec):
    path, _ = gpt_spec(write_spec, "sqrt")
    code, out, err = cli("check", path, "--train", "--json", *[a for o in GPT_SMALL for a in ("--set", o)])
    assert code == 0, err
    report = json.loads(out)
    plan = report["checkpointing"]
    assert plan["policy"] == "sqrt" and plan["recomputed_blocks"] == 2 and plan["segments"] == [{"blocks": "h", "start": 0, "stop": 1}, {"blocks": "h", "start": 1, "stop": 2}]
    recomputed = [layer["name"] for layer in report["layers"] if layer["recomputed"]]
    assert recomputed and all(name.startswith("h.") for name in recomputed)
    code, out, err = cli("check", path, "--train", "--checkpointing", "none", *[a for o in GPT_SMALL for a in ("--set", o)])
    assert code == 0 and "checkpointing" not in out
    code, out, err = cli("check", path, "--train", *[a for o in GPT_SMALL for a in ("--set", o)])
    assert code == 0 and "checkpointing    sqrt: 2 blocks recomputed in 2 segments" in out and "FLOPs per step" in out
