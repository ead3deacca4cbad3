"""Every option of the training protocol changes what the generated train.py computes.

Each test builds a small spec, imports the functions of its train.py (make_data, augment,
loss_fn, make_optimizer, lr_factor/make_schedule, train_step, evaluate) and compares them with
an independent reference (formulas, torch's own schedulers and optimizers, scikit-learn's
metrics), so that a test fails if the option were ignored."""
import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training_util import build_train, load_train

MLP = """\
lbdlc: 1
name: small
inputs:
  x: {shape: [batch, 6]}
layers:
  - {name: fc1, op: linear, out_features: 8}
  - {name: norm, op: layer_norm}
  - {op: relu}
  - {name: head, op: linear, out_features: 4}
"""
DATA = "  data: {kind: synthetic, samples: 96}\n  batch_size: 8\n  steps: 4\n"


def spec(loss="{kind: cross_entropy}", optimizer="{kind: sgd, lr: 0.1}", extra="", data=DATA, model=MLP):
    return model + "train:\n" + data + f"  loss: {loss}\n  optimizer: {optimizer}\n" + extra


@pytest.fixture
def generated(tmp_path):
    """generated(spec_text, overrides=()) -> the imported train.py module."""
    return lambda text, overrides=(): load_train(build_train(tmp_path, text, overrides))


def run_main(module, tmp_path, *args):
    return module.main(["--out", str(tmp_path / "run"), "--init", "none", *map(str, args)])


# -- losses ----------------------------------------------------------------------------------

G = torch.Generator().manual_seed(0)
LOGITS = torch.randn(16, 4, generator=G) * 2
LABELS = torch.randint(0, 4, (16,), generator=G)
VALUES = torch.randn(16, 4, generator=G) * 2


def test_mse_and_l1(generated):
    mse = generated(spec("{kind: mse}")).loss_fn((LOGITS,), {"head": VALUES})
    assert torch.allclose(mse, ((LOGITS - VALUES) ** 2).mean())
    l1 = generated(spec("{kind: l1}")).loss_fn((LOGITS,), {"head": VALUES})
    assert torch.allclose(l1, (LOGITS - VALUES).abs().mean())


def test_smooth_l1_beta(generated):
    d = (LOGITS - VALUES).abs()
    beta = 0.5
    want = torch.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta).mean()
    got = generated(spec("{kind: smooth_l1, beta: 0.5}")).loss_fn((LOGITS,), {"head": VALUES})
    assert torch.allclose(got, want)
    assert not torch.allclose(got, F.smooth_l1_loss(LOGITS, VALUES))  # the default beta gives another value


def test_huber_delta(generated):
    d = (LOGITS - VALUES).abs()
    delta = 2.0
    want = torch.where(d <= delta, 0.5 * d**2, delta * (d - 0.5 * delta)).mean()
    got = generated(spec("{kind: huber, delta: 2.0}")).loss_fn((LOGITS,), {"head": VALUES})
    assert torch.allclose(got, want)
    assert not torch.allclose(got, F.huber_loss(LOGITS, VALUES))


def test_cross_entropy_label_smoothing(generated):
    eps = 0.2
    logp = LOGITS.log_softmax(-1)
    want = ((1 - eps) * -logp.gather(1, LABELS[:, None]).squeeze(1) + eps * -logp.mean(-1)).mean()
    got = generated(spec("{kind: cross_entropy, label_smoothing: 0.2}")).loss_fn((LOGITS,), {"head": LABELS})
    assert torch.allclose(got, want)
    plain = generated(spec("{kind: cross_entropy}")).loss_fn((LOGITS,), {"head": LABELS})
    assert torch.allclose(plain, -logp.gather(1, LABELS[:, None]).mean()) and not torch.allclose(plain, got)


def test_cross_entropy_ignore_index(generated):
    labels = LABELS.clone()
    labels[:5] = 3
    keep = labels != 3
    want = -LOGITS.log_softmax(-1)[keep].gather(1, labels[keep][:, None]).mean()
    got = generated(spec("{kind: cross_entropy, ignore_index: 3}")).loss_fn((LOGITS,), {"head": labels})
    assert torch.allclose(got, want)


def test_binary_cross_entropy_with_logits_and_pos_weight(generated):
    targets = (VALUES > 0).float()
    p = LOGITS.sigmoid()
    want = -(2.5 * targets * p.log() + (1 - targets) * (1 - p).log()).mean()
    got = generated(spec("{kind: binary_cross_entropy, pos_weight: 2.5}")).loss_fn((LOGITS,), {"head": targets})
    assert torch.allclose(got, want, atol=1e-6)


def test_nll_of_log_probabilities(generated):
    model = MLP + "  - {name: logp, op: log_softmax}\n"
    module = generated(spec("{kind: nll}", model=model))
    logp = LOGITS.log_softmax(-1)
    assert torch.allclose(module.loss_fn((logp,), {"logp": LABELS}), -logp.gather(1, LABELS[:, None]).mean())


@pytest.mark.parametrize("option", ["", ", input: log_probs", ", log_target: true"])
def test_kl_div(generated, option):
    q = VALUES.softmax(-1)  # target distribution
    inputs = LOGITS.log_softmax(-1) if "log_probs" in option else LOGITS
    target = q.log() if "log_target" in option else q
    got = generated(spec(f"{{kind: kl_div{option}}}")).loss_fn((inputs,), {"head": target})
    want = (q * (q.log() - LOGITS.log_softmax(-1))).sum() / len(q)
    assert torch.allclose(got, want, atol=1e-6)


LM = """\
lbdlc: 1
name: lm
inputs:
  tokens: {shape: [batch, seq], dtype: int64}
layers:
  - {name: wte, op: embedding, num_embeddings: 11, embedding_dim: 8}
  - {name: head, op: linear, out_features: 11}
"""


def test_next_token_loss_shifts_the_tokens(generated):
    data = "  data: {kind: synthetic, samples: 32, sizes: {seq: 6}}\n  batch_size: 4\n  steps: 2\n"
    module = generated(spec("{kind: next_token}", model=LM, data=data))
    tokens = torch.randint(0, 11, (3, 6), generator=G)
    logits = torch.randn(3, 6, 11, generator=G)
    logp = logits.log_softmax(-1)
    want = -torch.stack([logp[b, t, tokens[b, t + 1]] for b in range(3) for t in range(5)]).mean()
    assert torch.allclose(module.loss_fn((logits,), {"tokens": tokens}), want)
    split = module.make_data()
    assert split["train"]["tokens"].shape[1:] == (6,) and split["train"]["tokens"].max() < 11  # ids below the vocabulary


TWO_HEADS = """\
lbdlc: 1
name: two
inputs:
  x: {shape: [batch, 6]}
layers:
  - {name: fc1, op: linear, out_features: 8}
  - {name: cls, op: linear, out_features: 4}
  - {name: box, op: linear, in: fc1, out_features: 4}
outputs: [cls, box]
train:
  data: {kind: synthetic, samples: 64}
  batch_size: 8
  steps: 3
  losses:
    - {kind: cross_entropy, output: cls}
    - {kind: smooth_l1, output: box, weight: 0.25}
  optimizer: {kind: sgd, lr: 0.1}
"""


def test_weighted_sum_of_losses_over_several_outputs(generated):
    module = generated(TWO_HEADS)
    got = module.loss_fn((LOGITS, VALUES * 0.3), {"cls": LABELS, "box": VALUES})
    assert torch.allclose(got, F.cross_entropy(LOGITS, LABELS) + 0.25 * F.smooth_l1_loss(VALUES * 0.3, VALUES))
    data = module.make_data()["train"]
    assert data["cls"].dtype == torch.int64 and data["box"].dtype == torch.float32 and data["box"].shape[1:] == (4,)


# -- optimizers ------------------------------------------------------------------------------


def quadratic_steps(optimizer_factory, model, steps=3):
    """Run `steps` updates on a fixed quadratic loss; the flattened parameters after each."""
    optimizer = optimizer_factory(model)
    target = {n: torch.full_like(p, 0.3) for n, p in model.named_parameters()}
    trace = []
    for _ in range(steps):
        loss = sum(((p - target[n]) ** 2 * (1 + k)).sum() for k, (n, p) in enumerate(model.named_parameters()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trace.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
    return trace


@pytest.mark.parametrize("optimizer, reference", [
    ("{kind: sgd, lr: 0.05, momentum: 0.9, nesterov: true}", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True)),
    ("{kind: adam, lr: 0.01, betas: [0.8, 0.95], eps: 1e-6, amsgrad: true}", lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.95), eps=1e-6, amsgrad=True)),
    ("{kind: adamw, lr: 0.01, weight_decay: 0.3}", lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.3)),
    ("{kind: rmsprop, lr: 0.01, alpha: 0.9, momentum: 0.5, centered: true}", lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.9, momentum=0.5, centered=True)),
    ("{kind: adagrad, lr: 0.1, lr_decay: 0.01, initial_accumulator_value: 0.1}", lambda ps: torch.optim.Adagrad(ps, lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)),
])
def test_optimizers_follow_their_options(generated, optimizer, reference):
    module = generated(spec(optimizer=optimizer))
    torch.manual_seed(0)
    a = module.Model()
    b = module.Model()
    b.load_state_dict(a.state_dict())
    got = quadratic_steps(module.make_optimizer, a)
    want = quadratic_steps(lambda m: reference(m.parameters()), b)
    for x, y in zip(got, want):
        assert torch.allclose(x, y, atol=1e-6)
    defaults = quadratic_steps(lambda m: type(reference([torch.nn.Parameter(torch.zeros(1))]))(m.parameters(), lr=0.01), b)
    assert not torch.allclose(got[-1], defaults[-1], atol=1e-4)  # the options matter


def one_step(module, model, batch):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = module.loss_fn(module.forward(model, batch), batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    optimizer = module.make_optimizer(model)
    module.train_step(model, optimizer, [batch])
    return before, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_l2_penalty_is_in_the_loss_and_skips_no_decay(generated):
    module = generated(spec(optimizer="{kind: sgd, lr: 1.0, l2: 0.1, no_decay: [biases, norms]}"))
    torch.manual_seed(0)
    model = module.Model()
    batch = {k: v[:8] for k, v in module.make_data()["train"].items()}
    before, grads, after = one_step(module, model, batch)
    for name in before:
        decays = not (name.endswith(".bias") or name.startswith("norm."))
        want = before[name] - 1.0 * (grads[name] + (0.1 * before[name] if decays else 0))
        assert torch.allclose(after[name], want, atol=1e-6), name
    assert module.NO_DECAY == ("*.bias", "norm.*")


def test_decoupled_weight_decay_is_not_l2(generated):
    module = generated(spec(optimizer="{kind: adamw, lr: 0.1, weight_decay: 0.5, no_decay: [biases]}"))
    torch.manual_seed(0)
    model = module.Model()
    batch = {k: v[:8] for k, v in module.make_data()["train"].items()}
    before, grads, after = one_step(module, model, batch)
    for name in before:
        # First AdamW step: w <- w * (1 - lr * wd) - lr * sign-like(g) (m / sqrt(v) = g / |g|).
        wd = 0.0 if name.endswith(".bias") else 0.5
        want = before[name] * (1 - 0.1 * wd) - 0.1 * grads[name] / (grads[name].abs() + 1e-8)
        assert torch.allclose(after[name], want, atol=1e-5), name


def test_parameter_groups_get_their_own_settings(generated):
    module = generated(spec(optimizer='{kind: adamw, lr: 0.01, weight_decay: 0.1, groups: [{params: ["head.*"], lr: 0.5, weight_decay: 0.0}]}'))
    model = module.Model()
    optimizer = module.make_optimizer(model)
    head = {id(p) for n, p in model.named_parameters() if n.startswith("head.")}  # by IR name, not module structure
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        if ids and ids <= head:
            assert group["lr"] == 0.5 and group["weight_decay"] == 0.0
        elif ids:
            assert not ids & head and group["lr"] == 0.01 and group["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    schedule = module.make_schedule(optimizer, 10)
    assert schedule.get_last_lr()[0] == 0.5  # the schedule scales each group's own lr


# -- schedules -------------------------------------------------------------------------------


def lrs(module, total, lr=0.1):
    model = module.Model()
    optimizer = module.make_optimizer(model)
    schedule = module.make_schedule(optimizer, total)
    out = []
    for _ in range(total):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return out


def torch_lrs(make, total, lr=0.1):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = make(optimizer)
    out = []
    for _ in range(total):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return out


@pytest.mark.parametrize("schedule, reference", [
    ("{kind: step, step_size: 3, gamma: 0.5}", lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)),
    ("{kind: exponential, gamma: 0.8}", lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.8)),
    ("{kind: cosine, min_lr: 0.01}", lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20, eta_min=0.01)),
    ("{kind: linear, min_lr: 0.02}", lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=0.2, total_iters=20)),
    ("{kind: constant}", lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=1.0)),
])
def test_schedules_match_torch(generated, schedule, reference):
    module = generated(spec(extra=f"  schedule: {schedule}\n"))
    assert lrs(module, 20) == pytest.approx(torch_lrs(reference, 20), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("kind", ["constant", "cosine", "step, step_size: 2", "exponential, gamma: 0.9", "linear"])
def test_warmup_then_schedule(generated, kind):
    module = generated(spec(data=DATA.replace("steps: 4", "steps: 25"), extra=f"  schedule: {{kind: {kind}, warmup: 5, warmup_start: 0.2}}\n"))
    got = lrs(module, 25)
    assert got[:5] == pytest.approx([0.1 * (0.2 + 0.8 * k / 5) for k in range(5)])
    assert got[5] == pytest.approx(0.1)  # the schedule proper starts at the full lr
    plain = generated(spec(extra=f"  schedule: {{kind: {kind}}}\n"))
    assert got[5:] == pytest.approx(lrs(plain, 20)[:20] if kind in ("constant", "step, step_size: 2", "exponential, gamma: 0.9")
                                     else [0.1 * plain.lr_factor(k, 20) for k in range(20)])


# -- the optimizer step ------------------------------------------------------------------------


def test_gradient_clipping_bounds_the_update(generated):
    module = generated(spec(optimizer="{kind: sgd, lr: 1.0}", extra="  clip_grad_norm: 0.001\n"))
    torch.manual_seed(0)
    model = module.Model()
    batch = {k: v[:8] for k, v in module.make_data()["train"].items()}
    before, grads, after = one_step(module, model, batch)
    grad_norm = torch.cat([g.flatten() for g in grads.values()]).norm()
    step = torch.cat([(after[n] - before[n]).flatten() for n in before]).norm()
    assert grad_norm > 0.1  # unclipped, the step would be this long
    assert step == pytest.approx(0.001, rel=1e-3)


def test_gradient_accumulation_splits_the_batch_and_keeps_the_update(generated):
    accumulated = generated(spec(optimizer="{kind: sgd, lr: 0.5}", extra="  grad_accumulation: 4\n"))
    plain = generated(spec(optimizer="{kind: sgd, lr: 0.5}"))
    assert accumulated.GRAD_ACCUMULATION == 4
    torch.manual_seed(0)
    a = accumulated.Model()
    b = plain.Model()
    b.load_state_dict(a.state_dict())
    batch = {k: v[:8] for k, v in plain.make_data()["train"].items()}
    sizes = []
    a.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    micro = [{k: v[j::4] for k, v in batch.items()} for j in range(4)]
    accumulated.train_step(a, accumulated.make_optimizer(a), micro)
    plain.train_step(b, plain.make_optimizer(b), [batch])
    assert sizes == [2, 2, 2, 2]
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
    assert "[{k: v[j::GRAD_ACCUMULATION] for k, v in batch.items()} for j in range(GRAD_ACCUMULATION)]" in (
        open(accumulated.__file__).read())


def test_bf16_autocast(generated):
    module = generated(spec(extra="  precision: bf16\n"))
    model = module.Model()
    dtypes = []
    model.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))  # the output of the last linear layer
    batch = {k: v[:8] for k, v in module.make_data()["train"].items()}
    loss = module.train_step(model, module.make_optimizer(model), [batch])
    assert dtypes == [torch.bfloat16] and loss.dtype == torch.float32
    fp32 = generated(spec())
    model = fp32.Model()
    model.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    fp32.train_step(model, fp32.make_optimizer(model), [batch])
    assert dtypes[-1] == torch.float32


def test_fp16_needs_cuda_and_uses_a_grad_scaler(generated, tmp_path):
    module = generated(spec(extra="  precision: fp16\n"))
    source = open(module.__file__).read()
    assert 'torch.amp.GradScaler("cuda")' in source and "scaler.scale(" in source and "scaler.step(optimizer)" in source
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="fp16 training needs a CUDA device"):
            run_main(module, tmp_path, "--steps", 1)


def test_compile_flag_compiles_the_model(generated, tmp_path, monkeypatch):
    module = generated(spec(extra="  compile: true\n"))
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(type(model).__name__) or model)
    run_main(module, tmp_path, "--steps", 1)
    assert compiled == ["Small"]
    compiled.clear()
    run_main(generated(spec()), tmp_path, "--steps", 1)
    assert compiled == []


# -- length, evaluation, early stopping, metrics ------------------------------------------------


def metrics_rows(run):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_steps_and_epochs(generated, tmp_path):
    # 96 samples, 10% validation: 86 training samples, 10 batches of 8 per epoch.
    assert run_main(generated(spec(data=DATA.replace("steps: 4", "steps: 7"))), tmp_path)["steps"] == 7
    assert run_main(generated(spec(data=DATA.replace("steps: 4", "epochs: 2"))), tmp_path)["steps"] == 20
    assert run_main(generated(spec(data=DATA.replace("steps: 4", "epochs: 2"))), tmp_path, "--steps", 3)["steps"] == 3


def test_eval_every_n_steps(generated, tmp_path):
    module = generated(spec(data=DATA.replace("steps: 4", "steps: 7"), extra="  eval: {every: 3, metrics: [accuracy]}\n  log: {every: 1}\n"))
    run_main(module, tmp_path)
    rows = metrics_rows(tmp_path / "run")
    assert [r["step"] for r in rows if r["val_loss"]] == ["3", "6", "7"]
    assert [r["step"] for r in rows if r["train_loss"]] == [str(k) for k in range(1, 8)]
    assert all(0 <= float(r["val_accuracy"]) <= 1 for r in rows if r["val_loss"])


def test_early_stopping(generated, tmp_path):
    module = generated(spec(optimizer="{kind: sgd, lr: 1e-9}", data=DATA.replace("steps: 4", "steps: 40"),
                            extra="  eval: {every: 1}\n  early_stopping: {patience: 2, min_delta: 0.5}\n"))
    summary = run_main(module, tmp_path)
    assert summary["steps"] == 3  # no improvement after the first evaluation: stop after two more
    assert metrics_rows(tmp_path / "run")[-1]["step"] == "3"
    assert (tmp_path / "run" / "best.safetensors").exists()
    patient = generated(spec(optimizer="{kind: sgd, lr: 1e-9}", data=DATA.replace("steps: 4", "steps: 40"), extra="  eval: {every: 1}\n"))
    assert run_main(patient, tmp_path)["steps"] == 40


def test_classification_metrics_match_scikit_learn(generated):
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    module = generated(spec(data="  data: {kind: synthetic, samples: 200}\n  batch_size: 8\n  steps: 4\n",
                            extra="  eval: {metrics: [accuracy, precision, recall, f1, perplexity], batch_size: 7}\n"))
    torch.manual_seed(1)
    model = module.Model()
    data = module.make_data()["train"]
    metrics = module.evaluate(model, data)
    with torch.no_grad():
        logits = model(data["x"])
    y, p = data["head"].numpy(), logits.argmax(-1).numpy()
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert metrics["precision"] == pytest.approx(precision_score(y, p, average="macro", zero_division=0))
    assert metrics["recall"] == pytest.approx(recall_score(y, p, average="macro", zero_division=0))
    assert metrics["f1"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    ce = F.cross_entropy(logits, data["head"]).item()
    assert metrics["loss"] == pytest.approx(ce, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(ce), rel=1e-5)


def test_mse_metric(generated):
    module = generated(spec("{kind: l1}", extra="  eval: {metrics: [mse]}\n"))
    model = module.Model()
    data = module.make_data()["val"]
    with torch.no_grad():
        out = model(data["x"])
    metrics = module.evaluate(model, data)
    assert metrics["mse"] == pytest.approx(((out - data["head"]) ** 2).mean().item(), rel=1e-5)
    assert metrics["loss"] == pytest.approx((out - data["head"]).abs().mean().item(), rel=1e-5)


# -- data ----------------------------------------------------------------------------------------


DIGITS_MODEL = MLP.replace("[batch, 6]", "[batch, 1, 12, 12]").replace("layers:\n", "layers:\n  - {op: flatten}\n").replace(
    "out_features: 4}", "out_features: 10}")


def test_digits_resize_and_splits(generated):
    from sklearn.datasets import load_digits

    data = "  data: {kind: digits, resize: [12, 12], split: {val: 0.1, test: 0.2, seed: 5}}\n  batch_size: 8\n  steps: 4\n"
    module = generated(spec(model=DIGITS_MODEL, data=data))
    splits = module.make_data()
    assert {k: len(v["head"]) for k, v in splits.items()} == {"test": 359, "val": 180, "train": 1258}
    digits = load_digits()
    images = F.interpolate(torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16, size=(12, 12), mode="bilinear")
    every = torch.cat([splits[k]["x"] for k in ("train", "val", "test")])
    labels = torch.cat([splits[k]["head"] for k in ("train", "val", "test")])
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(5))
    order = torch.cat([order[539:], order[359:539], order[:359]])
    assert torch.equal(every, images[order]) and torch.equal(labels, torch.tensor(digits.target)[order])
    other = generated(spec(model=DIGITS_MODEL, data=data.replace("seed: 5", "seed: 6"))).make_data()
    assert not torch.equal(other["test"]["x"], splits["test"]["x"])  # the split seed is used


def test_digits_flattened(generated):
    model = MLP.replace("[batch, 6]", "[batch, 64]").replace("out_features: 4}", "out_features: 10}")
    module = generated(spec(model=model, data="  data: {kind: digits, flatten: true}\n  batch_size: 8\n  steps: 4\n"))
    splits = module.make_data()
    assert splits["train"]["x"].shape[1:] == (64,) and float(splits["train"]["x"].max()) == 1.0


def test_synthetic_data_is_shaped_and_learnable(generated):
    module = generated(spec(data="  data: {kind: synthetic, samples: 400, split: {val: 0.25}}\n  batch_size: 8\n  steps: 4\n"))
    splits = module.make_data()
    assert splits["train"]["x"].shape == (300, 6) and splits["val"]["head"].shape == (100,)
    # The targets come from a linear teacher: a linear classifier separates them.
    x, y = splits["train"]["x"], splits["train"]["head"]
    w = torch.zeros(6, 4, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(x @ w, y).backward()
        opt.step()
    assert (x @ w).argmax(-1).eq(y).float().mean() > 0.9
    assert len(set(y.tolist())) == 4


def test_npz_and_npy_files(generated, tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 6)).astype(np.float64), rng.integers(0, 4, 40)
    np.savez(tmp_path / "d.npz", feats=x, labels=y)
    module = generated(spec(data="  data: {kind: npz, path: d.npz, inputs: {x: feats}, targets: {head: labels}, split: {val: 0.25}}\n"
                                 "  batch_size: 8\n  steps: 4\n"))
    splits = module.make_data()
    assert splits["train"]["x"].dtype == torch.float32 and splits["train"]["head"].dtype == torch.int64
    got = torch.cat([splits["train"]["x"], splits["val"]["x"]])
    assert sorted(got[:, 0].tolist()) == pytest.approx(sorted(x[:, 0].tolist()))
    assert module.DATA == (tmp_path / "d.npz").as_posix()
    np.savez(tmp_path / "bad.npz", feats=x[:, :5], labels=y)
    with pytest.raises(SystemExit, match=r"x has samples of shape \[5\], the model needs \[6\]"):
        module.make_data(str(tmp_path / "bad.npz"))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    module = generated(spec(data="  data: {kind: npy, inputs: {x: x.npy}, targets: {head: y.npy}}\n  batch_size: 8\n  steps: 4\n"))
    splits = module.make_data()
    assert sum(len(s["x"]) for s in splits.values()) == 40 and splits["val"]["head"].dtype == torch.int64


def test_csv_with_named_columns_and_class_names(generated, tmp_path):
    lines = ["a,b,c,d,e,f,g,species"] + [",".join(str(k * 10 + j) for j in range(7)) + f",{['setosa', 'virginica'][k % 2]}" for k in range(20)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    data = '  data: {kind: csv, path: t.csv, target: species, features: [a, b, c, d, e, g], split: {val: 0.0}}\n  batch_size: 4\n  steps: 2\n'
    module = generated(spec(data=data))
    train = module.make_data()["train"]
    assert train["x"].shape == (20, 6)
    for row, label in zip(train["x"].tolist(), train["head"].tolist()):
        k = int(row[0]) // 10
        assert row == [k * 10 + j for j in (0, 1, 2, 3, 4, 6)] and label == k % 2


def test_text_char_and_byte_tokenizers(generated, tmp_path):
    text = "hello world, the quick brown fox. " * 10
    (tmp_path / "c.txt").write_text(text)
    model = LM.replace("num_embeddings: 11", "num_embeddings: 32").replace("out_features: 11", "out_features: 32")
    data = "  data: {kind: text, path: c.txt, seq_len: 8, stride: 3, split: {val: 0.2}}\n  batch_size: 4\n  steps: 2\n"
    module = generated(spec("{kind: next_token}", model=model, data=data))
    splits, chars = module.make_data()
    assert "".join(chars) == "".join(sorted(set(text)))
    train, val = splits["train"]["tokens"], splits["val"]["tokens"]
    n_val = round(len(text) * 0.2)
    assert "".join(chars[i] for i in train[0]) == text[:8] and "".join(chars[i] for i in train[1]) == text[3:11]
    assert "".join(chars[i] for i in val[0]) == text[len(text) - n_val:][:8]  # validation: the tail
    assert len(train) == (len(text) - n_val - 8) // 3 + 1 and len(val) == n_val // 8
    byte_model = model.replace("num_embeddings: 32", "num_embeddings: 256").replace("out_features: 32", "out_features: 256")
    module = generated(spec("{kind: next_token}", model=byte_model, data=data.replace("stride: 3", "tokenizer: byte")))
    splits, vocab = module.make_data()
    assert vocab is None and bytes(splits["train"]["tokens"][1].tolist()) == text[1:9].encode()


def test_text_vocabulary_too_large_for_the_model(generated, tmp_path):
    (tmp_path / "c.txt").write_text("abcdefghijklmnopqrstuvwxyz")
    module = generated(spec("{kind: next_token}", model=LM, data="  data: {kind: text, path: c.txt, seq_len: 4}\n  batch_size: 2\n  steps: 2\n"))
    with pytest.raises(SystemExit, match="26 distinct characters, the model's vocabulary only 11"):
        module.make_data()


def augment_module(generated, augment):
    model = MLP.replace("[batch, 6]", "[batch, 2, 6, 5]").replace("layers:\n", "layers:\n  - {op: flatten}\n")
    data = f"  data: {{kind: synthetic, samples: 32, augment: {augment}}}\n  batch_size: 8\n  steps: 4\n"
    return generated(spec("{kind: mse}", model=model, data=data))


def test_random_crop_with_padding(generated):
    module = augment_module(generated, "{crop: {padding: 2}}")
    x = torch.randn(16, 2, 6, 5)
    torch.manual_seed(0)
    y = module.augment({"x": x, "head": torch.zeros(16, 4)})["x"]
    padded = F.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(16):
        match = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(y[i], padded[i, :, dy:dy + 6, dx:dx + 5])]
        assert match, i
        offsets.add(match[0])
    assert len(offsets) > 3  # random offsets, not one fixed window


def test_flip_and_noise(generated):
    module = augment_module(generated, "{flip: true}")
    x = torch.randn(64, 2, 6, 5)
    torch.manual_seed(0)
    y = module.augment({"x": x})["x"]
    flipped = [torch.equal(y[i], x[i].flip(-1)) for i in range(64)]
    assert all(f or torch.equal(y[i], x[i]) for i, f in enumerate(flipped))
    assert 16 < sum(flipped) < 48
    noisy = augment_module(generated, "{noise: 0.3}")
    y = noisy.augment({"x": torch.zeros(64, 2, 6, 5)})["x"]
    assert float(y.std()) == pytest.approx(0.3, rel=0.1)


# -- seeds ---------------------------------------------------------------------------------------


def test_one_seed_for_python_numpy_and_torch(generated):
    import random

    module = generated(spec())
    draws = []
    for _ in range(2):
        module.seed_everything(7)
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(()))))
    assert draws[0] == draws[1]
    module.seed_everything(8)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) != draws[0]
    assert not hasattr(module, "DETERMINISTIC")


def test_deterministic_mode(generated):
    module = generated(spec(extra="").replace("train:\n", "train:\n  deterministic: true\n"))
    assert module.DETERMINISTIC is True
    try:
        module.seed_everything(0)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_weights_keep_the_spec_parameter_names(generated, tmp_path):
    from safetensors.torch import load_file

    from lbdlc.lower import load, lower

    text = spec(optimizer="{kind: adam, lr: 0.01}")
    module = generated(text)
    run_main(module, tmp_path)
    (tmp_path / "s.yaml").write_text(text)
    params = lower(load(tmp_path / "s.yaml")).params
    assert set(load_file(str(tmp_path / "run" / "weights.safetensors"))) == set(params)
    assert set(load_file(str(tmp_path / "run" / "checkpoint" / "weights.safetensors"))) == set(params)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and "loss" in summary["val"]


# -- objectives of the book's other models: VAE, CLIP ----------------------------------------------


def vae_spec(loss: str) -> str:
    from conftest import SPECS

    return (f"lbdlc: 1\nextends: {(SPECS / 'vae.yaml').as_posix()}\nvars: {{hidden: 32, latent: 4}}\ntrain:\n"
            "  data: {kind: digits, resize: [28, 28], split: {val: 0.1, test: 0.1}}\n  batch_size: 16\n  steps: 6\n"
            f"  loss: {loss}\n  optimizer: {{kind: adam, lr: 0.001}}\n")


def test_vae_negative_elbo(generated, tmp_path):
    module = generated(vae_spec("{kind: vae, output: recon_logits, mu: mu, logvar: logvar}"))
    x = torch.rand(5, 1, 28, 28, generator=G)
    recon, mu, logvar = torch.randn(5, 1, 28, 28, generator=G), torch.randn(5, 4, generator=G), torch.randn(5, 4, generator=G) * 0.3
    p = recon.sigmoid()
    bce = -(x * p.log() + (1 - x) * (1 - p).log()).sum()
    kl = sum(0.5 * (m**2 + v.exp() - 1 - v).sum() for m, v in zip(mu, logvar))  # KL(N(m, e^v) || N(0, 1)) per sample
    got = module.loss_fn((recon, mu, logvar), {"image": x})
    assert got == pytest.approx(float((bce + kl) / 5), rel=1e-5)
    splits = module.make_data()
    assert set(splits["train"]) == {"image"}  # an autoencoder needs no labels
    summary = run_main(module, tmp_path, "--steps", 12)
    assert summary["val"]["loss"] < 543.4  # below 784 * ln 2, the loss of predicting 1/2 everywhere
    mse = generated(vae_spec("{kind: vae, output: recon_logits, mu: mu, logvar: logvar, reconstruction: mse, beta: 0.5}"))
    got = mse.loss_fn((recon, mu, logvar), {"image": x})
    assert got == pytest.approx(float((((recon - x) ** 2).sum() + 0.5 * kl) / 5), rel=1e-5)


def test_clip_symmetric_cross_entropy(generated, tmp_path):
    from conftest import SPECS

    text = (f"lbdlc: 1\nextends: {(SPECS / 'clip.yaml').as_posix()}\n"
            "vars: {image_size: 32, patch: 16, vision_layers: 1, vision_width: 32, vision_heads: 2, vocab: 50, context: 8,"
            " text_layers: 1, text_width: 32, text_heads: 2, embed_dim: 16}\n"
            "train:\n  data: {kind: synthetic, samples: 48, sizes: {seq: 8}}\n  batch_size: 8\n  steps: 3\n"
            "  loss: {kind: clip, output: logits_per_image}\n  optimizer: {kind: adamw, lr: 0.001}\n")
    module = generated(text)
    logits = torch.randn(6, 6, generator=G)
    logp_rows, logp_cols = logits.log_softmax(1), logits.log_softmax(0)
    want = -(logp_rows.diag().mean() + logp_cols.diag().mean()) / 2
    assert module.loss_fn((logits, logits.t()), {}) == pytest.approx(float(want), rel=1e-6)
    assert run_main(module, tmp_path)["steps"] == 3
