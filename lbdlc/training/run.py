"""`lbdlc train`: build model.py and train.py (PyTorch backend), then run train.py.

The build goes to the output directory as `lbdlc build` would write it; the run (weights,
checkpoint, metrics) to `<output>/run`, which survives the rebuild so that `--resume`
continues a previous run. train.py runs in a subprocess, exactly as a user would run it
(`python train.py`, or `python -m torch.distributed.run --nproc_per_node N train.py`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import SpecError
from ..source import loc_of


@dataclass
class TrainOptions:
    steps: int | None = None
    epochs: int | None = None
    seed: int | None = None
    device: str | None = None
    nproc: int = 1
    resume: bool = False
    stop_at: int | None = None


def prepare(spec_path: Path, out_dir: Path, overrides: tuple[str, ...], strict: bool, weights: Path | None = None):
    """Build the PyTorch side of a spec with a `train:` section; keeps `<out_dir>/run`."""
    from ..driver import BuildOptions, build
    from ..lower import load, lower
    from .check import plan

    loaded = load(spec_path, overrides)
    if getattr(loaded.spec, "train", None) is None:
        raise SpecError(f"{spec_path} has no `train:` section: nothing says how to train it", loc_of(loaded.raw, ()),
                        hint="add one (docs/training.md has a complete example), or use `lbdlc build`")
    protocol = plan(loaded, lower(loaded, strict))
    for k, path in enumerate(protocol.data_paths):
        if not Path(path).exists():
            where = ("data", "path") if protocol.train.data.kind != "npy" else ("data",)
            raise SpecError(f"no such data file: {path}", loc_of(loaded.raw, ("train",) + where),
                            hint="paths are relative to the spec's folder")
    run_dir = out_dir / "run"
    kept = out_dir.parent / f".{out_dir.name}.run-kept"
    if run_dir.is_dir():
        shutil.rmtree(kept, ignore_errors=True)
        run_dir.rename(kept)
    try:
        result = build(spec_path, out_dir, BuildOptions(backends=("pytorch",), overrides=overrides, strict=strict, weights=weights))
    finally:
        if kept.is_dir():
            out_dir.mkdir(parents=True, exist_ok=True)
            kept.rename(run_dir)
    return result


def command(out_dir: Path, options: TrainOptions) -> list[str]:
    script = ["train.py", "--out", "run"]
    for flag, value in (("--steps", options.steps), ("--epochs", options.epochs), ("--seed", options.seed),
                        ("--device", options.device), ("--stop-at", options.stop_at)):
        if value is not None:
            script += [flag, str(value)]
    if options.resume:
        script.append("--resume")
    if options.nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={options.nproc}"] + script
    return [sys.executable] + script


def run(out_dir: Path, options: TrainOptions) -> int:
    """Run the generated train.py in `out_dir`; its exit status."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # train.py needs only model.py beside it
    return subprocess.call(command(out_dir, options), cwd=out_dir, env=env)
