"""`lbdlc build` output for quantized builds: the quantization report, and `--verify`
against the stated quantization bound (docs/quantization.md).

`--verify` semantics for a quantized build whose model.py stays fp32 (a spec with `train:`,
or any int8 build): the generated module is the fp32 reference; every quantized artifact must
stay within the quantization bound of lbdlc/quant_report.py (relative RMS error of each
output, on inputs from the spec's own `test` split when it has data, else random inputs), and
artifacts that compute the same quantized function (ONNX and TVM for block formats) must agree
with each other to the fp32 tolerance. A build whose model.py is quantized too is checked as
any build: all backends agree to the tolerance.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def print_report(manifest: dict, out) -> None:
    blocks = manifest.get("quantization") or []
    int8 = manifest.get("quantization_int8")
    if blocks:
        before, after = sum(r["bytes_before"] for r in blocks), sum(r["bytes_after"] for r in blocks)
        out.print(f"quantized {len(blocks)} matrices (weight-only blocks): {before:,} -> {after:,} bytes", markup=False)
        for r in blocks:
            err = f"  rel RMS error {r['rel_rms_error']:.3g}" if "rel_rms_error" in r else ""
            out.print(f"  {r['layer']:<28} {r['format']:<5} {r['bytes_before']:>12,} -> {r['bytes_after']:>10,} bytes{err}", markup=False)
        measured = manifest.get("quantization_outputs")
        if measured:
            _outputs(measured["outputs"], measured["samples"], out)
    if int8:
        cpu = int8["cpu"]
        vnni = "VNNI" if cpu.get("vnni") else ("no VNNI" if cpu.get("vnni") is False else "int8 extensions unknown")
        cal = int8.get("calibration")
        how = f", {cal['observer']} calibration" if cal else ""
        out.print(f"int8 {int8['method']}{how}: model.onnx {int8['onnx_bytes_before']:,} -> {int8['onnx_bytes_after']:,} bytes "
                  f"(per_channel {int8['per_channel']}, reduce_range {int8['reduce_range']}, {int8['weights']} weights; CPU {vnni})",
                  markup=False)
        qat = int8.get("qat")
        if qat:
            out.print(f"  activation ranges from training (qat): {len(qat['trained'])} from {qat['ranges_from']}, "
                      f"{len(qat['calibrated'])} calibrated", markup=False)
        for r in int8["layers"]:
            out.print(f"  {r['param']:<28} int8 weight: max |error| {r['max_abs_error']:.3g}, rel RMS {r['rel_rms_error']:.3g}", markup=False)
        _outputs(int8["outputs"], int8["samples"], out)
        for backend, what in int8["backends"].items():
            out.print(f"  {backend:<8} {what}", markup=False)


def _outputs(rows: list[dict], samples: str, out) -> None:
    for r in rows:
        out.print(f"  output {r['output']}: max |q - fp32| {r['max_abs_error']:.3g} (max |fp32| {r['max_abs_fp32']:.3g}), "
                  f"rel RMS error {r['rel_rms_error']:.3g} on {r['samples']} samples of {samples}", markup=False)


def verify(out_dir: Path, backends: tuple[str, ...], tolerance: float, out) -> bool | None:
    """--verify for a quantized build with an fp32 model.py; None when the ordinary check applies."""
    from .quant_report import bound_for, rel_rms
    from .verify import RUNNERS, manifest

    m = manifest(out_dir)
    found = bound_for(m)
    if found is None:
        return None
    bound, quantized = found
    if "pytorch" in quantized:
        return None
    inputs, source = _inputs(out_dir, m)
    reference = RUNNERS["pytorch"](out_dir, inputs)
    scale = max([1.0] + [float(abs(r).max()) for r in reference if r.size])
    results = {b: RUNNERS[b](out_dir, inputs) for b in backends if b != "pytorch"}
    ok = True
    for b, got in results.items():
        worst = max(rel_rms(g, r) for g, r in zip(got, reference))
        good = worst <= bound
        ok &= good
        out.print(f"  verify {b:<8} rel RMS error vs model.py {worst:.3g} (quantization bound {bound:g}) "
                  f"{'within' if good else 'OVER'}", markup=False)
    if not m.get("quantization_int8") and "onnx" in results and "tvm" in results:  # one quantized function, two backends
        d = max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(results["tvm"], results["onnx"]))
        good = d <= tolerance * scale
        ok &= good
        out.print(f"  verify tvm      max |diff| vs onnx {d:.2e} (allowed {tolerance * scale:.1e})", markup=False)
    out.print(f"  inputs: {len(next(iter(inputs.values())))} samples of {source}", markup=False)
    out.print("verify: within the quantization bound" if ok else "verify: DIFFER", markup=False)
    return ok


def _inputs(out_dir: Path, m: dict):
    from . import calibration as cal
    from .errors import SpecError, SpecErrors
    from .lower import load, lower
    from .verify import random_inputs

    try:
        loaded = load(m["spec"]["path"], m["build"]["overrides"])
        if cal.has_data(loaded):
            graph = lower(loaded)
            inputs, source = cal.samples(loaded, graph, "test", 16, seed=1)
            return {v["name"]: inputs[v["name"]] for v in m["model"]["inputs"]}, source
    except (SpecError, SpecErrors, OSError, KeyError, ImportError):  # the spec moved or its data is gone:
        pass  # random inputs still check the build
    return random_inputs(out_dir, int_high=2), "random inputs (symbolic dims 2, seed 0)"
