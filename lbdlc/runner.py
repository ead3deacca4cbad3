"""`lbdlc run` and `lbdlc bench` on a deployment bundle.

Both use the bundle's own runner code (lbdlc/bundle_runtime.py, copied into each bundle as
run.py), so `lbdlc run` computes exactly what `python run.py` computes on the device.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import bundle_runtime as rt
from .errors import SpecError


def _error(exc: rt.BundleError) -> SpecError:
    return SpecError(exc.message, hint=exc.hint)


def find_bundle(path: Path, target: str | None = None) -> Path:
    """A bundle directory, or a build directory and (when it has several) the target's name."""
    path = Path(path)
    if not path.is_dir():
        raise SpecError(f"{path}: no such directory", hint="give a bundle (<build>/deploy/<target>) or a build directory")
    manifest_path = path / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") == rt.FORMAT:
            return path
        bundles = sorted((manifest.get("deploy") or {}).keys())
        if target is not None:
            if target not in bundles:
                from .errors import did_you_mean

                raise SpecError(f"{path} has no bundle for target '{target}'",
                                hint=did_you_mean(target, bundles) or (f"its bundles: {', '.join(bundles)}" if bundles else
                                                                       f"build one: lbdlc build SPEC -o {path} --target {target}"))
            return path / "deploy" / target
        if len(bundles) == 1:
            return path / "deploy" / bundles[0]
        if bundles:
            raise SpecError(f"{path} has {len(bundles)} bundles: choose one", hint=" or ".join(f"{path}/deploy/{b}" for b in bundles) + " (or --target NAME)")
        raise SpecError(f"{path} is a build without deploy bundles", hint=f"build one: lbdlc build SPEC -o {path} --target cpu")
    raise SpecError(f"{path} is not an lbdlc bundle (no manifest.json)", hint="bundles are in <build>/deploy/<target>")


def open_bundle(path: Path, runtime: str | None = None, target: str | None = None):
    bundle = find_bundle(path, target)
    try:
        manifest = rt.read_manifest(bundle)
        return bundle, manifest, rt.open_session(bundle, runtime, manifest)
    except rt.BundleError as exc:
        raise _error(exc) from None


def run(path: Path, inputs: list[str], runtime: str | None = None, target: str | None = None):
    """(bundle, manifest, session, outputs) for --input items (FILE.npy, NAME=FILE.npy, FILE.npz)."""
    bundle, manifest, session = open_bundle(path, runtime, target)
    try:
        arrays = rt.load_inputs(manifest, inputs)
        return bundle, manifest, session, session.run(arrays)
    except rt.BundleError as exc:
        raise _error(exc) from None


def save(manifest: dict, outputs: list[np.ndarray], path: str) -> None:
    try:
        rt.save_outputs(manifest, outputs, path)
    except rt.BundleError as exc:
        raise _error(exc) from None


def bench(path: Path, runtimes: list[str] | None = None, dims: list[str] = (), runs: int = 50, warmup: int = 5,
          repeats: int = 3, target: str | None = None, seed: int = 0) -> tuple[Path, dict, list[dict], list[tuple[str, str]]]:
    """Latency of each runtime named (default: each of the bundle's runtimes that runs here) on
    the same random inputs. Returns (bundle, manifest, results, [(runtime, why skipped)])."""
    bundle = find_bundle(path, target)
    try:
        manifest = rt.read_manifest(bundle)
        inputs = rt.check_inputs(manifest, rt.random_inputs(manifest, rt.parse_dims(list(dims)), seed))
        results, skipped, first_error = [], [], None
        for r in runtimes or rt.runtimes(manifest):
            try:
                session = rt.open_session(bundle, r, manifest)
            except rt.BundleError as exc:
                if runtimes:  # asked for by name: an error
                    raise
                skipped.append((r, exc.message))
                first_error = first_error or exc
                continue
            results.append(rt.bench(session, inputs, runs, warmup, repeats))
        if not results:
            raise first_error or rt.BundleError("this bundle holds no model")
        return bundle, manifest, results, skipped
    except rt.BundleError as exc:
        raise _error(exc) from None
