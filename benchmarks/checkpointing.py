"""Activation checkpointing: memory saved and step time paid, none vs sqrt vs selective vs budget, in one run.

A 24-block GPT at small width (specs/gpt2.yaml with overrides) is built four times with a
training protocol whose `checkpointing:` is `none`, `sqrt`, `selective` and `{budget: B}` (by default B
is halfway between the peak with every block recomputed and the peak without
checkpointing, both predicted). For each build the script imports the generated model.py and
train.py, copies one set of weights into all four, and measures

- the activations kept for backward after the forward pass (saved_tensors_hooks and the
  storages the forward leaves alive, which include a selective policy's cache, once per
  storage: lbdlc.memory.measure_kept) and the peak of a training step (PeakMeter), next
  to lbdlc's static predictions (lbdlc check --train, device cpu);
- the median time of `train_step` (AdamW, next-token loss), steps alternating between the
  four models after a warm-up.

    python benchmarks/checkpointing.py                    # 24 blocks, d_model 64, batch 8 x 128 tokens
    python benchmarks/checkpointing.py --d-model 128 --reps 9 --budget 200MB
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def protocol(seq: int, batch: int, policy: str) -> str:
    return (f"train={{data: {{kind: synthetic, samples: 64, sizes: {{seq: {seq}}}}}, batch_size: {batch}, steps: 1, "
            f"loss: {{kind: next_token}}, optimizer: {{kind: adamw, lr: 0.0003}}, checkpointing: {policy}}}")


def build(work: Path, name: str, overrides: tuple[str, ...]):
    """Build specs/gpt2.yaml with these overrides; import its train.py (which imports model.py)."""
    from lbdlc.driver import BuildOptions
    from lbdlc.driver import build as run_build

    result = run_build(ROOT / "specs" / "gpt2.yaml", work / name, BuildOptions(backends=("pytorch",), overrides=overrides))
    sys.modules.pop("model", None)
    sys.path.insert(0, str(result.out_dir))
    try:
        spec = importlib.util.spec_from_file_location(f"train_{name}", result.out_dir / "train.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(result.out_dir))
    return module, result.manifest.get("checkpointing")


def predicted(overrides: tuple[str, ...]) -> tuple[int, int, object]:
    """lbdlc's prediction on the CPU: (activations, peak, plan)."""
    from lbdlc.checkpointing import plan_for_spec, train_config
    from lbdlc.lower import load, lower
    from lbdlc.memory import estimate

    loaded = load(ROOT / "specs" / "gpt2.yaml", list(overrides))
    graph = lower(loaded)
    config = train_config(loaded, graph, device="cpu")
    plan = plan_for_spec(loaded, graph, config)
    report = estimate(graph, config, losses=loaded.spec.train.loss_list(), plan=plan)
    return report.activations, report.peak, plan


def measured_peak(gen, model, optimizer, batch) -> int:
    from lbdlc.memory import PeakMeter

    meter = PeakMeter()
    with meter:
        gen.train_step(model, optimizer, [batch])
    state = list(model.parameters()) + list(model.buffers()) + list(batch.values())
    state += [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in state) + meter.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--budget", default=None, help="the budget policy's peak, e.g. 200MB (default: see above)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lbdlc.memory import human_size

    model_args = (f"n_layer={args.layers}", f"d_model={args.d_model}", f"n_head={args.heads}", f"vocab={args.vocab}",
                  f"ctx={args.seq}", "dropout=0.0")
    with_policy = lambda p: model_args + (protocol(args.seq, args.batch, p),)
    budget = args.budget
    if budget is None:
        least = predicted(with_policy("all"))[1]
        most = predicted(with_policy("none"))[1]
        budget = str((least + most) // 2)
    policies = {"none": "none", "sqrt": "sqrt", "selective": "selective", "budget": f"{{budget: {budget}}}"}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, policy in policies.items():
            gen, manifest = build(Path(tmp), name, with_policy(policy))
            runs[name] = {"gen": gen, "manifest": manifest, "prediction": predicted(with_policy(policy))}
    torch.manual_seed(0)
    base = runs["none"]["gen"].Model()
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq))
    batch = {"tokens": tokens}
    from lbdlc.memory import measure_kept

    for name, run in runs.items():
        model = run["gen"].Model()
        model.load_state_dict(base.state_dict())
        model.train()
        run["model"], run["optimizer"] = model, run["gen"].make_optimizer(model)
        run["saved"] = measure_kept(model, tokens)
        run["gen"].train_step(model, run["optimizer"], [batch])  # warm-up: creates the optimizer state outside the meter
        run["peak"] = measured_peak(run["gen"], model, run["optimizer"], batch)
        run["times"] = []
    order = list(runs)
    for k in range(1 + args.reps):
        for name in order if k % 2 == 0 else order[::-1]:
            run = runs[name]
            start = time.perf_counter()
            run["gen"].train_step(run["model"], run["optimizer"], [batch])
            if k:
                run["times"].append(time.perf_counter() - start)
    params = sum(p.numel() for p in base.parameters())
    print(f"GPT, {args.layers} blocks, d_model {args.d_model}, {args.heads} heads, vocab {args.vocab}: {params:,} parameters; "
          f"batch {args.batch} x {args.seq} tokens, AdamW, {torch.get_num_threads()} threads, median of {args.reps} steps")
    print()
    print("| policy | recomputed | activations kept: measured (predicted) | peak: measured (predicted) | step (ms) | step time vs none |")
    print("|---|---|---:|---:|---:|---:|")
    none_time = statistics.median(runs["none"]["times"])
    for name, run in runs.items():
        acts, peak, plan = run["prediction"]
        what = "-" if plan is None else plan.describe().split(" (")[0] + (" selectively" if plan.selective else "")
        label = name if name != "budget" else f"budget {human_size(int(plan.budget))}"
        t = statistics.median(run["times"])
        print(f"| {label} | {what} | {human_size(run['saved'])} ({human_size(acts)}) | {human_size(run['peak'])} ({human_size(peak)}) "
              f"| {1000 * t:.1f} | {t / none_time:.2f}x |")


if __name__ == "__main__":
    main()
