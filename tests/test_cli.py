"""The command line's own surface (each subcommand is tested where it is built)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import normlab
from normlab.bench import RESULT_SUITES, SUITES, Result
from normlab.cli import BackendName, Suite, app, bench_summary, bench_tables
from normlab.functional import BACKENDS
from normlab.kernels import kernel_status
from normlab.lab._cli import DatasetName
from normlab.lab.data import DATASETS


def test_version_names_torch_and_whether_the_kernels_are_built(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--version"], env={"NORMLAB_KERNEL_CACHE": str(tmp_path)})
    assert result.exit_code == 0
    assert result.output.splitlines() == [
        f"normlab {normlab.__version__}",
        f"torch {torch.__version__}",
        f"fused kernels: not built: `normlab kernels build` compiles them (cache {tmp_path})",
    ]
    result = CliRunner().invoke(app, ["--version"])
    status = kernel_status()
    if status.usable:
        assert result.output.splitlines()[2] == f"fused kernels: built (cache {status.cache})"


def test_choices_are_the_sources_of_truth() -> None:
    assert [s.value for s in Suite] == [*SUITES, *RESULT_SUITES]
    assert tuple(b.value for b in BackendName) == BACKENDS
    assert tuple(d.value for d in DatasetName) == DATASETS


@pytest.mark.parametrize(
    ("args", "option", "value"),
    [
        (["bench", "--suite", "nope"], "--suite", "nope"),
        (["bench", "--backend", "fast"], "--backend", "fast"),
        (["lab", "run", "convergence", "--dataset", "imagenet"], "--dataset", "imagenet"),
    ],
)
def test_an_invalid_choice_is_a_usage_error(args: list[str], option: str, value: str) -> None:
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, args)
    assert result.exit_code == 2
    assert f"Invalid value for '{option}'" in result.output
    assert f"'{value}' is not one of" in result.output


def test_an_unknown_experiment_is_a_usage_error() -> None:
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["lab", "run", "nope", "--quick"])
    assert result.exit_code == 2
    assert "Invalid value for 'EXPERIMENT...': unknown experiment(s) ['nope']" in result.output


_COMMANDS = [
    [],
    ["bench"],
    ["kernels"],
    ["kernels", "build"],
    ["kernels", "status"],
    ["lab"],
    ["lab", "list"],
    ["lab", "run"],
    ["lab", "report"],
    ["lab", "check"],
]


@pytest.mark.parametrize("command", _COMMANDS, ids=" ".join)
def test_help_has_no_type_placeholders_and_fits_80_columns(command: list[str]) -> None:
    result = CliRunner(env={"COLUMNS": "80"}).invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "<bool>" not in text and "<list" not in text and "<str>" not in text
    assert not re.search(r"\{\w+\}", text), text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_usage_names_experiments_plainly() -> None:
    result = CliRunner(env={"COLUMNS": "80"}).invoke(
        app, ["lab", "run", "--help"], prog_name="normlab"
    )
    assert "Usage: normlab lab run [OPTIONS] EXPERIMENT..." in result.output


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("normlab bench --suite f", ["fold"]),
        ("normlab bench --backend f", ["fused"]),
        ("normlab lab run --dataset fa", ["fashion-mnist"]),
        ("normlab lab run con", ["convergence"]),
        ("normlab lab run al", ["all"]),
        ("normlab lab run a", ["activations", "all"]),
    ],
)
def test_shell_completion(words: str, expected: list[str]) -> None:
    env = {
        "_NORMLAB_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - 1),
    }
    result = CliRunner().invoke(app, [], env=env, prog_name="normlab")
    assert result.output.split() == expected


def _results() -> list[Result]:
    shapes = ["(32, 256, 56, 56) channels_last bf16", "(8, 64, 112, 112) NCHW fp32"]
    rows = [
        Result("batchnorm", shape, mode, 12.345, 7.891, 0.639, 3, "torch", 5.0, 0.41, 0.63)
        for shape in shapes
        for mode in ("train fwd", "train fwd+bwd", "eval fwd")
    ]
    rows.append(Result("fold", "small_resnet (16, 3, 32, 32)", "eval fwd", 880, 716, 0.81, 3))
    return rows


@pytest.mark.parametrize("width", [80, 100, 200])
def test_bench_tables_fit_the_terminal(width: int) -> None:
    out = io.StringIO()
    console = Console(file=out, width=width)
    for table in bench_tables(_results()):
        console.print(table)
    lines = out.getvalue().splitlines()
    assert max(map(len, lines)) <= width
    assert sum("0.64" in line for line in lines) == 6  # every ratio whole, on its row


def test_bench_summary_never_prints_nan() -> None:
    lines = bench_summary(_results(), ["batchnorm", "fold"])
    assert lines[0] == (
        "batchnorm train fwd: geometric-mean ratio 0.639, fp32 only 0.639, max 0.639"
    )
    assert lines[-1] == "fold eval fwd: geometric-mean ratio 0.810, max 0.810"
    assert not any("nan" in line for line in lines)


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
