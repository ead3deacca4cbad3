"""`lbdlc fmt`: one canonical layout for spec files, keeping every comment.

The layout (chosen to match how the specs in specs/ are written, so that formatting them
changes little):
- 2-space indentation; block sequences indented under their key (`layers:` / `  - ...`).
- Top-level keys in the order lbdlc, extends, name, description, vars, inputs, blocks,
  layers, outputs, train, finetune, compile, quantize, deploy, then any others as written. A block definition's keys:
  description, inputs, params, layers, outputs.
- A layer is one flow mapping on one line: name, op, its attributes (and repeat, when,
  tie) as written, and its inputs `in` last, the way specs/ writes them. A layer with
  mappings inside mappings (an `init:`) whose line would pass 100 columns, and a group (a
  layer with `layers:`), are block mappings with the same key order, a group's `layers`
  last; their values are laid out like those of `train:` below. An input is one flow mapping; `outputs`, lists in `vars` and a block's
  `inputs`/`outputs` are flow lists.
- Elsewhere (`train:`, `compile:`, ...) a mapping or list is written in flow style when it
  fits on a line of at most 100 columns and has no full-line comment inside, else in block
  style. Keys there keep their written order.
- Scalars are copied as written (quotes, number spelling); at most one blank line between
  entries, none at the start of a block; full-line comments stay before the entry they
  precede, end-of-line comments at the end of the line of their entry (at their column
  when it is free).

ruamel.yaml's round trip loses comments in this layout (a full-line comment just before a
flow-mapping item that has an end-of-line comment disappears), so this module parses with
the project's YAML loader, which keeps every node's position, finds the comments in the
text itself, and writes the layout out. Before anything is written the result is checked:
it must load to the same data and hold the same comments, or the file is left alone.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import SpecError
from .source import Loc, _Loader, load_yaml_text

TOP_ORDER = ("lbdlc", "extends", "name", "description", "vars", "inputs", "blocks", "layers", "outputs", "train", "finetune", "compile", "quantize", "deploy")
LAYER_FIRST = ("name", "op")
LAYER_LAST = ("in",)
BLOCK_ORDER = ("description", "inputs", "params", "layers", "outputs")
LINE_WIDTH = 100  # generic sections: a collection goes in flow style when its line fits
INDENT = 2


class FmtRefused(Exception):
    """A file fmt leaves as it is (anchors and aliases, which it does not rewrite)."""


@dataclass
class Comments:
    leading: list = field(default_factory=list)  # full-line comment texts; None for a blank line
    trailing: list = field(default_factory=list)  # (text, column, gap) of end-of-line comments


@dataclass
class _Entry:
    """A mapping pair or a sequence item, in document order (outer before inner)."""

    line: int  # 0-based line where it starts
    key: object  # id of the thing comments attach to: id(key node) or id(item node)


class _Formatter:
    def __init__(self, text: str, file: str):
        self.text, self.file = text, file
        self.lines = text.split("\n")
        self.root = self._compose()
        self.spans = sorted(self._scalar_spans(self.root))
        self.comments: dict[int, Comments] = {}
        self.header: list = []  # comments before the first entry: the file's header
        self.trailer: list = []  # comments after the last entry
        self._attach_comments()

    # -- reading ------------------------------------------------------------------------
    def _compose(self):
        loader = _Loader(self.text)
        try:
            events = list(yaml.parse(self.text, Loader=_Loader))
            for e in events:
                if isinstance(e, yaml.AliasEvent) or getattr(e, "anchor", None):
                    raise FmtRefused("it uses YAML anchors or aliases, which fmt does not rewrite")
            root = loader.get_single_node()
        finally:
            loader.dispose()
        if not isinstance(root, yaml.MappingNode):
            raise FmtRefused("it is not a mapping")
        return root

    def _scalar_spans(self, node, seen=None):
        if isinstance(node, yaml.ScalarNode):
            end = node.end_mark.index
            if node.style in ("|", ">"):  # its span ends at its last line, not the blank ones after it
                end = node.start_mark.index + len(self.text[node.start_mark.index : end].rstrip())
            yield (node.start_mark.index, end)
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                yield from self._scalar_spans(k)
                yield from self._scalar_spans(v)
        elif isinstance(node, yaml.SequenceNode):
            for v in node.value:
                yield from self._scalar_spans(v)

    def _in_scalar(self, index: int) -> bool:
        import bisect

        i = bisect.bisect_right(self.spans, (index, float("inf"))) - 1
        return i >= 0 and self.spans[i][0] <= index < self.spans[i][1]

    def _line_comments(self):
        """(line, text, column, gap, full_line) for every comment; (line, None, ...) for blank lines."""
        offset = 0
        for n, line in enumerate(self.lines):
            if not line.strip():
                if not self._in_scalar(offset):
                    yield n, None, 0, 0, True
            else:
                for col, ch in enumerate(line):
                    if ch == "#" and (col == 0 or line[col - 1] in " \t") and not self._in_scalar(offset + col):
                        before = line[:col]
                        full = not before.strip()
                        gap = len(before) - len(before.rstrip())
                        yield n, line[col:].rstrip(), col, gap, full
                        break
            offset += len(line) + 1

    def _entries(self) -> list[_Entry]:
        out: list[_Entry] = []

        def walk(node):
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    out.append(_Entry(k.start_mark.line, id(k)))
                    walk(v)
            elif isinstance(node, yaml.SequenceNode):
                for v in node.value:
                    out.append(_Entry(v.start_mark.line, id(v)))
                    walk(v)

        walk(self.root)
        return out

    def _attach_comments(self) -> None:
        entries = self._entries()
        first_line = entries[0].line if entries else len(self.lines)
        for line, text, col, gap, full in self._line_comments():
            if full and line < first_line:
                self.header.append(text)
            elif full:
                target = next((e for e in entries if e.line > line), None)
                if target is None:
                    if text is not None:
                        self.trailer.append(text)
                    continue
                self.comments.setdefault(target.key, Comments()).leading.append(text)
            else:
                target = next((e for e in entries if e.line == line), None)
                if target is None:
                    before = [e for e in entries if e.line < line]
                    target = before[-1] if before else None
                if target is None:
                    self.trailer.append(text)
                    continue
                self.comments.setdefault(target.key, Comments()).trailing.append((text, col, gap))

    # -- scalars ------------------------------------------------------------------------
    def scalar(self, node: yaml.ScalarNode, flow: bool) -> str:
        src = self.text[node.start_mark.index : node.end_mark.index]
        if node.style in ("|", ">"):
            raise _NotInline
        if src == "":
            return "null" if flow else ""
        if "\n" in src:  # a scalar written over several lines: one line, same value
            return _dump_scalar(node)
        if flow and node.style is None and _FLOW_UNSAFE.search(src):
            # plain in block style, not in flow style (`${x}` inside `{...}`): quote it
            return json.dumps(node.value, ensure_ascii=False)
        return src

    def block_scalar(self, node: yaml.ScalarNode, indent: int) -> list[str]:
        src = self.text[node.start_mark.index : node.end_mark.index].rstrip("\n")
        head, *body = src.split("\n")
        present = [line for line in body if line.strip()]
        shift = min((len(l) - len(l.lstrip(" ")) for l in present), default=indent)
        return [head] + [(" " * indent + l[shift:]) if l.strip() else "" for l in body]

    # -- flow rendering -----------------------------------------------------------------
    def flow(self, node, order=None, gathered: Comments | None = None, inside: bool = False) -> str:
        """One-line flow text of `node` (`inside` a flow collection, or a block line's value);
        comments inside are gathered for the line."""
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, flow=inside)
        if isinstance(node, yaml.SequenceNode):
            parts = []
            for item in node.value:
                self._gather(id(item), gathered)
                parts.append(self.flow(item, None, gathered, inside=True))
            return "[" + ", ".join(parts) + "]"
        parts = []
        for k, v in _ordered(node, order):
            self._gather(id(k), gathered)
            value = self.flow(v, None, gathered, inside=True)
            parts.append(f"{self.scalar(k, True)}: {value}")
        return "{" + ", ".join(parts) + "}"

    def _gather(self, key, gathered: Comments | None) -> None:
        c = self.comments.get(key)
        if c is None or gathered is None:
            return
        gathered.leading += [t for t in c.leading if t is not None]
        gathered.trailing += c.trailing

    def try_flow(self, node, order=None) -> tuple[str, Comments] | None:
        gathered = Comments()
        try:
            return self.flow(node, order, gathered), gathered
        except _NotInline:
            return None

    # -- block rendering ----------------------------------------------------------------
    def entry_lines(self, key, indent: int, first: str, rest: list[str], extra: Comments | None = None,
                    align: bool = True) -> list[str]:
        """The lines of one entry: its leading comments, its first line with end-of-line comments, the rest.

        End-of-line comments keep their column when `align` (the entry keeps its one-line or
        several-line shape), else their distance from the text."""
        own = self.comments.get(key, Comments())
        lead = list(own.leading) + (list(extra.leading) if extra else [])
        trail = list(own.trailing) + (list(extra.trailing) if extra else [])
        out = []
        for t in lead:
            if t is None:  # a blank line: at most one, none at the start of a block
                if (out and out[-1] == "") or (not out and self._at_block_start):
                    continue
                out.append("")
            else:
                out.append(" " * indent + t)
        self._at_block_start = False
        out.append(_with_trailing(first, trail, align))
        return out + rest

    _at_block_start = True

    def mapping(self, node: yaml.MappingNode, indent: int, role) -> list[str]:
        out: list[str] = []
        self._at_block_start = True
        for k, v in _ordered(node, role.order(node)):
            key_text = self.scalar(k, False)
            child = role.child(k.value)
            lines = self.value_after_key(k, v, indent, key_text, child)
            out += lines
        return out

    def value_after_key(self, k, v, indent: int, key_text: str, role) -> list[str]:
        pad = " " * indent
        if isinstance(v, yaml.ScalarNode) and v.style in ("|", ">"):
            head, *body = self.block_scalar(v, indent + INDENT)
            return self.entry_lines(id(k), indent, f"{pad}{key_text}: {head}", body)
        inline = role.inline(self, v, len(pad) + len(key_text) + 2)
        if inline is not None:
            text, gathered = inline
            first = f"{pad}{key_text}: {text}" if text != "" else f"{pad}{key_text}:"
            return self.entry_lines(id(k), indent, first, [], gathered, align=_one_line(k, v))
        header = f"{pad}{key_text}:"
        lines = self.entry_lines(id(k), indent, header, [], align=not _one_line(k, v))
        if isinstance(v, yaml.MappingNode):
            return lines + self.mapping(v, indent + INDENT, role)
        return lines + self.sequence(v, indent + INDENT, role)

    def sequence(self, node: yaml.SequenceNode, indent: int, role) -> list[str]:
        out: list[str] = []
        self._at_block_start = True
        pad = " " * indent
        for item in node.value:
            child = role.item()
            if isinstance(item, yaml.ScalarNode) and item.style in ("|", ">"):
                head, *body = self.block_scalar(item, indent + INDENT)
                out += self.entry_lines(id(item), indent, f"{pad}- {head}", body)
                continue
            inline = child.inline(self, item, len(pad) + 2)
            if inline is not None:
                text, gathered = inline
                out += self.entry_lines(id(item), indent, f"{pad}- {text}", [], gathered, align=_one_line(item, item))
                continue
            if isinstance(item, yaml.MappingNode) and item.value:
                inner = self.mapping(item, indent + INDENT, child)
                # the item's own comments go before and after its first line, `- key: ...`
                lead_end = next(i for i, l in enumerate(inner) if l.strip() and not l.strip().startswith("#"))
                first = inner[lead_end]
                first = f"{pad}- {first[indent + INDENT:]}"
                self._at_block_start = not out
                out += self.entry_lines(id(item), indent, first, inner[lead_end + 1 :], Comments(
                    leading=[l.strip() or None for l in inner[:lead_end]]), align=not _one_line(item, item))
                continue
            self._at_block_start = not out
            out += self.entry_lines(id(item), indent, f"{pad}-", [])
            out += self.sequence(item, indent + INDENT, child)
        return out

    def document(self) -> str:
        lines = []
        for t in self.header:
            if t is not None or (lines and lines[-1] != ""):
                lines.append("" if t is None else t)
        lines += self.mapping(self.root, 0, _TOP)
        lines += self.trailer
        while lines and lines[0] == "":
            lines.pop(0)
        return "\n".join(lines) + "\n"


_FLOW_UNSAFE = re.compile(r"[\[\]{},]|: | #|:$")


class _NotInline(Exception):
    pass


def _dump_scalar(node: yaml.ScalarNode) -> str:
    value = yaml.load(yaml.serialize(node), Loader=_Loader)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # valid in flow and block style alike
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True)
    return text.removesuffix("\n...\n").strip()


def _depth(node) -> int:
    if isinstance(node, yaml.MappingNode):
        return 1 + max((_depth(v) for _, v in node.value), default=0)
    if isinstance(node, yaml.SequenceNode):
        return 1 + max((_depth(v) for v in node.value), default=0)
    return 0


def _ordered(node: yaml.MappingNode, order) -> list:
    pairs = list(node.value)
    if not order:
        return pairs
    first, last = order
    keyed = {k.value: (k, v) for k, v in pairs}
    head = [keyed[n] for n in first if n in keyed]
    tail = [keyed[n] for n in last if n in keyed]
    middle = [(k, v) for k, v in pairs if k.value not in first and k.value not in last]
    return head + middle + tail


def _one_line(start, node) -> bool:
    """Whether the source wrote from `start` to the end of `node` on one line."""
    end = node.end_mark
    last = end.line - 1 if end.column == 0 and end.line > start.start_mark.line else end.line
    return last == start.start_mark.line


def _with_trailing(line: str, trailing: list, align: bool = True) -> str:
    for k, (text, col, gap) in enumerate(trailing):
        if k == 0 and align and len(line) + 1 <= col:
            line = line.ljust(col) + text
        else:
            line = f"{line}{' ' * max(1, gap if k == 0 else 1)}{text}"
    return line


# -- roles: where a value sits decides its layout -------------------------------------------
class _Role:
    def order(self, node):
        return None

    def child(self, key) -> "_Role":
        return _GENERIC

    def item(self) -> "_Role":
        return _GENERIC

    def inline(self, fmt: _Formatter, node, column: int):
        """(text, gathered comments) to write the value on its key's line, or None for block style."""
        if isinstance(node, yaml.ScalarNode):
            return fmt.try_flow(node)
        return None


class _Generic(_Role):
    """train:, compile: and anything unknown: flow when it fits on a line, block otherwise."""

    def child(self, key):
        return self

    def item(self):
        return self

    def inline(self, fmt, node, column):
        if isinstance(node, yaml.ScalarNode):
            return fmt.try_flow(node)
        if not node.value:
            return fmt.try_flow(node)
        result = fmt.try_flow(node)
        if result is None or result[1].leading or column + len(result[0]) > LINE_WIDTH:
            return None
        return result


class _Flow(_Role):
    """Always one line (layers, inputs, lists of names), unless a block scalar forbids it."""

    def __init__(self, order=None):
        self._order = order

    def inline(self, fmt, node, column):
        return fmt.try_flow(node, self._order if isinstance(node, yaml.MappingNode) else None)


class _Section(_Role):
    """A top-level section's mapping: block style, its values laid out by `child`."""

    def __init__(self, child_role: _Role, order=None):
        self._child, self._order = child_role, order

    def order(self, node):
        return self._order

    def child(self, key):
        return self._child

    def item(self):
        return self._child


class _Layers(_Role):
    """A list of layers: each a one-line flow mapping, or a block group with `layers` last."""

    def item(self):
        return _LAYER

    def inline(self, fmt, node, column):
        if isinstance(node, yaml.SequenceNode) and not node.value:
            return fmt.try_flow(node)
        return None if isinstance(node, yaml.SequenceNode) else _GENERIC.inline(fmt, node, column)


class _Layer(_Role):
    def order(self, node):
        return (LAYER_FIRST, LAYER_LAST + ("layers",))

    def child(self, key):
        return _LAYERS if key == "layers" else _FLOW if key == "in" else _GENERIC

    def inline(self, fmt, node, column):
        if isinstance(node, yaml.MappingNode) and any(k.value == "layers" for k, _ in node.value):
            return None  # a group
        if isinstance(node, yaml.MappingNode):
            result = fmt.try_flow(node, (LAYER_FIRST, LAYER_LAST))
            if result is None or (_depth(node) > 2 and column + len(result[0]) > LINE_WIDTH):
                return None  # a long layer with mappings in mappings (an init:): block style
            return result
        return _GENERIC.inline(fmt, node, column)


class _Block(_Role):
    def order(self, node):
        return (BLOCK_ORDER, ())

    def child(self, key):
        if key == "layers":
            return _LAYERS
        if key == "params":
            return _Section(_FLOW)
        return _FLOW if key in ("inputs", "outputs") else _GENERIC

    def inline(self, fmt, node, column):
        return None if isinstance(node, yaml.MappingNode) and node.value else _GENERIC.inline(fmt, node, column)


class _Top(_Role):
    def order(self, node):
        return (TOP_ORDER, ())

    def child(self, key):
        return {
            "vars": _Section(_FLOW),
            "inputs": _Section(_FLOW),
            "blocks": _Section(_BLOCK),
            "layers": _LAYERS,
            "outputs": _FLOW,
        }.get(key, _SECTION)


class _SectionGeneric(_Generic):
    """A top-level section such as train: always a block mapping; inside, generic."""

    def inline(self, fmt, node, column):
        if isinstance(node, yaml.MappingNode) and node.value:
            return None
        return super().inline(fmt, node, column)

    def child(self, key):
        return _GENERIC

    def item(self):
        return _GENERIC


_GENERIC, _FLOW, _LAYERS, _LAYER, _BLOCK, _TOP, _SECTION = _Generic(), _Flow(), _Layers(), _Layer(), _Block(), _Top(), _SectionGeneric()


# -- the public functions -------------------------------------------------------------------


def comments_of(text: str, file: str = "<text>") -> Counter:
    """Every comment in a YAML text (as a multiset), found the way fmt finds them."""
    f = _Formatter(text, file)
    found = Counter()
    for _, t, _, _, _ in f._line_comments():
        if t is not None:
            found[t] += 1
    return found


def format_text(text: str, file: str = "<text>") -> str:
    """The canonical layout of a spec's text. Raises SpecError for YAML errors, FmtRefused
    for files it leaves alone; never returns text that loads differently or loses a comment."""
    before = load_yaml_text(text, file)  # located syntax errors, duplicate keys
    f = _Formatter(text, file)
    result = f.document()
    after = load_yaml_text(result, file + " (formatted)")
    load_yaml_text(text, file)  # leave the original text quotable in later error messages
    if not _same(before, after):
        raise SpecError(f"fmt would change what {file} means; left it as it is (a bug in lbdlc fmt)", Loc(file, 1, 1))
    if comments_of(text, file) != comments_of(result, file):
        raise SpecError(f"fmt would lose a comment of {file}; left it as it is (a bug in lbdlc fmt)", Loc(file, 1, 1))
    return result


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and (a == b or (a != a and b != b))


def is_spec_text(text: str) -> bool:
    """A YAML file is an lbdlc spec when its top-level mapping has an `lbdlc` key."""
    return re.search(r"^lbdlc\s*:", text, re.M) is not None


SKIP_DIRS = {"out", "node_modules", "build", "dist", "__pycache__"}


def spec_files(paths: list[Path]) -> list[tuple[Path, bool]]:
    """(file, named) for each file to format: named files as given, directories walked for
    `*.yaml`/`*.yml` spec files (hidden and build directories skipped, lock files too)."""
    out: list[tuple[Path, bool]] = []
    for p in paths:
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS
                                 and not (Path(root) / d / "pyvenv.cfg").exists())
                for name in sorted(files):
                    if name.endswith((".yaml", ".yml")) and not name.endswith((".lock.yaml", ".lock.yml")):
                        out.append((Path(root) / name, False))
        else:
            out.append((p, True))
    return out


@dataclass
class FmtResult:
    path: Path
    status: str  # "unchanged", "reformatted" (or would be, with --check), "skipped", "error"
    message: str = ""
    error: Exception | None = None


def format_file(path: Path, check: bool, named: bool = True) -> FmtResult:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return FmtResult(path, "error", error=SpecError(f"no such file: {path}"))
    except UnicodeDecodeError as exc:
        return FmtResult(path, "error", error=SpecError(f"{path} is not UTF-8 text ({exc.reason})"))
    if not is_spec_text(text):
        return FmtResult(path, "skipped", "not an lbdlc spec (no top-level `lbdlc:` key)")
    try:
        new = format_text(text, str(path))
    except FmtRefused as exc:
        return FmtResult(path, "skipped", str(exc))
    except SpecError as exc:
        return FmtResult(path, "error", error=exc)
    if new == text:
        return FmtResult(path, "unchanged")
    if not check:
        tmp = path.with_name(f".{path.name}.fmt-tmp")
        tmp.write_text(new, encoding="utf-8")
        os.replace(tmp, path)
    return FmtResult(path, "reformatted")
