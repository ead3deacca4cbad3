from pathlib import Path

import pytest
from typer.testing import CliRunner

from lbdlc.cli import app

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"


@pytest.fixture
def cli():
    """Run the lbdlc CLI in-process: cli("check", path) -> (exit code, stdout, stderr)."""
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(app, [str(a) for a in args])
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.stdout, result.stderr

    return run


@pytest.fixture
def write_spec(tmp_path):
    """Write YAML text to a spec file and return its path."""

    def write(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def located(stderr: str, path, line: int, needle: str) -> str:
    """Assert the first error is at path:line:col, where col is that of `needle` on the line,
    with the line quoted and a caret under the column; return the first line."""
    col = path.read_text().splitlines()[line - 1].index(needle) + 1
    lines = stderr.splitlines()
    assert lines[0].startswith(f"{path}:{line}:{col}: error: "), stderr
    quoted, caret = lines[1], lines[2]
    assert quoted.startswith(f"{line:>4} | ")
    assert caret.index("^") == len(f"{line:>4} | ") + col - 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def perturbed_weights(spec, overrides=(), seed: int = 3) -> dict:
    """Seeded initial weights with normalisation layers moved far from the identity
    (scales and running variances in [0.5, 1.5), shifts and means ~0.1), so that a parity
    test really exercises them; the other weights keep their fan-in scaling."""
    import torch

    from lbdlc.lower import load, lower
    from lbdlc.weights import initialize

    graph = lower(load(spec, list(overrides)))
    weights = initialize(graph, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    norms = {p for n in graph.nodes if n.op.endswith("_norm") for p in n.params.values()}
    for name, tensor in weights.items():
        if name not in norms or tensor.dtype != torch.float32:
            continue
        if name.endswith(("weight", "running_var")):
            weights[name] = torch.rand(tensor.shape, generator=gen) + 0.5
        else:
            weights[name] = 0.1 * torch.randn(tensor.shape, generator=gen)
    return weights
