"""Deployment targets: named presets, raw TVM target dicts, and what building for each needs.

A target is written in a spec (`deploy: {targets: [...]}`) or on the command line
(`lbdlc build --target ...`) as

- a preset name, `lbdlc targets` lists them: `cpu`, `arm64`, `rpi4`, `jetson-orin-nano`,
  `cuda`, `h100`; options follow a colon: `h100:fp16` (half-precision weights and compute),
  `arm64:so` (insist on a ready shared library, which needs the cross compiler);
- a raw TVM target dict, `{kind: llvm, mtriple: riscv64-linux-gnu, mattr: [+m, +a]}`,
  with optional keys `name` (the bundle's directory), `precision` and `so` that are ours,
  not TVM's. On the command line the dict is JSON: `--target '{"kind": "llvm", ...}'`.

Each target becomes one self-contained bundle (lbdlc/bundle.py). Building never needs the
target's hardware: CPU code for another architecture is emitted as a .tar of object files
(and linked into a .so when the cross compiler is installed); CUDA code is emitted as CUDA C
that TVM compiles when the library is loaded on the GPU machine. Only the `cuda` preset,
"this machine's GPU", needs a GPU at build time, to know which one it is.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import SpecError, did_you_mean

OPTIONS = {"fp16": "half-precision weights and compute (fp32 inputs, outputs and accumulation)",
           "so": "insist on a shared library (.so) for another CPU architecture: needs its cross compiler"}
PRECISIONS = ("fp32", "fp16")
OURS = ("name", "precision", "so")  # keys of a raw target dict that are lbdlc's, not TVM's

# Cross compilers by CPU architecture: (command, Debian/Ubuntu package).
TOOLCHAINS = {
    "aarch64": ("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu"),
    "x86_64": ("x86_64-linux-gnu-g++", "g++-x86-64-linux-gnu"),
    "riscv64": ("riscv64-linux-gnu-g++", "g++-riscv64-linux-gnu"),
    "arm": ("arm-linux-gnueabihf-g++", "g++-arm-linux-gnueabihf"),
}
ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64", "armv7": "arm", "armv7l": "arm", "armv7a": "arm", "i686": "i386"}
# ELF e_machine of each architecture, for checking produced objects.
ELF_MACHINES = {"x86_64": 62, "aarch64": 183, "riscv64": 243, "arm": 40, "i386": 3}


def normalize_arch(arch: str) -> str:
    return ARCH_ALIASES.get(arch, arch)


def host_arch() -> str:
    return normalize_arch(platform.machine().lower())


def host_cpu_name() -> str:
    """LLVM's name for this machine's CPU (e.g. znver3, skylake-avx512, cortex-a72): it implies
    the SIMD features (AVX2, AVX-512, NEON, ...) the generated code may use."""
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def host_target() -> dict:
    """The `cpu` preset: this machine's CPU, its SIMD features implied by LLVM's CPU name."""
    config: dict[str, Any] = {"kind": "llvm", "mcpu": host_cpu_name(), "num-cores": max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))}
    if host_arch() == "aarch64":
        config["mattr"] = ["+neon"]
    return config


AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
RPI4_TAG = "raspberry-pi/4b-aarch64"
# What TVM's raspberry-pi tag says, for a TVM without the tag.
RPI4 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"], "num-cores": 4}
CUDA_LIMITS = {"max_num_threads": 1024, "thread_warp_size": 32, "max_threads_per_block": 1024,
               "max_shared_memory_per_block": 49152, "registers_per_block": 65536}


def _rpi4() -> dict | str:
    from tvm.target import tag

    return RPI4_TAG if RPI4_TAG in tag.list_tags() else dict(RPI4)


def gpu_present() -> bool:
    """Whether TVM sees a CUDA GPU here (a driver and a device)."""
    try:
        import tvm

        return bool(tvm.runtime.enabled("cuda") and tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001 - no CUDA runtime at all
        return False


def _local_cuda() -> dict:
    if not gpu_present():
        raise SpecError(
            "target 'cuda' builds for this machine's GPU, and this machine has none (TVM finds no CUDA device)",
            hint="name the GPU instead (--target h100, --target jetson-orin-nano, or a raw target such as "
                 "{kind: cuda, arch: sm_89}); to use a local GPU, install the NVIDIA driver (the `nvidia-driver` package "
                 "or NVIDIA's installer) so that libcuda.so is found",
        )
    import tvm

    arch = "sm_" + str(tvm.cuda(0).compute_version).replace(".", "")
    return {"kind": "cuda", "arch": arch, **CUDA_LIMITS, "host": host_target()}


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    config: Callable[[], dict | str]  # a TVM target dict, or a TVM tag name
    gpu: bool = False


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("cpu", "this machine's CPU with its SIMD features (LLVM host CPU name)", host_target),
    Preset("arm64", "64-bit ARM Linux (aarch64) with NEON", lambda: dict(AARCH64)),
    Preset("rpi4", "Raspberry Pi 4 B, 64-bit OS: Cortex-A72 with NEON (TVM tag raspberry-pi/4b-aarch64)", _rpi4),
    Preset("jetson-orin-nano", "NVIDIA Jetson Orin Nano: CUDA sm_87, aarch64 host (Cortex-A78AE)",
           lambda: {"kind": "cuda", "arch": "sm_87", **CUDA_LIMITS,
                    "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78ae", "mattr": ["+neon"]}}, gpu=True),
    Preset("cuda", "this machine's NVIDIA GPU (needs one at build time)", _local_cuda, gpu=True),
    Preset("h100", "NVIDIA H100: CUDA sm_90, x86-64 host",
           lambda: {"kind": "cuda", "arch": "sm_90", **CUDA_LIMITS, "l2_cache_size_bytes": 52428800,
                    "host": {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}}, gpu=True),
]}
GPU_KINDS = ("cuda",)


def _unknown_hint(name: str) -> str:
    return did_you_mean(name, PRESETS) or (
        f"presets: {', '.join(PRESETS)} (`lbdlc targets` describes them); "
        "a raw TVM target is a dict such as {kind: llvm, mtriple: aarch64-linux-gnu}")


def check_entry(entry: Any) -> Any:
    """Cheap validation of one `deploy.targets` item, for the spec's schema: preset names and
    options (raw dicts are checked against TVM at build time)."""
    if isinstance(entry, str):
        name, *options = entry.split(":")
        if name not in PRESETS:
            raise ValueError(f"unknown target '{name}' ({_unknown_hint(name)})")
        for o in options:
            if o not in OPTIONS:
                raise ValueError(f"unknown target option '{o}' ({did_you_mean(o, OPTIONS) or 'options: ' + ', '.join(OPTIONS)})")
    elif isinstance(entry, dict):
        if "kind" not in entry:
            raise ValueError("a raw TVM target needs `kind` (llvm, cuda, ...)")
        if entry.get("precision", "fp32") not in PRECISIONS:
            raise ValueError(f"precision is one of {', '.join(PRECISIONS)}")
    else:
        raise ValueError("a target is a preset name (`lbdlc targets`) or a TVM target dict")
    return entry


@dataclass
class DeployTarget:
    """One resolved deployment target."""

    name: str  # the bundle's directory: the preset name and its options (`h100-fp16`), or the dict's `name`
    preset: str | None
    config: dict | str  # what tvm.target.Target is made from: a dict, or a tag name
    precision: str = "fp32"
    require_so: bool = False
    written: Any = None  # as the user wrote it (str or dict), for the manifest
    _target: Any = field(default=None, repr=False)

    def tvm_target(self):
        if self._target is None:
            import tvm

            self._target = tvm.target.Target(self.config)
        return self._target

    def export(self) -> dict:
        """The TVM target as JSON (derived `feature.*` keys left out)."""
        return _jsonable(self.tvm_target().export())

    @property
    def gpu(self) -> bool:
        return str(self.tvm_target().kind.name) in GPU_KINDS

    @property
    def device(self) -> str:
        return "cuda" if self.gpu else "cpu"

    @property
    def arch(self) -> str:
        """The CPU architecture that runs the library's host code."""
        t = self.tvm_target()
        host = t.host if t.host is not None else t
        if str(host.kind.name) != "llvm":
            return host_arch()
        triple = str(host.attrs.get("mtriple", "") or "")
        return normalize_arch(triple.split("-")[0]) if triple else host_arch()

    @property
    def cross(self) -> bool:
        return self.arch != host_arch()

    @property
    def toolchain(self) -> tuple[str, str] | None:
        """(cross compiler command, package) for a .so of another architecture."""
        return TOOLCHAINS.get(self.arch) if self.cross else None

    def ort_providers(self) -> list[str]:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.gpu else ["CPUExecutionProvider"]

    def describe(self) -> dict:
        return {
            "name": self.name, "preset": self.preset, "written": self.written, "precision": self.precision,
            "device": self.device, "arch": self.arch, "cross": self.cross, "tvm": self.export(),
        }


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "items"):
        return {str(k): _jsonable(v) for k, v in value.items()
                if not str(k).startswith("feature.") and not (str(k) == "tag" and not v)}
    if isinstance(value, (list, tuple)) or hasattr(value, "__iter__"):
        return [_jsonable(v) for v in value]
    return str(value)


def parse_cli(text: str) -> str | dict:
    """A --target value: a preset (with options) or a JSON dict."""
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"--target {text}: not a JSON object ({exc.msg} at column {exc.colno})",
                            hint='a raw TVM target on the command line is JSON, e.g. --target \'{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}\'') from None
        if not isinstance(value, dict):
            raise SpecError(f"--target {text}: a raw target is a JSON object")
        return value
    return text


def resolve(entry: str | dict, loc=None) -> DeployTarget:
    """A preset (with options) or a raw dict -> DeployTarget; errors are located at `loc`."""
    if isinstance(entry, str):
        name, *options = entry.split(":")
        if name not in PRESETS:
            raise SpecError(f"unknown target '{name}'", loc, hint=_unknown_hint(name))
        for o in options:
            if o not in OPTIONS:
                raise SpecError(f"unknown target option '{o}' in '{entry}'", loc,
                                hint=did_you_mean(o, OPTIONS) or "options: " + "; ".join(f"{k}: {v}" for k, v in OPTIONS.items()))
        try:
            config = PRESETS[name].config()
        except SpecError as exc:
            exc.loc = exc.loc or loc
            raise
        target = DeployTarget("-".join([name, *options]), name, config, "fp16" if "fp16" in options else "fp32",
                              "so" in options, entry)
    elif isinstance(entry, dict):
        config = {k: v for k, v in entry.items() if k not in OURS}
        precision = entry.get("precision", "fp32")
        if precision not in PRECISIONS:
            raise SpecError(f"unknown precision '{precision}'", loc, hint=f"choose {' or '.join(PRECISIONS)}")
        name = entry.get("name") or _raw_name(config)
        target = DeployTarget(str(name), None, config, precision, bool(entry.get("so", False)), entry)
    else:
        raise SpecError("a target is a preset name or a TVM target dict", loc, hint=_unknown_hint(str(entry)))
    try:
        target.tvm_target()
    except Exception as exc:  # noqa: BLE001 - TVM rejects the dict: say why, at the spec line
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"not a valid TVM target: {first}", loc,
                        hint="e.g. {kind: llvm, mtriple: aarch64-linux-gnu, mattr: [+neon]} or {kind: cuda, arch: sm_89}") from None
    check_buildable(target, loc)
    return target


def _raw_name(config: dict) -> str:
    import hashlib

    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    return f"{config.get('kind', 'target')}-{digest}"


def cross_compiler(target: DeployTarget) -> str | None:
    """The cross compiler for a .so of `target`'s architecture, when it is on PATH."""
    chain = target.toolchain
    return shutil.which(chain[0]) if chain else None


def check_buildable(target: DeployTarget, loc=None) -> None:
    """What this machine needs to build for `target`: errors that name the fix."""
    if target.gpu:
        import tvm

        if str(tvm.support.libinfo().get("USE_CUDA", "OFF")).upper() in ("OFF", "", "NOT-FOUND"):
            raise SpecError(f"target '{target.name}' needs TVM's CUDA code generator, and this TVM was built without it", loc,
                            hint="install the PyPI wheel, which has it: `pip install apache-tvm`")
    if target.cross and target.require_so:
        chain = target.toolchain
        if chain is None:
            raise SpecError(f"target '{target.name}' asks for a .so for {target.arch}, and lbdlc knows no cross compiler for it", loc,
                            hint="leave out `so`: the bundle then carries a .tar of object files, linked on the device")
        if shutil.which(chain[0]) is None:
            raise SpecError(f"target '{target.name}' asks for a shared library (.so) for {target.arch}, and the cross compiler "
                            f"{chain[0]} is not on PATH", loc,
                            hint=f"install it: `apt-get install {chain[1]}` (Debian/Ubuntu); without `so` the bundle carries a .tar "
                                 "of object files, which TVM links on the device")


def resolve_all(entries: list, locs: list | None = None) -> list[DeployTarget]:
    locs = locs or [None] * len(entries)
    targets = [resolve(e, loc) for e, loc in zip(entries, locs)]
    seen: dict[str, int] = {}
    for i, t in enumerate(targets):
        if t.name in seen:
            raise SpecError(f"target '{t.name}' is listed twice", locs[i], hint="each target gives one bundle directory: deploy/<name>")
        seen[t.name] = i
    return targets


def describe_presets() -> list[dict]:
    """What `lbdlc targets` shows: each preset, its TVM target here, and what building it gives."""
    rows = []
    for p in PRESETS.values():
        row: dict[str, Any] = {"name": p.name, "summary": p.summary, "gpu": p.gpu}
        try:
            t = resolve(p.name)
        except SpecError as exc:
            row.update(available=False, note=exc.message, hint=exc.hint)
            rows.append(row)
            continue
        row.update(available=True, tvm=t.export(), arch=t.arch, cross=t.cross)
        if t.cross:
            cc = cross_compiler(t)
            row["library"] = ".tar of object files" + (f" and .so ({t.toolchain[0]})" if cc else
                                                        f" (a .so too with {t.toolchain[0]}: apt-get install {t.toolchain[1]})")
        else:
            row["library"] = ".so"
        row["onnxruntime"] = t.ort_providers()[0]
        row["runs_here"] = (not t.cross) and (not t.gpu or gpu_present())
        rows.append(row)
    return rows
