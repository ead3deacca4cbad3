"""Commands for specs kept in version control: `diff`, `fmt`, `git-setup`, `lock`, and the
`textconv` / `git-diff` helpers that git calls once `git-setup` has run.

Registered on the `lbdlc` app by importing this module from lbdlc/cli.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .cli import SetOpt, _fail, app, err, out
from .errors import SpecError, SpecErrors, render

FORMATS = ("text", "markdown", "json")


@app.command(context_settings={"ignore_unknown_options": False})
def diff(
    args: List[str] = typer.Argument(..., help="OLD NEW (spec files, builds or REV:path), REV -- PATH, REV1 REV2 -- PATH, or PATH (HEAD against the working tree).", show_default=False),
    fmt: str = typer.Option("text", "--format", "-f", help="text (colored terminal), markdown (a pull-request comment) or json."),
    overrides: List[str] = SetOpt,
    old_set: List[str] = typer.Option([], "--old-set", help="Override a value on the old side only (PATH=VALUE, repeatable)."),
    new_set: List[str] = typer.Option([], "--new-set", help="Override a value on the new side only (PATH=VALUE, repeatable)."),
) -> None:
    """Compare two models (resolved specs and lowered graphs): layers added, removed, renamed and changed, shapes, parameters, FLOPs, memory, training settings. Exit 0 same model, 1 different, 2 errors."""
    from .diff import diff as run_diff
    from .diff_render import render_markdown, render_text

    args, late = _options_after_dashdash(list(args))  # `lbdlc diff REV -- PATH --format json`
    fmt = late.get("--format", [fmt])[-1]
    overrides, old_set, new_set = (list(overrides) + late.get("--set", []), list(old_set) + late.get("--old-set", []),
                                   list(new_set) + late.get("--new-set", []))
    if fmt not in FORMATS:
        err.print(f"error: --format is one of {', '.join(FORMATS)}, got '{fmt}'", markup=False, soft_wrap=True)
        raise typer.Exit(2)
    try:
        result = run_diff(list(args), Path.cwd(), list(overrides) + list(old_set), list(overrides) + list(new_set))
    except (SpecError, SpecErrors) as exc:
        _fail(exc)
    if fmt == "json":
        print(json.dumps(result, indent=2, default=str))
    elif fmt == "markdown":
        print(render_markdown(result), end="")
    else:
        render_text(result, out)
    raise typer.Exit(0 if result["same"] else 1)


def _options_after_dashdash(args: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """diff's options written after `--` (git's habit), which click leaves among the arguments."""
    names = {"--format": "--format", "-f": "--format", "--set": "--set", "--old-set": "--old-set", "--new-set": "--new-set"}
    rest, found, i = [], {}, 0
    while i < len(args):
        key, eq, value = args[i].partition("=")
        if key in names and (eq or i + 1 < len(args)):
            found.setdefault(names[key], []).append(value if eq else args[i + 1])
            i += 1 if eq else 2
            continue
        rest.append(args[i])
        i += 1
    return rest, found


@app.command()
def fmt(
    paths: Optional[List[Path]] = typer.Argument(None, help="Spec files or directories (default: the current directory). Files that are not lbdlc specs are skipped.", show_default=False),
    check: bool = typer.Option(False, "--check", help="Change nothing; exit 1 if a file would be reformatted (for CI and pre-commit)."),
    show_diff: bool = typer.Option(False, "--diff", help="Print what would change, as a unified diff."),
) -> None:
    """Rewrite specs in the canonical layout (key order, indentation, flow style for short lists), keeping every comment."""
    import difflib

    from .fmt import format_file, format_text, spec_files

    files = spec_files(list(paths or [Path(".")]))
    changed = errors = 0
    for path, named in files:
        before = path.read_text(encoding="utf-8") if show_diff and path.is_file() else None
        result = format_file(path, check=check or show_diff, named=named)
        if result.status == "error":
            errors += 1
            e = result.error
            for one in (e.errors if isinstance(e, SpecErrors) else [e]):
                err.print(render(one), markup=False, soft_wrap=True)
        elif result.status == "skipped" and named and "not an lbdlc spec" not in result.message:
            err.print(f"skipped {path}: {result.message}", markup=False, soft_wrap=True)
        elif result.status == "reformatted":
            changed += 1
            if show_diff:
                after = format_text(before, str(path))
                sys.stdout.writelines(difflib.unified_diff(before.splitlines(True), after.splitlines(True), f"{path}", f"{path} (formatted)"))
            if check or show_diff:
                err.print(f"would reformat {path}", markup=False, soft_wrap=True)
            else:
                err.print(f"reformatted {path}", markup=False, soft_wrap=True)
    if errors:
        raise typer.Exit(2)
    if (check or show_diff) and changed:
        err.print(f"{changed} file{'s' * (changed != 1)} would be reformatted", markup=False, soft_wrap=True)
        raise typer.Exit(1)


# -- git integration ------------------------------------------------------------------------
@app.command("git-setup")
def git_setup(
    pattern: Optional[str] = typer.Option(None, "--pattern", help="Which files get the lbdlc diff driver (.gitattributes pattern); default specs/**/*.yaml when there is a specs/ folder, else *.yaml."),
    semantic: bool = typer.Option(False, "--semantic", help="Also make `git diff` print `lbdlc diff`'s report (an external diff driver) instead of a text diff of the resolved specs."),
) -> None:
    """Make `git diff` on spec files show model changes: a textconv (the resolved spec, one layer per line with its output shape and parameters) in .gitattributes and the repository's git config."""
    from . import gitutil

    try:
        root = gitutil.repo_root(Path.cwd())
    except SpecError as exc:
        _fail(exc)
    if pattern is None:
        pattern = "specs/**/*.yaml" if (root / "specs").is_dir() else "*.yaml"
    line = f"{pattern} diff=lbdlc"
    attributes = root / ".gitattributes"
    text = attributes.read_text(encoding="utf-8") if attributes.exists() else ""
    if line not in text.splitlines():
        attributes.write_text(text + ("" if not text or text.endswith("\n") else "\n") + line + "\n", encoding="utf-8")
        out.print(f"added `{line}` to {attributes}", markup=False, soft_wrap=True)
    else:
        out.print(f"{attributes} already has `{line}`", markup=False, soft_wrap=True)
    exe = _lbdlc_command()
    settings = [("diff.lbdlc.textconv", f"{exe} textconv"), ("diff.lbdlc.xfuncname", r"^[ ]*- \{op: [a-z0-9_]+, name: ([^,}]+)")]
    if semantic:
        settings.append(("diff.lbdlc.command", f"{exe} git-diff"))
    for key, value in settings:
        subprocess.run(["git", "config", "--local", key, value], cwd=root, check=True)
        out.print(f"git config {key} '{value}'", markup=False, soft_wrap=True)


def _lbdlc_command() -> str:
    """How git should call lbdlc: the `lbdlc` script next to this Python, when there is one."""
    import shlex
    import shutil

    script = Path(sys.executable).parent / "lbdlc"
    if script.exists():
        return shlex.quote(str(script))
    found = shutil.which("lbdlc")
    return shlex.quote(found) if found else f"{shlex.quote(sys.executable)} -m lbdlc.cli"


@app.command(hidden=True)
def textconv(spec: Path = typer.Argument(..., show_default=False)) -> None:
    """For git (`git-setup`): a spec as its resolved, annotated text; the file as it is when it does not load."""
    from .textconv import textconv_text

    sys.stdout.write(textconv_text(spec, Path.cwd()))


@app.command("git-diff", hidden=True)
def git_diff(args: List[str] = typer.Argument(..., show_default=False)) -> None:
    """For git (`git-setup --semantic`): path old-file old-hex old-mode new-file new-hex new-mode."""
    from .textconv import git_external_diff

    git_external_diff(list(args), Path.cwd(), out)


# -- lock files -----------------------------------------------------------------------------
@app.command()
def lock(
    spec: Path = typer.Argument(..., help="A model spec (YAML).", show_default=False),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Where to write it (default: next to the spec, <name>.lock.yaml)."),
    overrides: List[str] = SetOpt,
    check: bool = typer.Option(False, "--check", help="Write nothing; exit 1 if the spec no longer resolves to what the lock file holds, or the tools differ."),
) -> None:
    """Write <spec>.lock.yaml: the resolved spec with every default written out, its hashes and the tool versions; `lbdlc build` of the lock file builds the same model even after lbdlc changes a default."""
    from .lock import check_lock, lock_path, write_lock

    target = output or lock_path(spec)
    try:
        if check:
            problems = check_lock(spec, target, list(overrides))
            for p in problems:
                err.print(p, markup=False, soft_wrap=True)
            if problems:
                raise typer.Exit(1)
            out.print(f"{target} is up to date", markup=False, soft_wrap=True)
            return
        write_lock(spec, target, list(overrides))
    except (SpecError, SpecErrors) as exc:
        _fail(exc)
    out.print(f"wrote {target}", markup=False, soft_wrap=True)


def reproducible_report(spec: Path, out_dir: Path, options) -> bool:
    """`build --check-reproducible`: build again, say which artifacts differ; True if none."""
    from .reproducible import rebuild_and_compare

    try:
        checks = rebuild_and_compare(spec, out_dir, options)
    except (SpecError, SpecErrors) as exc:
        _fail(exc)
    bad = [c for c in checks if not c.same]
    for c in bad:
        a, b = (s[:12] if s else "missing" for s in c.sha256)
        out.print(f"  DIFFERS {c.name}: sha256 {a} vs {b} ({c.bytes[0]} vs {c.bytes[1]} bytes)", markup=False, soft_wrap=True)
    out.print(f"reproducible: {len(checks)} files byte-identical across two builds" if not bad
              else f"NOT reproducible: {len(bad)} of {len(checks)} files differ", markup=False, soft_wrap=True)
    return not bad
