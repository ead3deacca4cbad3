"""Helpers for the training tests: build a spec's train.py and import its functions."""
from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

_COUNTER = itertools.count()


def build_train(tmp_path: Path, text: str, overrides=(), name: str | None = None) -> Path:
    """Write `text` as a spec, build its PyTorch side (model.py, train.py); the build directory."""
    from lbdlc.driver import BuildOptions, build

    k = next(_COUNTER)
    spec = tmp_path / (name or f"spec{k}.yaml")
    spec.write_text(text, encoding="utf-8")
    out = tmp_path / f"build{k}"
    build(spec, out, BuildOptions(backends=("pytorch",), overrides=tuple(overrides)))
    return out


def load_train(out_dir: Path):
    """Import a generated train.py (with its model.py) as a fresh module."""
    sys.modules.pop("model", None)
    sys.path.insert(0, str(out_dir))
    try:
        spec = importlib.util.spec_from_file_location(f"_generated_train_{next(_COUNTER)}", out_dir / "train.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(out_dir))
        sys.modules.pop("model", None)
    return module
