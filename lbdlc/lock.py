"""Lock files: `lbdlc lock spec.yaml` writes `spec.lock.yaml`, the resolved spec with every
default written out, plus the hashes and tool versions it was resolved with.

A lock file is itself a flat spec (what `lbdlc show` prints), so `lbdlc build
spec.lock.yaml` builds the same model even after a later lbdlc changes a default. Its
first lines are comments; one of them holds the lock data as JSON:

    # lbdlc-lock: {"spec": "mlp.yaml", "spec_sha256": "...", "resolved_sha256": "...", ...}

`lbdlc lock --check` and `lbdlc build` of a spec that has a lock file next to it report
when the spec no longer resolves to the locked model, or the tools are not the locked ones.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from .errors import SpecError

MARK = "# lbdlc-lock: "


def resolved_sha256(loaded) -> str:
    """The hash of the resolved spec (key order and layout do not matter, values do)."""
    from .resolved import resolved_dict

    text = json.dumps(resolved_dict(loaded), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def lock_path(spec: Path) -> Path:
    name = spec.name
    for suffix in (".yaml", ".yml"):
        if name.endswith(suffix):
            return spec.with_name(name[: -len(suffix)] + ".lock" + suffix)
    return spec.with_name(name + ".lock.yaml")


def _lock_data(loaded, overrides: list[str]) -> dict:
    from .driver import tool_versions

    return {
        "spec": loaded.path.name,
        "spec_sha256": hashlib.sha256(loaded.text.encode("utf-8")).hexdigest(),
        "resolved_sha256": resolved_sha256(loaded),
        "overrides": list(overrides),
        "versions": tool_versions(),
    }


def lock_text(spec: Path, overrides: list[str] = ()) -> str:
    from .lower import load, lower
    from .resolved import resolved_yaml

    loaded = load(spec, list(overrides))
    lower(loaded)  # a lock is only written for a spec that lowers
    body = resolved_yaml(loaded).split("\n", 1)[1]
    head = (
        f"# Locked from {loaded.path.name} by `lbdlc lock`: the resolved spec, every default written out.\n"
        f"# `lbdlc build` of this file builds the same model; `lbdlc lock --check {loaded.path.name}` says when it is stale.\n"
        f"{MARK}{json.dumps(_lock_data(loaded, list(overrides)), sort_keys=True)}\n"
    )
    return head + body


def write_lock(spec: Path, target: Path, overrides: list[str] = ()) -> None:
    text = lock_text(spec, overrides)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)


def read_lock(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"no lock file {path}", hint="write one with `lbdlc lock SPEC`") from None
    m = re.search("^" + re.escape(MARK) + "(.*)$", text, re.M)
    try:
        return json.loads(m.group(1)) if m else {}
    except ValueError:
        return {}


def lock_problems(loaded, lock: Path) -> list[str]:
    """How `loaded` (a spec as built now) and the tools differ from what `lock` holds."""
    from .driver import tool_versions

    data = read_lock(lock)
    if not data:
        return [f"{lock} holds no `{MARK.strip()}` line; rewrite it with `lbdlc lock`"]
    problems = []
    if data.get("resolved_sha256") != resolved_sha256(loaded):
        problems.append(f"{loaded.path} no longer resolves to the model locked in {lock} "
                        f"(`lbdlc diff {lock} {loaded.path}` shows how; `lbdlc lock {loaded.path}` updates the lock)")
    locked, now = data.get("versions", {}), tool_versions()
    for tool in sorted(set(locked) | set(now)):
        if locked.get(tool) != now.get(tool):
            problems.append(f"{tool} is {now.get(tool) or 'not installed'}, the lock was made with {locked.get(tool) or 'none'}")
    return problems


def check_lock(spec: Path, lock: Path, overrides: list[str] = ()) -> list[str]:
    from .lower import load, lower

    loaded = load(spec, list(overrides))
    lower(loaded)
    if not lock.exists():
        return [f"no lock file {lock}; write one with `lbdlc lock {spec}`"]
    if read_lock(lock).get("overrides", []) != list(overrides):
        return [f"{lock} was made with --set {read_lock(lock).get('overrides')}, not {list(overrides)}"]
    return lock_problems(loaded, lock)


def lock_warnings(loaded, overrides: list[str] = ()) -> list[SpecError]:
    """Warnings for a build: of a spec whose lock file (next to it) it no longer matches,
    or of a lock file made with other tool versions."""
    path = Path(loaded.path)
    try:
        if re.search(r"\.lock\.ya?ml$", path.name):
            data = read_lock(path)
            from .driver import tool_versions

            now = tool_versions()
            diffs = [t for t in sorted(set(data.get("versions", {})) | set(now)) if data.get("versions", {}).get(t) != now.get(t)]
            return [SpecError(f"{path} was locked with other tool versions ({', '.join(diffs)}); artifacts may differ",
                              severity="warning")] if data and diffs else []
        lock = lock_path(path)
        if not lock.exists() or read_lock(lock).get("overrides", []) != list(overrides):
            return []
        return [SpecError(p, severity="warning") for p in lock_problems(loaded, lock)]
    except (OSError, SpecError):
        return []
