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
