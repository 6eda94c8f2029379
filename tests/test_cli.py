"""The command line's own surface (each subcommand is tested where it is built)."""

from __future__ import annotations

from pathlib import Path

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


def test_lab_run_data_dir_must_be_an_existing_folder_for_a_file_dataset(tmp_path: Path) -> None:
    runner = CliRunner(env={"COLUMNS": "1000"})
    result = runner.invoke(app, ["lab", "run", "convergence", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "--data-dir is only read for fashion-mnist, mnist, cifar10; digits is built in" in (
        result.output
    )
    missing = tmp_path / "nope"
    result = runner.invoke(
        app, ["lab", "run", "convergence", "--dataset", "mnist", "--data-dir", str(missing)]
    )
    assert result.exit_code == 2 and f"'{missing}' does not exist" in result.output


def test_lab_run_stops_on_a_partial_data_dir_naming_the_missing_file(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    result = CliRunner(env={"COLUMNS": "1000"}).invoke(
        app,
        [
            *("lab", "run", "convergence", "--quick", "--dataset", "mnist"),
            *("--data-dir", str(tmp_path), "--out", str(tmp_path / "runs")),
        ],
    )
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert (
        f"error: mnist: {tmp_path} holds only part of the dataset; missing "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"
    ) in result.output
    assert not list((tmp_path / "runs").rglob("result.json"))
