"""`lbdlc merge`: task arithmetic θ + Σ λ_t (θ_t − θ), TIES, and refusals naming the first difference."""
import torch
from safetensors.torch import load_file, save_file

from lbdlc.merge import ties


def _files(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(4, generator=g), "bn.count": torch.tensor(7)}
    ft1 = {k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 1) for k, v in base.items()}
    ft2 = {k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 2) for k, v in base.items()}
    paths = []
    for name, d in [("base", base), ("ft1", ft1), ("ft2", ft2)]:
        save_file(d, str(tmp_path / f"{name}.safetensors"))
        paths.append(tmp_path / f"{name}.safetensors")
    return (base, ft1, ft2), paths


def test_task_arithmetic(cli, tmp_path):
    (base, ft1, ft2), paths = _files(tmp_path)
    out = tmp_path / "merged.safetensors"
    code, _, stderr = cli("merge", *paths, "--weights", "0.5,0.25", "-o", out)
    assert code == 0, stderr
    merged = load_file(str(out))
    assert set(merged) == set(base)
    for k in ("a.weight", "a.bias"):
        expect = base[k] + 0.5 * (ft1[k] - base[k]) + 0.25 * (ft2[k] - base[k])
        assert torch.allclose(merged[k], expect, atol=1e-6)
    assert merged["bn.count"].item() == 7  # integer buffers come from the base
    # weights 1,0 give back ft1 exactly (up to float rounding)
    cli("merge", *paths, "--weights", "1,0", "-o", out)
    assert torch.allclose(load_file(str(out))["a.weight"], ft1["a.weight"], atol=1e-6)


def test_ties_hand_example():
    base = {"w": torch.zeros(4)}
    t1 = {"w": torch.tensor([3.0, -1.0, 0.1, 2.0])}
    t2 = {"w": torch.tensor([1.0, 2.0, -0.2, -4.0])}
    merged = ties(base, [t1, t2], [1.0, 1.0], density=0.5)
    # trimmed: t1 -> [3, 0, 0, 2], t2 -> [0, 2, 0, -4]; signs elected from sums [3, 2, 0, -2]
    assert torch.allclose(merged["w"], torch.tensor([3.0, 2.0, 0.0, -4.0]))


def test_refuses_mismatches(cli, tmp_path):
    (_, ft1, _), paths = _files(tmp_path)
    out = tmp_path / "m.safetensors"
    bad = dict(ft1)
    bad["a.bias"] = torch.zeros(5)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    code, _, stderr = cli("merge", paths[0], tmp_path / "bad.safetensors", "-o", out)
    assert code == 2 and "'a.bias' has shape [5]" in stderr and "[4]" in stderr and "Traceback" not in stderr
    renamed = {("b.weight" if k == "a.weight" else k): v for k, v in ft1.items()}
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    code, _, stderr = cli("merge", paths[0], tmp_path / "renamed.safetensors", "-o", out)
    assert code == 2 and "no parameter 'a.weight'" in stderr
    code, _, stderr = cli("merge", *paths, "--weights", "0.5", "-o", out)
    assert code == 2 and "1 values for 2" in stderr
    code, _, stderr = cli("merge", paths[0], tmp_path / "nope.safetensors", "-o", out)
    assert code == 2 and "no such weights file" in stderr
    assert not out.exists()
