"""How close MetaSchedule-tuned TVM gets to ONNX Runtime on this CPU (`lbdlc build --tune N`).

For one spec (default ResNet-50, batch 1), two deploy bundles for the host CPU:

- untuned: `lbdlc build SPEC -O2 --target cpu`: the TVM library with lbdlc's default CPU schedules,
  and the same model as model.onnx;
- tuned: `lbdlc build SPEC -O2 --target cpu --tune N`: MetaSchedule, N trials, whose database
  starts from lbdlc's default schedule of every kernel (lbdlc/tune.py), so each kernel keeps
  the faster of the two. The database stays in the output directory: running the script again
  with the same N reuses it (no tuning), a larger N tunes again.

Then, in rounds (order rotating), each of ONNX Runtime (untuned bundle's model.onnx), TVM
untuned and TVM tuned is timed by `lbdlc bench` in a fresh process of its own, so no other
runtime's thread pool shares the 2 cores with it. Prints a table: median latency over the
rounds, the spread of round medians, and each ratio to ONNX Runtime.

    python benchmarks/tune.py --trials 2000                 # resnet50: about an hour of tuning on 2 cores
    python benchmarks/tune.py --spec specs/lenet.yaml --trials 64 --out /tmp/tune-lenet
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LBDLC = [sys.executable, "-c", "from lbdlc.cli import main; main()"]


def build(spec: Path, out: Path, tune: int | None) -> float:
    """`lbdlc build SPEC -O2 --target cpu [--tune N]` into out (batch norms folded, convolutions
    fused with their tails, as a deployment is built); seconds it took."""
    command = [*LBDLC, "build", str(spec), "-o", str(out), "-O2", "--target", "cpu", "-b", "onnx", "-b", "tvm"]
    if tune:
        command += ["--tune", str(tune)]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.perf_counter() - start


def bench(bundle: Path, runtime: str, runs: int) -> float:
    """Median latency (ms) of one round of `runs` calls, in a fresh process."""
    out = subprocess.run([*LBDLC, "bench", str(bundle), "-r", runtime, "--runs", str(runs), "--repeats", "1", "--json"],
                         check=True, capture_output=True, text=True, cwd=ROOT).stdout
    (result,) = json.loads(out[out.index("{"):])["results"]
    return float(result["median_ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=ROOT / "specs" / "resnet50.yaml")
    parser.add_argument("--trials", type=int, default=2000, help="MetaSchedule trials (--tune N)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/lbdlc-tune-bench"), help="build directories (keeps the database)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20, help="timed calls per round")
    args = parser.parse_args()

    seconds = {"untuned": build(args.spec, args.out / "untuned", None),
               "tuned": build(args.spec, args.out / "tuned", args.trials)}
    tuning = json.loads((args.out / "tuned" / "manifest.json").read_text())["tuning"]["cpu"]
    variants = {"ONNX Runtime": (args.out / "untuned" / "deploy" / "cpu", "onnx"),
                "TVM, lbdlc default schedules": (args.out / "untuned" / "deploy" / "cpu", "tvm"),
                f"TVM, --tune {args.trials}": (args.out / "tuned" / "deploy" / "cpu", "tvm")}
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            rounds[name].append(bench(*variants[name], args.runs))
            print(f"  round {r + 1}: {name:32} {rounds[name][-1]:9.2f} ms", flush=True)

    base = statistics.median(rounds["ONNX Runtime"])
    print(f"\n{args.spec.name}, batch 1, {args.rounds} rounds x {args.runs} calls, a fresh process per runtime per round")
    print(f"tuning: {tuning['trials']} trials over {tuning['tasks']} tasks, "
          + ("reused the database" if tuning["reused"] else f"build with tuning {seconds['tuned']:.0f} s"))
    print("\n| runtime | median latency (ms) | round medians (ms) | vs ONNX Runtime |\n|---|---:|---:|---:|")
    for name, values in rounds.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {min(values):.1f}–{max(values):.1f} | {median / base:.2f}× |")


if __name__ == "__main__":
    main()
