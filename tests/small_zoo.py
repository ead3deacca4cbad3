"""Helpers shared by the tests of the small book specs (dqn, vae, gan, gcn, unet_denoiser):
each spec is checked against a hand-written torch.nn reference whose parameter names are the
spec's, so the same weights load into both and the outputs can be compared."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lbdlc.driver import BuildOptions, build

from conftest import SPECS, perturbed_weights


def check_report(cli, name: str, *overrides: str) -> dict:
    """`lbdlc check specs/<name>.yaml --json` (with `--set` overrides) as a dict."""
    args = ["check", SPECS / f"{name}.yaml", "--json"]
    for o in overrides:
        args += ["--set", o]
    code, out, err = cli(*args)
    assert code == 0, err
    return json.loads(out)


def build_perturbed(name: str, tmp: Path, overrides: tuple[str, ...] = ()) -> Path:
    """One build of specs/<name>.yaml with seeded weights whose normalisation layers are far
    from the identity (conftest.perturbed_weights); returns the build directory."""
    spec = SPECS / f"{name}.yaml"
    save_file(perturbed_weights(spec, overrides), str(tmp / "weights.safetensors"))
    return build(spec, tmp / "build", BuildOptions(weights=tmp / "weights.safetensors", overrides=overrides)).out_dir


def generated_module(out_dir: Path) -> torch.nn.Module:
    """The generated model.py's Model with the build's weights, in eval mode."""
    name = f"_lbdlc_zoo_{abs(hash(Path(out_dir).resolve()))}"
    spec = importlib.util.spec_from_file_location(name, Path(out_dir) / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    model = module.Model()
    model.load_state_dict(load_file(str(Path(out_dir) / "weights.safetensors")))
    return model.eval()


def load_reference(reference: torch.nn.Module, out_dir: Path) -> torch.nn.Module:
    """The build's weights loaded into a torch.nn reference, which must have exactly the spec's
    parameter and buffer names and shapes (load_state_dict is strict)."""
    reference.load_state_dict(load_file(str(Path(out_dir) / "weights.safetensors")))
    return reference.eval()


def trainable_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
