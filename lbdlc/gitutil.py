"""Reading specs out of git revisions, for `lbdlc diff HEAD~1 -- specs/gpt2.yaml`.

A revision's spec is written into a temporary directory that mirrors the repository's
layout, together with every file its `extends:` chain names, read from the same revision:
an old gpt3.yaml is compared as it was built then, on the gpt2.yaml of that revision, not
on today's. A base that the revision does not hold (an untracked file) is taken from the
working tree, with a warning. Positions in errors and reports name `REV:path`, never the
temporary files.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from .errors import SpecError, SpecErrors
from .source import Loc, _SOURCES, register_source


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise SpecError("git is not installed", hint="install git, or compare two spec files") from None


def repo_root(cwd: Path) -> Path:
    r = _git(["rev-parse", "--show-toplevel"], cwd)
    if r.returncode != 0:
        raise SpecError(f"{cwd.resolve()} is not inside a git repository", hint="compare two spec files instead: lbdlc diff old.yaml new.yaml")
    return Path(r.stdout.strip())


def is_revision(rev: str, cwd: Path) -> bool:
    r = _git(["rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd)
    return r.returncode == 0


def show(rev: str, repo_path: str, cwd: Path) -> str | None:
    """The text of `repo_path` (relative to the repository root) at `rev`, or None if absent."""
    r = subprocess.run(["git", "show", f"{rev}:{repo_path}"], cwd=cwd, capture_output=True, check=False)
    if r.returncode != 0:
        return None
    try:
        return r.stdout.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{rev}:{repo_path} is not UTF-8 text") from None


@dataclass
class Checkout:
    """A spec of a revision, written out with its `extends:` chain under a temporary root."""

    rev: str
    path: Path  # the temporary spec file to load
    root: Path  # the temporary root (mirrors the repository)
    warnings: list[str] = field(default_factory=list)

    def label(self, file: str) -> str:
        """`REV:path` for a temporary file name, anything else unchanged."""
        try:
            rel = Path(file).resolve().relative_to(self.root.resolve())
        except ValueError:
            return file
        return f"{self.rev}:{rel.as_posix()}"

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def repo_relative(path: str | Path, cwd: Path, root: Path) -> str:
    """A path as git names it: relative to the repository root, '/'-separated."""
    p = Path(path)
    absolute = (cwd / p).resolve() if not p.is_absolute() else p.resolve()
    try:
        return absolute.relative_to(root.resolve()).as_posix()
    except ValueError:
        raise SpecError(f"{path} is outside the git repository at {root}") from None


def checkout(rev: str, repo_path: str, cwd: Path) -> Checkout:
    """Write `rev:repo_path` and the bases it extends into a temporary tree."""
    root = repo_root(cwd)
    if not is_revision(rev, root):
        raise SpecError(f"'{rev}' is not a git revision of {root}", hint="e.g. HEAD~1, main, a commit hash or a tag")
    tmp = Path(tempfile.mkdtemp(prefix="lbdlc-diff-"))
    co = Checkout(rev, tmp / repo_path, tmp)
    try:
        _fetch(co, rev, repo_path, root, seen=[])
    except BaseException:
        co.cleanup()
        raise
    return co


def _fetch(co: Checkout, rev: str, repo_path: str, root: Path, seen: list[str]) -> None:
    if repo_path in seen:
        return  # a loop: compose reports it when the spec is loaded
    seen.append(repo_path)
    text = show(rev, repo_path, root)
    target = co.root / repo_path
    target.parent.mkdir(parents=True, exist_ok=True)
    if text is None:
        if not seen[:-1]:
            raise SpecError(f"{rev} has no file {repo_path}", hint=f"`git log --oneline -- {repo_path}` lists the commits that have it")
        working = root / repo_path
        if not working.exists():
            return  # compose reports the missing base at the `extends:` line
        co.warnings.append(f"{rev} has no {repo_path}; using the working tree's copy for `extends`")
        text = working.read_text(encoding="utf-8")
    target.write_text(text, encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return  # the loader reports it, located
    base = data.get("extends") if isinstance(data, dict) else None
    if isinstance(base, str):
        parent = PurePosixPath(repo_path).parent
        joined = _normalize(parent / base)
        if joined is not None:
            _fetch(co, rev, joined, root, seen)


def _normalize(p: PurePosixPath) -> str | None:
    parts: list[str] = []
    for part in p.parts:
        if part == "..":
            if not parts:
                return None  # leaves the repository
            parts.pop()
        elif part not in (".", ""):
            parts.append(part)
    return "/".join(parts)


def relabel_errors(exc: SpecError | SpecErrors, label) -> None:
    """Rename the temporary files in an error's positions to what the user named."""
    errors = exc.errors if isinstance(exc, SpecErrors) else [exc]
    for e in errors:
        e.loc = relabel_loc(e.loc, label)
        for note in e.notes:
            note.loc = relabel_loc(note.loc, label)


def relabel_loc(loc: Loc | None, label) -> Loc | None:
    if loc is None:
        return None
    new = label(loc.file)
    if new == loc.file:
        return loc
    if loc.file in _SOURCES:
        register_source(new, _SOURCES[loc.file])
    return Loc(new, loc.line, loc.col)
