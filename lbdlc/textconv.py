"""What git runs on spec files after `lbdlc git-setup`.

- `lbdlc textconv FILE` (diff.lbdlc.textconv): the spec resolved (extends and blocks
  expanded, defaults written out), one layer per line with its output shape and parameter
  count as a trailing comment, so `git diff` shows which layers changed, including those
  whose shapes changed downstream, and `git log -p` does too. A file that is not a spec,
  or does not load, comes out as it is.
- `lbdlc git-diff ...` (diff.lbdlc.command, with `git-setup --semantic`): git's external
  diff protocol (path old-file old-hex old-mode new-file new-hex new-mode); prints
  `lbdlc diff`'s report, then the text diff. Always exits 0 (git stops on other codes).

git hands both commands temporary copies of old blobs (`/tmp/XXXXXX_gpt3.yaml`), where an
`extends: gpt2.yaml` cannot resolve. The copy is then loaded from a temporary file next
to the spec it came from (found by name among the repository's files), so that the base
resolves, against the working tree's version of it.
"""
from __future__ import annotations

import difflib
import os
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path

from .errors import SpecError, SpecErrors

HEADER = "# lbdlc textconv: the resolved spec; after each layer, its output shape and parameters\n"


def _is_spec(text: str) -> bool:
    from .fmt import is_spec_text

    return is_spec_text(text)


def _original_dir(temp: Path, cwd: Path) -> Path | None:
    """The folder of the tracked file a git temporary copy was made from, if one matches."""
    name = re.sub(r"^[A-Za-z0-9]{6}_", "", temp.name)
    r = subprocess.run(["git", "ls-files", "--full-name", "--", f"*/{name}", name], cwd=cwd, capture_output=True, text=True, check=False)
    matches = [l for l in r.stdout.splitlines() if Path(l).name == name]
    if r.returncode != 0 or len(matches) != 1:
        return None
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=cwd, capture_output=True, text=True, check=False).stdout.strip()
    return (Path(top) / matches[0]).parent if top else None


@contextmanager
def placed(text: str, folder: Path, name: str):
    """`text` as a hidden temporary file in `folder`, removed afterwards."""
    path = folder / f".{name}.lbdlc-{os.getpid()}.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _load(path: Path, text: str, cwd: Path):
    from .lower import load, lower

    try:
        loaded = load(path)
        return loaded, lower(loaded)
    except (SpecError, SpecErrors) as exc:
        if "extends" not in text:
            raise
        folder = _original_dir(path, cwd)
        if folder is None or folder == path.parent:
            raise exc
        with placed(text, folder, path.name) as moved:
            loaded = load(moved)
            return loaded, lower(loaded)


def annotated(loaded, graph) -> str:
    from .analysis import summarize
    from .resolved import resolved_yaml

    summary = summarize(graph)
    stats = {l.name: l for l in summary.layers}
    lines = resolved_yaml(loaded).splitlines()[1:]  # its first line names the (temporary) file
    names = [layer.name for layer in loaded.spec.layers]
    k = 0
    in_layers = False
    for i, line in enumerate(lines):
        if line == "layers:":
            in_layers = True
            continue
        if in_layers and line.startswith("  - "):
            s = stats.get(names[k]) if k < len(names) else None
            k += 1
            if s is not None:
                shape = "[" + ", ".join(map(str, s.output_shape)) + "]"
                lines[i] = f"{line}  # {shape}, {s.params:,} params"
        elif in_layers:
            in_layers = False
    totals = f"# {summary.params:,} parameters, {summary.flops:,} FLOPs per sample\n"
    return HEADER + totals + "\n".join(lines) + "\n"


def textconv_text(path: Path, cwd: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return path.read_bytes().decode("utf-8", "replace") if path.exists() else ""
    if not _is_spec(text):
        return text
    try:
        loaded, graph = _load(path, text, cwd)
        return annotated(loaded, graph)
    except (SpecError, SpecErrors) as exc:
        first = str(exc).splitlines()[0] if str(exc) else "it does not load"
        first = first.replace(str(path), path.name)
        return text + ("" if text.endswith("\n") else "\n") + f"# lbdlc textconv: not resolved ({first})\n"


def git_external_diff(args: list[str], cwd: Path, console) -> None:
    """git's external diff: print lbdlc diff's report for one file, then its text diff."""
    from rich.text import Text

    from .diff import build_side, compare
    from .diff_render import render_text

    if len(args) < 7:
        console.print(Text(f"lbdlc git-diff: git passes 7 arguments, got {len(args)}"))
        return
    path, old_file, _, _, new_file = args[:5]
    read = lambda f: "" if f == "/dev/null" else Path(f).read_text(encoding="utf-8", errors="replace")  # noqa: E731
    old_text, new_text = read(old_file), read(new_file)
    console.print(Text(f"lbdlc diff a/{path} b/{path}", style="bold"))
    if old_file != "/dev/null" and new_file != "/dev/null" and _is_spec(old_text) and _is_spec(new_text):
        folder = (cwd / path).parent
        try:
            if folder.is_dir():
                with placed(old_text, folder, "old-" + Path(path).name) as a, placed(new_text, folder, "new-" + Path(path).name) as b:
                    old = build_side(a, f"a/{path}", relabel=lambda f: f"a/{path}" if Path(f) == a else f)
                    new = build_side(b, f"b/{path}", relabel=lambda f: f"b/{path}" if Path(f) == b else f)
                    render_text(compare(old, new), console)
        except (SpecError, SpecErrors) as exc:
            console.print(Text(f"(no model comparison: {str(exc).splitlines()[0]})"))
    lines = difflib.unified_diff(old_text.splitlines(True), new_text.splitlines(True), f"a/{path}", f"b/{path}")
    console.file.write("".join(lines))
