"""User-facing errors: every one names a `file:line:col`, quotes the line, and gives a hint.

Anything a user can get wrong in a spec or on the command line raises `SpecError` (or
`SpecErrors` for several at once); the CLI prints them and exits 2, never a traceback.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from .source import Loc


@dataclass
class Note:
    message: str
    loc: "Loc | None" = None


@dataclass
class SpecError(Exception):
    message: str
    loc: "Loc | None" = None
    hint: str | None = None
    notes: list[Note] = field(default_factory=list)
    severity: str = "error"  # or "warning": printed, and an error only under --strict

    def __str__(self) -> str:
        return render(self)


class SpecErrors(Exception):
    """Several independent errors found in one pass (e.g. all validation errors of a spec)."""

    def __init__(self, errors: Iterable[SpecError]):
        self.errors = list(errors)
        super().__init__("\n".join(render(e) for e in self.errors))


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def render(err: SpecError) -> str:
    """`file:line:col: error: message`, the line, a caret under the column, notes and hint."""
    lines = [f"{err.loc}: {err.severity}: {err.message}" if err.loc else f"{err.severity}: {err.message}"]
    lines += _quote(err.loc)
    for note in err.notes:
        lines.append(f"{note.loc}: note: {note.message}" if note.loc else f"note: {note.message}")
        lines += _quote(note.loc)
    if err.hint:
        lines.append(f"  hint: {err.hint}")
    return "\n".join(lines)


def _quote(loc) -> list[str]:
    from .source import source_line

    text = source_line(loc) if loc else None
    if text is None:
        return []
    gutter = f"{loc.line:>4} | "
    return [gutter + text, " " * (len(gutter) + loc.col - 1) + "^"]
