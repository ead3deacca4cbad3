"""Rendering `lbdlc diff` results: colored terminal text and Markdown (JSON is the result itself).

Layers that differ the same way in every repetition of a block are shown once, with the
repetition index as `*` and a count (`h.*.attn ×12`); layers of block uses that were added
or removed as a whole are shown as that block use (the structure section), not one by one.
The JSON output keeps every layer.
"""
from __future__ import annotations

import json
import re

from rich.console import Console
from rich.text import Text

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)+")
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")
STATUS_ORDER = ("added", "removed", "renamed", "changed", "affected")
MARK = {"added": "+", "removed": "-", "renamed": ">", "changed": "~", "affected": "·"}
STYLE = {"added": "green", "removed": "red", "renamed": "cyan", "changed": "yellow", "affected": "dim"}


def _num(n: int) -> str:
    return f"{n:,}"


def _signed(n: int) -> str:
    return f"+{n:,}" if n > 0 else f"{n:,}"


def _pct(delta: int, old: int) -> str:
    if not delta:
        return ""
    return f" ({delta / old:+.1%})" if old else ""


def _bytes(n: float) -> str:
    from .memory import human_size

    return human_size(n) if n >= 0 else "-" + human_size(-n)


def _value(v) -> str:
    if isinstance(v, str):
        return v
    return json.dumps(v) if isinstance(v, (dict, list, bool)) or v is None else str(v)


def _shapes(shapes: list[str]) -> str:
    return shapes[0] if len(shapes) == 1 else ", ".join(shapes)


def _details(e: dict) -> list[str]:
    """What changed in one layer, one line each (names as in each graph)."""
    c, out = e["changes"], []
    if e["status"] in ("added", "removed"):
        side = e["new"] if e["status"] == "added" else e["old"]
        attrs = ", ".join(f"{k}: {_value(v)}" for k, v in side["attrs"].items())
        out.append(f"{{{attrs}}}" if attrs else "")
        out.append(f"output {_shapes(side['output_shapes'])}, {_num(side['params'])} params, {_num(side['flops'])} FLOPs")
        return [d for d in out if d]
    if "name" in c:
        out.append(f"renamed {c['name'][0]} → {c['name'][1]}")
    if "op" in c:
        out.append(f"op: {c['op'][0]} → {c['op'][1]}")
    for k, (a, b) in c.get("attrs", {}).items():
        if isinstance(a, dict) and isinstance(b, dict):  # e.g. init: only the values that changed
            from .diff import _deep_changes

            leaves: list = []
            _deep_changes(a, b, k, leaves)
            for leaf in leaves:
                out.append(f"{leaf['path']}: {_value(leaf['old']) if leaf['change'] != 'added' else '(unset)'} → "
                           f"{_value(leaf['new']) if leaf['change'] != 'removed' else '(unset)'}")
            continue
        out.append(f"{k}: {_value(a) if a is not None else '(unset)'} → {_value(b) if b is not None else '(unset)'}")
    if "in" in c:
        out.append(f"in: {_value(c['in'][0])} → {_value(c['in'][1])}")
    if "moved" in c:
        out.append(f"moved: position {c['moved'][0]} → {c['moved'][1]}")
    if "output_shapes" in c:
        out.append(f"output: {_shapes(c['output_shapes'][0])} → {_shapes(c['output_shapes'][1])}")
    for k, (a, b) in c.get("param_shapes", {}).items():
        out.append(f"{k}: {a if a is not None else '(none)'} → {b if b is not None else '(none)'}")
    if "params" in c:
        a, b = c["params"]
        out.append(f"params: {_num(a)} → {_num(b)} ({_signed(b - a)})")
    if "flops" in c:
        a, b = c["flops"]
        out.append(f"FLOPs: {_num(a)} → {_num(b)} ({_signed(b - a)})")
    if "activation_bytes" in c:
        a, b = c["activation_bytes"]
        out.append(f"activations: {_bytes(a)} → {_bytes(b)}")
    return out


def _pattern(text: str) -> str:
    """Scoped names with their repetition indices as `*`: `h.3.attn` -> `h.*.attn`."""
    return _NAME.sub(lambda m: _INDEX.sub("*", m.group(0)), text)


def _covered(result: dict) -> list[str]:
    """Scopes added or removed as a whole: their layers are shown as the block use."""
    prefixes = []
    for s in result["structure"]:
        if s["kind"] == "repeat":
            prefixes += s["added"] + s["removed"]
        elif s.get("change") in ("added", "removed"):
            prefixes.append(s["scope"])
    return [p + "." for p in prefixes]


def grouped_layers(result: dict) -> list[dict]:
    """Layer entries merged where they differ only by repetition index; in status order."""
    covered = _covered(result)
    groups: dict[tuple, dict] = {}
    for e in result["layers"]:
        if e["status"] in ("added", "removed") and any(e["name"].startswith(p) for p in covered):
            continue
        details = _details(e)
        key = (e["status"], _pattern(e["name"]), e["op"], tuple(_pattern(d) for d in details))
        g = groups.get(key)
        if g is None:
            groups[key] = {"entry": e, "names": [e["name"]], "details": details, "status": e["status"]}
        else:
            g["names"].append(e["name"])
    out = list(groups.values())
    for g in out:
        g["label"] = g["names"][0] if len(g["names"]) == 1 else f"{_pattern(g['names'][0])} ×{len(g['names'])}"
        if len(g["names"]) > 1:
            g["details"] = [_pattern(d) if _pattern(d) != d and len(set(g["names"])) > 1 else d for d in g["details"]]
    return sorted(out, key=lambda g: STATUS_ORDER.index(g["status"]))


def _totals_rows(result: dict) -> list[tuple[str, str, str, str]]:
    o, n, d = result["old"], result["new"], result["delta"]
    rows = [
        ("parameters", _num(o["params"]), _num(n["params"]), _signed(d["params"]) + _pct(d["params"], o["params"])),
        ("buffers", _num(o["buffers"]), _num(n["buffers"]), _signed(d["buffers"]) + _pct(d["buffers"], o["buffers"])),
        ("FLOPs per sample", _num(o["flops"]), _num(n["flops"]), _signed(d["flops"]) + _pct(d["flops"], o["flops"])),
        ("activations per sample", _bytes(o["activation_bytes"]), _bytes(n["activation_bytes"]),
         ("+" if d["activation_bytes"] > 0 else "") + _bytes(d["activation_bytes"]) + _pct(d["activation_bytes"], o["activation_bytes"])),
        ("layers", _num(o["layers"]), _num(n["layers"]), _signed(d["layers"])),
    ]
    return rows


def _structure_lines(result: dict) -> list[str]:
    lines = []
    for s in result["structure"]:
        if s["kind"] == "repeat":
            what = []
            if s["added"]:
                what.append(f"added {', '.join(s['added'])}: {_signed(s['added_params'])} params")
            if s["removed"]:
                what.append(f"removed {', '.join(s['removed'])}: {_signed(-s['removed_params'])} params")
            block = f" {s['block']}" if s.get("block") else ""
            lines.append(f"{s['scope']}: {s['old']} → {s['new']}{block} repetitions ({'; '.join(what)})")
        elif s["change"] in ("added", "removed"):
            lines.append(f"{s['scope']}: block use {s['change']} ({s['block']}, {s['layers']} layers, {_num(s['params'])} params)")
        else:
            ps = ", ".join(f"{k}: {_value(a)} → {_value(b)}" for k, (a, b) in s["params"].items())
            block = f"{s['old_block']} → {s['block']}" if s["old_block"] != s["block"] else s["block"]
            lines.append(f"{s['scope']}: block {block}" + (f", {ps}" if ps else ""))
    return lines


def _io_lines(items: list[dict], what: str) -> list[str]:
    lines = []
    for c in items:
        name = c.get("name", (c["new"] or c["old"])["name"])
        sig = lambda v: f"{v['name']} [{', '.join(map(str, v['shape']))}] {v['dtype']}" if v else "(none)"  # noqa: E731
        if c["change"] == "changed":
            lines.append(f"{what} {name}: {sig(c['old'])} → {sig(c['new'])}")
        else:
            lines.append(f"{what} {name} {c['change']}: {sig(c['new'] or c['old'])}")
    return lines


def _section_lines(result: dict) -> list[str]:
    out = []
    for s in result["sections"]:
        if s["change"] == "changed":
            out.append(f"{s['path']}: {_value(s['old'])} → {_value(s['new'])}")
        elif s["change"] == "added":
            out.append(f"{s['path']}: added {_value(s['new'])}")
        else:
            out.append(f"{s['path']}: removed (was {_value(s['old'])})")
    return out


def _loc(where: dict | None) -> str:
    return f"{where['file']}:{where['line']}" if where else ""


def _summary_line(result: dict) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in result["counts"].items() if n)
    return f"layers: {counts}" if counts else "layers: none differ"


# -- terminal --------------------------------------------------------------------------------
def render_text(result: dict, console: Console) -> None:
    o, n = result["old"], result["new"]
    console.print(Text.assemble(("lbdlc diff ", "bold"), f"{o['name']} ({o['label']}) → {n['name']} ({n['label']})"))
    for w in result["warnings"]:
        console.print(Text(f"warning: {w}", style="yellow"))
    if result["same"]:
        console.print(Text("no model changes", style="bold green"))
        _print_artifacts(result, console)
        return
    width = max(len(r[0]) for r in _totals_rows(result))
    rows = _totals_rows(result)
    cw = [max(len(r[i]) for r in rows) for i in (1, 2)]
    console.print(Text(f"  {'':<{width}}  {'old':>{cw[0]}}  {'new':>{cw[1]}}  delta", style="bold"))
    for label, a, b, d in rows:
        console.print(Text(f"  {label:<{width}}  {a:>{cw[0]}}  {b:>{cw[1]}}  {d}"))
    for title, lines in (("inputs", _io_lines(result["inputs"], "input")), ("outputs", _io_lines(result["outputs"], "output")),
                         ("structure", _structure_lines(result)), ("spec", _section_lines(result))):
        if lines:
            console.print(Text(title, style="bold"))
            for line in lines:
                console.print(Text("  " + line))
    groups = grouped_layers(result)
    console.print(Text(_summary_line(result), style="bold"))
    for g in groups:
        e, style = g["entry"], STYLE[g["status"]]
        head = Text.assemble((f"  {MARK[g['status']]} {g['status']:<8} ", style), (g["label"], "bold " + style if style != "dim" else style), f" ({e['op']})")
        console.print(head)
        for d in g["details"]:
            console.print(Text("      " + d))
        if g["status"] in ("changed", "renamed") and _same_locs(g, result):
            for side, where in (("old", e["old_loc"]), ("new", e["new_loc"])):
                if where:
                    console.print(Text(f"      {side} {_loc(where)}: {where['text']}", style="dim"))
        elif g["status"] in ("added", "removed"):
            where = e["new_loc"] if g["status"] == "added" else e["old_loc"]
            if where:
                console.print(Text(f"      {_loc(where)}: {where['text']}", style="dim"))
    _print_artifacts(result, console)


def _same_locs(g: dict, result: dict) -> bool:
    """Whether every layer of a group comes from the same lines (one block, repeated)."""
    if len(g["names"]) == 1:
        return True
    entries = [e for e in result["layers"] if e["name"] in set(g["names"])]
    return len({(_loc(e["old_loc"]), _loc(e["new_loc"])) for e in entries}) == 1


def _print_artifacts(result: dict, console: Console) -> None:
    if "artifacts" not in result:
        return
    if not result["artifacts"]:
        console.print(Text("artifacts: identical"))
        return
    console.print(Text("artifacts", style="bold"))
    for a in result["artifacts"]:
        console.print(Text(f"  {a['name']}: {a['change']}"))


# -- markdown --------------------------------------------------------------------------------
def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;")


def render_markdown(result: dict) -> str:
    o, n = result["old"], result["new"]
    lines = [f"### lbdlc diff: `{o['name']}` ({_md(o['label'])}) → `{n['name']}` ({_md(n['label'])})", ""]
    for w in result["warnings"]:
        lines.append(f"> warning: {_md(w)}")
    if result["same"]:
        lines.append("**No model changes.**")
        return "\n".join(lines) + "\n"
    lines += ["| | old | new | Δ |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in _totals_rows(result)]
    for title, items in (("Inputs", _io_lines(result["inputs"], "input")), ("Outputs", _io_lines(result["outputs"], "output")),
                         ("Structure", _structure_lines(result)), ("Spec", _section_lines(result))):
        if items:
            lines += ["", f"**{title}**", ""] + [f"- {_md(i)}" for i in items]
    groups = grouped_layers(result)
    lines += ["", f"**Layers** ({_summary_line(result).removeprefix('layers: ')})", ""]
    if groups:
        lines += ["| | layer | op | what changed | lines |", "|---|---|---|---|---|"]
        for g in groups:
            e = g["entry"]
            locs = []
            if _same_locs(g, result):
                if e["old_loc"] and g["status"] != "added":
                    locs.append(f"old {_loc(e['old_loc'])}")
                if e["new_loc"] and g["status"] != "removed":
                    locs.append(f"new {_loc(e['new_loc'])}")
            what = "<br>".join(_md(d) for d in g["details"])
            lines.append(f"| {MARK[g['status']]} {g['status']} | `{g['label']}` | {e['op']} | {what} | {_md(', '.join(locs))} |")
    if result.get("artifacts"):
        lines += ["", "**Artifacts**", ""] + [f"- `{a['name']}`: {a['change']}" for a in result["artifacts"]]
    return "\n".join(lines) + "\n"
