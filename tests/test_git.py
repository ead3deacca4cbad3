"""Specs in git: `lbdlc diff REV -- PATH` in a repository made by the test, `git-setup`'s
diff driver, reproducible builds, manifests compared, lock files."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import SPECS
from lbdlc.driver import BuildOptions
from lbdlc.fmt import format_text

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1", "GIT_PAGER": "cat"}
    r = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A repository with gpt2.yaml and gpt3.yaml (which extends it): commit 1 as in specs/,
    commit 2 with gpt2's vocabulary padded to 50304; the working tree as commit 2."""
    root = tmp_path / "repo"
    (root / "specs").mkdir(parents=True)
    git(root, "init", "-q")
    git(root, "config", "user.email", "t@example.com")
    git(root, "config", "user.name", "t")
    for name in ("gpt2.yaml", "gpt3.yaml", "mlp.yaml"):
        shutil.copy(SPECS / name, root / "specs" / name)
    git(root, "add", ".")
    git(root, "commit", "-qm", "one")
    gpt2 = root / "specs" / "gpt2.yaml"
    text, n = re.subn(r"^  vocab: 50257\b", "  vocab: 50304", gpt2.read_text(), flags=re.M)
    assert n == 1
    gpt2.write_text(text)
    git(root, "commit", "-qam", "two")
    monkeypatch.chdir(root)
    return root


def _json(cli, *args):
    code, out, err = cli("diff", *args, "--format", "json")
    assert code in (0, 1), err
    return code, json.loads(out)


def test_diff_against_a_revision(cli, repo):
    code, d = _json(cli, "HEAD~1", "--", "specs/gpt2.yaml")
    assert code == 1
    assert d["old"]["label"] == "HEAD~1:specs/gpt2.yaml" and d["new"]["label"] == "specs/gpt2.yaml"
    wte = next(l for l in d["layers"] if l["name"] == "wte")
    assert wte["changes"]["attrs"] == {"num_embeddings": [50257, 50304]}
    assert wte["old_loc"]["file"] == "HEAD~1:specs/gpt2.yaml" and "name: wte" in wte["old_loc"]["text"]
    assert d["delta"]["params"] == (50304 - 50257) * 768  # the tied head adds nothing
    # the other spellings of the same comparison
    changes = lambda r: [(l["name"], l["status"], l["changes"]) for l in r["layers"]]  # noqa: E731
    both = _json(cli, "HEAD~1", "HEAD", "--", "specs/gpt2.yaml")[1]
    assert both["new"]["label"] == "HEAD:specs/gpt2.yaml" and changes(both) == changes(d)
    assert _json(cli, "HEAD~1:specs/gpt2.yaml", "specs/gpt2.yaml")[1]["delta"] == d["delta"]
    code, same = _json(cli, "specs/gpt2.yaml")  # HEAD against the working tree
    assert code == 0 and same["same"]


def test_extends_resolves_in_the_old_revision(cli, repo):
    """gpt3 extends gpt2: its old version is built on gpt2 as it was then, so the change of
    the base's vocabulary shows, although gpt3.yaml itself did not change."""
    code, d = _json(cli, "HEAD~1", "--", "specs/gpt3.yaml")
    assert code == 1
    wte = next(l for l in d["layers"] if l["name"] == "wte")
    assert wte["changes"]["attrs"] == {"num_embeddings": [50257, 50304]}
    assert d["delta"]["params"] == (50304 - 50257) * 12288
    assert wte["old_loc"]["file"] == "HEAD~1:specs/gpt2.yaml"


def test_revision_errors(cli, repo):
    code, _, err = cli("diff", "nosuchrev", "--", "specs/gpt2.yaml")
    assert code == 2 and "neither a file nor a git revision" in err
    code, _, err = cli("diff", "HEAD~1", "--", "specs/missing.yaml")
    assert code == 2 and "no such file" in err
    # a spec that was broken in the old revision: the error names REV:path and quotes its line
    mlp = repo / "specs" / "mlp.yaml"
    good = mlp.read_text()
    mlp.write_text(good.replace("out_features: 25", "out_feature: 25"))
    git(repo, "commit", "-qam", "broken")
    mlp.write_text(good)
    code, _, err = cli("diff", "HEAD", "--", "specs/mlp.yaml")
    assert code == 2 and "Traceback" not in err
    line = next(i for i, l in enumerate(good.splitlines(), 1) if "out_features: 25" in l)
    assert err.startswith(f"HEAD:specs/mlp.yaml:{line}:") and "out_feature" in err.splitlines()[1]


def test_git_setup_makes_git_diff_semantic(cli, repo):
    code, out, err = cli("git-setup")
    assert code == 0, err
    assert "specs/**/*.yaml diff=lbdlc" in (repo / ".gitattributes").read_text().splitlines()
    assert git(repo, "config", "--get", "diff.lbdlc.textconv").strip().endswith("textconv")
    code, _, _ = cli("git-setup")  # idempotent
    assert (repo / ".gitattributes").read_text().count("diff=lbdlc") == 1

    mlp = repo / "specs" / "mlp.yaml"
    mlp.write_text(mlp.read_text().replace("out_features: 25", "out_features: 30"))
    shown = git(repo, "diff", "specs/mlp.yaml")
    assert "# lbdlc textconv: the resolved spec" in shown
    assert "-# 1,557 parameters" in shown and "+# 1,862 parameters" in shown
    # the changed layer and the one downstream whose parameters changed with it
    assert re.search(r"^-  - \{op: linear, name: fc1, out_features: 25.*# \[batch, 25\], 1,275 params$", shown, re.M)
    assert re.search(r"^\+  - \{op: linear, name: fc1, out_features: 30.*# \[batch, 30\], 1,530 params$", shown, re.M)
    assert re.search(r"^\+  - \{op: linear, name: fc2.*# \[batch, 10\], 310 params$", shown, re.M)
    # git hands textconv a temporary copy of the old gpt3.yaml: its `extends` still resolves
    gpt3 = repo / "specs" / "gpt3.yaml"
    gpt3.write_text(gpt3.read_text().replace("n_layer: 96", "n_layer: 95"))
    shown = git(repo, "diff", "HEAD", "--", "specs/gpt3.yaml")
    assert "not resolved" not in shown
    assert re.search(r"^-  - \{op: layer_norm, name: h\.95\.ln_1", shown, re.M)
    assert "out_features: 50304, bias: false}  # [batch, seq, 50304]" in shown  # the base's vocab, as context

    code, _, err = cli("git-setup", "--semantic")
    assert code == 0, err
    shown = git(repo, "diff", "specs/mlp.yaml")
    assert "lbdlc diff mlp (a/specs/mlp.yaml) → mlp (b/specs/mlp.yaml)" in shown
    assert "out_features: 25 → 30" in shown and "+  - {name: fc1, op: linear, out_features: 30}" in shown


def test_textconv_falls_back_to_the_text(cli, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("lbdlc: 1\nlayers: []\n")
    code, out, _ = cli("textconv", broken)
    assert code == 0 and out.startswith("lbdlc: 1\nlayers: []\n") and "# lbdlc textconv: not resolved" in out
    other = tmp_path / "other.yaml"
    other.write_text("a: 1\n")
    assert cli("textconv", other)[1] == "a: 1\n"


def test_build_check_reproducible_mlp_all_backends(cli, tmp_path):
    code, out, err = cli("build", SPECS / "mlp.yaml", "-o", tmp_path / "mlp", "--check-reproducible")
    assert code == 0, err
    assert "reproducible: 5 files byte-identical across two builds" in out  # TVM library included
    manifest = json.loads((tmp_path / "mlp" / "manifest.json").read_text())
    assert set(manifest["artifacts"]) == {"model.py", "model.onnx", "model.tvm.so", "weights.safetensors"}
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["spec"]["resolved_sha256"])


def test_build_check_reproducible_lenet_with_train_script(cli, tmp_path):
    code, out, err = cli("build", SPECS / "lenet.yaml", "-o", tmp_path / "lenet", "-b", "pytorch", "-b", "onnx", "--check-reproducible")
    assert code == 0, err
    assert "reproducible: 5 files byte-identical" in out  # model.py, train.py, model.onnx, weights, manifest


def test_reproducibility_check_reports_differences(tmp_path):
    from lbdlc.reproducible import compare_dirs

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d, extra in (("a", b"1"), ("b", b"2")):
        (tmp_path / d / "same.bin").write_bytes(b"x")
        (tmp_path / d / "model.py").write_bytes(extra)
    (tmp_path / "a" / "only_a").write_bytes(b"")
    checks = {c.name: c.same for c in compare_dirs(tmp_path / "a", tmp_path / "b")}
    assert checks == {"same.bin": True, "model.py": False, "only_a": False}


def test_manifests_compare_by_resolved_spec(cli, tmp_path):
    """A reformatted spec builds the same model: equal resolved hash, other spec hash; two
    builds' manifests can be diffed (the model and the artifacts that changed)."""
    from lbdlc.driver import build

    spec = tmp_path / "mlp.yaml"
    spec.write_text(format_text((SPECS / "mlp.yaml").read_text().replace("{name: fc1, op: linear, out_features: 25}",
                                                                          "{op: linear, out_features: 25, name: fc1}  # moved keys")))
    options = BuildOptions(backends=("pytorch",))
    a = build(SPECS / "mlp.yaml", tmp_path / "a", options).manifest
    b = build(spec, tmp_path / "b", options).manifest
    assert a["spec"]["resolved_sha256"] == b["spec"]["resolved_sha256"]
    assert a["spec"]["sha256"] != b["spec"]["sha256"]
    c = build(SPECS / "mlp.yaml", tmp_path / "c", BuildOptions(backends=("pytorch",), overrides=("fc2.out_features=12",))).manifest
    assert c["spec"]["resolved_sha256"] != a["spec"]["resolved_sha256"]
    code, d = _json(cli, tmp_path / "a", tmp_path / "b")
    assert code == 0 and d["same"]
    code, d = _json(cli, tmp_path / "a", tmp_path / "c" / "manifest.json")
    assert code == 1
    assert {l["name"]: l["status"] for l in d["layers"]} == {"fc2": "changed", "relu_2": "affected", "fc3": "affected"}
    assert {x["name"] for x in d["artifacts"]} == {"model.py", "weights.safetensors"}


@pytest.mark.parametrize("spec", sorted(p.name for p in SPECS.glob("*.yaml")))
def test_lock_file_resolves_to_the_same_model(cli, tmp_path, spec):
    lock = tmp_path / spec.replace(".yaml", ".lock.yaml")
    code, _, err = cli("lock", SPECS / spec, "-o", lock)
    assert code == 0, err
    text = lock.read_text()
    data = json.loads(re.search(r"^# lbdlc-lock: (.*)$", text, re.M).group(1))
    assert data["versions"]["lbdlc"] and data["spec"] == spec
    code, out, err = cli("diff", SPECS / spec, lock)
    assert code == 0 and "no model changes" in out, err
    code, _, err = cli("lock", "--check", SPECS / spec, "-o", lock)
    assert code == 0, err


def test_stale_lock_is_reported(cli, tmp_path):
    spec = tmp_path / "mlp.yaml"
    shutil.copy(SPECS / "mlp.yaml", spec)
    code, out, _ = cli("lock", spec)
    assert code == 0 and (tmp_path / "mlp.lock.yaml").exists()
    assert "out_features: 25" in (tmp_path / "mlp.lock.yaml").read_text()
    spec.write_text(spec.read_text().replace("out_features: 25", "out_features: 26"))
    code, _, err = cli("lock", "--check", spec)
    assert code == 1 and "no longer resolves to the model locked" in err
    code, _, err = cli("build", spec, "-o", tmp_path / "out", "-b", "pytorch")
    assert code == 0 and "warning: " in err and "no longer resolves to the model locked" in err
    # the lock file still builds what was locked
    code, d = _json(cli, SPECS / "mlp.yaml", tmp_path / "mlp.lock.yaml")
    assert code == 0


def _buildable() -> list[str]:
    return sorted(p.name for p in SPECS.glob("*.yaml") if p.name != "gpt3.yaml")  # gpt3: check-only (175B)


@pytest.mark.slow
@pytest.mark.parametrize("spec", _buildable())
def test_every_buildable_spec_is_reproducible(tmp_path, spec):
    from lbdlc.reproducible import check_reproducible

    _, checks = check_reproducible(SPECS / spec, BuildOptions(), name=spec.removesuffix(".yaml"))
    differ = [c.name for c in checks if not c.same]
    assert not differ, differ
    assert {c.name for c in checks} >= {"model.py", "model.onnx", "model.tvm.so", "weights.safetensors", "manifest.json"}
