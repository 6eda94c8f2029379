"""The command line's own surface (each subcommand is tested where it is built)."""

from __future__ import annotations

from typer.testing import CliRunner

import normlab
from normlab.cli import app


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"normlab {normlab.__version__}"


def test_bench_rejects_unknown_suite() -> None:
    result = CliRunner().invoke(app, ["bench", "--suite", "nope"])
    assert result.exit_code != 0
    assert "unknown suite(s) ['nope']" in result.output
