"""specs/README.md stays true: every spec is listed, with the numbers `lbdlc check` gives."""
import json
import re

from conftest import SPECS


def test_table_matches_check(cli):
    rows = {}
    for line in (SPECS / "README.md").read_text().splitlines():
        m = re.match(r"\| `(\w+)\.yaml` \|.*\| ([\d,]+) \| ([\d,]+) \|$", line)
        if m:
            rows[m.group(1)] = (int(m.group(2).replace(",", "")), int(m.group(3).replace(",", "")))
    assert sorted(rows) == sorted(p.stem for p in SPECS.glob("*.yaml"))
    for name, (params, flops) in rows.items():
        code, out, err = cli("check", SPECS / f"{name}.yaml", "--json")
        assert code == 0, err
        report = json.loads(out)
        assert (report["params"], report["flops"]) == (params, flops), name
