"""Store, runner, report and CLI: atomic writes, resume after SIGKILL, claims, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

from normlab.cli import app
from normlab.lab.experiments import REGISTRY, Claim, ClaimResult, Experiment, Results
from normlab.lab.report import write_report
from normlab.lab.runner import load_claims, run_experiment
from normlab.lab.store import RunStore, atomic_write_json, config_hash, read_jsonl


class _Toy(Experiment):
    """A unit's metric is its ``value``; the claim is confirmed when every value is >= 1."""

    name = "toy"
    paper = "nobody 2026"
    claims: ClassVar[tuple[Claim, ...]] = (
        Claim("big", "values are big", "nobody", "value >= 1", ">", 0.3, "none"),
    )
    calls: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, values: tuple[float, ...] = (1.0, 2.0)) -> None:
        self.values = values

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        return [{"value": v, "seeds": seeds} for v in self.values]

    def run(self, config: dict[str, Any], data: Any, *, progress: bool = False) -> dict[str, Any]:
        _Toy.calls.append(config)
        return {"value": config["value"], "curve": [float("nan"), 1.0]}

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        return [self.claim("big").check_rate([m["value"] >= 1 for _, m in results])]


def test_atomic_write_and_nan_as_null(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "a.json", {"x": float("nan"), "y": (1, 2)})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": None, "y": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left


def test_torn_last_jsonl_line_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(json.JSONDecodeError):
        read_jsonl(path)


def test_config_hash_covers_version(monkeypatch: pytest.MonkeyPatch) -> None:
    h = config_hash("e", "digits", {"a": 1})
    assert h == config_hash("e", "digits", {"a": 1}) != config_hash("e", "digits", {"a": 2})
    monkeypatch.setattr("normlab.lab.store.__version__", "999")
    assert config_hash("e", "digits", {"a": 1}) != h


def test_run_resumes_skips_and_forces(tmp_path: Path) -> None:
    exp = _Toy()
    _Toy.calls.clear()
    claims = run_experiment(exp, "synthetic", seeds=[0], quick=True, out=tmp_path)
    assert claims[0].passed and claims[0].estimate == 1.0 and len(_Toy.calls) == 2
    run_experiment(exp, "synthetic", seeds=[0], quick=True, out=tmp_path)
    assert len(_Toy.calls) == 2  # both units reused
    run_experiment(exp, "synthetic", seeds=[0], quick=True, out=tmp_path, force=True)
    assert len(_Toy.calls) == 4
    record = json.loads(
        (
            RunStore(tmp_path, "toy", "synthetic").unit_dir(
                exp.configs(quick=True, seeds=[0], dataset="x")[0]
            )
            / "result.json"
        ).read_text()
    )
    assert set(record["provenance"]) >= {
        "normlab",
        "torch",
        "git_commit",
        "threads",
        "dataset_checksum",
    }
    assert load_claims(tmp_path)[0]["claims"][0]["verdict"] == "confirmed"


def test_failing_claim_is_reported_and_check_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = _Toy(values=(0.1, 0.2))
    run_experiment(exp, "synthetic", seeds=[0], quick=True, out=tmp_path)
    monkeypatch.setitem(REGISTRY, "toy", exp)
    result = CliRunner().invoke(app, ["lab", "check", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "inconclusive" in result.output
    md, page = write_report(tmp_path)
    assert "inconclusive" in md.read_text() and "<table>" in page.read_text()


def test_check_without_results_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["lab", "check", "--out", str(tmp_path)])
    assert result.exit_code == 2
    result = CliRunner().invoke(app, ["lab", "report", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no experiment results" in result.output


def test_cli_list_and_unknown_names() -> None:
    result = CliRunner().invoke(app, ["lab", "list"])
    assert result.exit_code == 0 and result.output.splitlines()[0].startswith("convergence ")
    result = CliRunner().invoke(app, ["lab", "run", "nope"])
    assert result.exit_code != 0 and "unknown experiment(s) ['nope']" in result.output
    result = CliRunner().invoke(app, ["lab", "run", "convergence", "--dataset", "imagenet"])
    assert result.exit_code != 0 and "unknown dataset 'imagenet'" in result.output


_SLOW_RUNNER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from normlab.lab.runner import run_experiment
    sys.path.insert(0, {here!r})
    from test_store_runner import _Toy

    class Slow(_Toy):
        def run(self, config, data, *, progress=False):
            if config["value"] == 2.0 and not Path({marker!r}).exists():
                Path({marker!r}).write_text("started")
                time.sleep(60)  # killed here, mid-unit
            return super().run(config, data)

    run_experiment(Slow(), "synthetic", seeds=[0], quick=True, out=Path({out!r}))
    print("done")
    """
)


def test_sigkill_mid_run_leaves_no_corrupt_file_and_rerun_completes(tmp_path: Path) -> None:
    out, marker = tmp_path / "runs", tmp_path / "marker"
    script = tmp_path / "run.py"
    script.write_text(
        _SLOW_RUNNER.format(here=str(Path(__file__).parent), marker=str(marker), out=str(out))
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the runner never reached the slow unit"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = RunStore(out, "toy", "synthetic")
    finished = [json.loads(p.read_text()) for p in store.dir.glob("*/result.json")]
    assert [r["metrics"]["value"] for r in finished] == [1.0]  # the first unit, whole
    assert not store.claims_path.exists()
    assert not list(out.rglob("*.tmp"))
    rerun = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(store.claims_path.read_text())["claims"][0]["verdict"] == "confirmed"


class _Broken(_Toy):
    name = "toy"

    def table(self, results: Results) -> str:
        raise KeyError("dataset")

    def plot(self, results: Results, out_dir: Path) -> list[Path]:
        raise ValueError("no figure")


def test_report_survives_a_broken_table_and_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = _Broken()
    run_experiment(exp, "synthetic", seeds=[0], quick=True, out=tmp_path)
    monkeypatch.setitem(REGISTRY, "toy", exp)
    md, _ = write_report(tmp_path)
    text = md.read_text()
    assert "table failed: KeyError" in text and "plot failed: ValueError: no figure" in text
    assert "confirmed" in text  # the claims are still reported
