"""Progress of a lab run: the optional in-unit hook, the ETA, and what ``lab run`` prints."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

from normlab.cli import app
from normlab.lab.experiments import REGISTRY, ClaimResult, Experiment, Results
from normlab.lab.progress import SuiteClock, format_duration, report_progress, reporting_to
from normlab.lab.runner import run_experiment


class _Steps(Experiment):
    """Each unit "trains" ``steps`` epochs, reporting each one when ``reports`` is set."""

    name = "steps"
    paper = "nobody 2026"
    minutes_quick = 0.1
    minutes_full = 0.2
    reports: ClassVar[bool] = True

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        return [{"unit": u, "steps": 4, "seeds": seeds} for u in range(3)]

    def run(self, config: dict[str, Any], data: Any, *, progress: bool = False) -> dict[str, Any]:
        for epoch in range(config["steps"]):
            if self.reports:
                report_progress(epoch + 1, config["steps"])
        return {"unit": config["unit"]}

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        return []


class _Silent(_Steps):
    name = "silent"
    reports = False


# --- the hook ------------------------------------------------------------------------------


def test_report_progress_goes_to_the_callback_clipped_and_is_a_no_op_outside() -> None:
    seen: list[float] = []
    report_progress(1, 2)  # no run: nothing to report to, no error
    with reporting_to(seen.append):
        report_progress(0, 4)
        report_progress(3, 4)
        report_progress(7, 4)  # past the end: clipped
        with reporting_to(None):
            report_progress(1, 4)  # ignored
        report_progress(-1, 4)
    report_progress(1, 2)
    assert seen == [0.0, 0.75, 1.0, 0.0]


@pytest.mark.parametrize("total", [0, -1, float("inf"), float("nan")])
def test_report_progress_rejects_a_total_that_is_not_positive(total: float) -> None:
    with pytest.raises(ValueError, match=r"report_progress: total must be positive and finite"):
        report_progress(1, total)
    with pytest.raises(ValueError, match=r"report_progress: done is NaN"):
        report_progress(float("nan"), 3)


def test_runner_reports_start_progress_and_end_of_each_unit(tmp_path: Path) -> None:
    events: list[tuple[Any, ...]] = []
    kwargs: dict[str, Any] = {
        "seeds": [0],
        "quick": True,
        "out": tmp_path,
        "on_start": lambda name, cfg: events.append(("start", name, cfg["unit"])),
        "on_progress": lambda name, cfg, f: events.append(("progress", name, cfg["unit"], f)),
        "on_unit": lambda name, cfg: events.append(("unit", name, cfg["unit"])),
    }
    run_experiment(_Steps(), "synthetic", **kwargs)
    first = [("start", "steps", 0)]
    first += [("progress", "steps", 0, f) for f in (0.25, 0.5, 0.75, 1.0)]
    first += [("unit", "steps", 0)]
    assert events[:6] == first and len(events) == 18
    events.clear()  # a unit that never reports still starts and ends
    run_experiment(_Silent(), "synthetic", **kwargs)
    assert events == [e for u in range(3) for e in (("start", "silent", u), ("unit", "silent", u))]
    events.clear()  # finished units: found, not started
    run_experiment(_Steps(), "synthetic", **kwargs)
    assert events == [("unit", "steps", u) for u in range(3)]


# --- the ETA --------------------------------------------------------------------------------


class _FakeTime:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_eta_starts_from_the_estimates_and_follows_the_measured_pace() -> None:
    now = _FakeTime()
    clock = SuiteClock({"a": (2, 20.0), "b": (2, 80.0)}, now=now)
    assert clock.eta() == pytest.approx(100.0) and (clock.done, clock.total) == (0, 4)
    clock.start("a")
    now.t = 5.0
    assert clock.eta() == pytest.approx(95.0)  # counts down within the unit
    clock.advance("a", 0.5)  # half a unit (5 estimated s) in 5 s: on pace
    now.t = 8.0
    assert clock.eta() == pytest.approx(92.0)
    now.t = 30.0  # the unit overran its estimate: the rest never goes below what is left
    assert clock.eta() == pytest.approx(90.0)
    assert clock.finish("a") == pytest.approx(30.0)  # 10 estimated s took 30 s
    assert clock.eta() == pytest.approx(3 * 90.0)  # the rest, three times as slow


def test_eta_ignores_units_found_finished_and_ends_at_zero() -> None:
    now = _FakeTime()
    clock = SuiteClock({"a": (3, 30.0)}, now=now)
    assert clock.finish("a") is None  # finished by an earlier run: no speed from it
    assert clock.eta() == pytest.approx(20.0)
    clock.start("a")
    now.t = 20.0
    assert clock.finish("a") == pytest.approx(20.0)
    assert clock.eta() == pytest.approx(20.0)  # 2x the estimate for the last 10 s
    clock.finish("a")  # another worker finished the last one
    assert clock.eta() == 0.0 and clock.done == clock.total == 3


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 0.4, 59.4, 60, 61, 3599, 3600, 7322)] == [
        "0 s",
        "0 s",
        "59 s",
        "1 min 00 s",
        "1 min 01 s",
        "59 min 59 s",
        "1 h 00 min",
        "2 h 02 min",
    ]


# --- what `lab run` prints when its output is not a terminal ---------------------------------

_LINE = re.compile(
    r"^(steps|silent): (\d+\.\d s|already done), (\d+)/6 units, ETA (\d+ s|\d+ min \d\d s)$"
)


def test_lab_run_prints_one_plain_line_per_unit_when_not_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(REGISTRY, "steps", _Steps())
    monkeypatch.setitem(REGISTRY, "silent", _Silent())
    args = ["lab", "run", "steps", "silent", "--dataset", "synthetic", "--out", str(tmp_path)]
    runner = CliRunner(env={"COLUMNS": "80"})
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    progress = [m for m in map(_LINE.match, lines[:6]) if m]
    assert len(progress) == 6, result.stdout
    assert [int(m.group(3)) for m in progress] == list(range(1, 7))
    assert [m.group(1) for m in progress] == ["steps"] * 3 + ["silent"] * 3
    assert all(m.group(2).endswith(" s") for m in progress)
    assert progress[-1].group(4) == "0 s"
    assert not any(_LINE.match(line) for line in lines[6:])  # then only the results
    assert "\r" not in result.stdout and "\x1b" not in result.stdout
    again = runner.invoke(app, args)  # nothing left to train: found, not timed
    assert [m.group(2) for m in map(_LINE.match, again.stdout.splitlines()[:6]) if m] == [
        "already done"
    ] * 6


def test_lab_run_rejects_an_unknown_dataset_with_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        app, ["lab", "run", "convergence", "--dataset", "imagenet", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "Invalid value for '--dataset'" in result.output
    assert "'imagenet' is not one of 'digits', 'fashion-mnist', 'mnist', 'cifar10'" in (
        result.output
    )


# --- `lab list` --------------------------------------------------------------------------


def test_lab_list_is_aligned_and_fits_80_columns() -> None:
    result = CliRunner(env={"COLUMNS": "80"}).invoke(app, ["lab", "list"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split() == ["experiment", "paper", "quick", "full"]
    assert max(map(len, lines)) <= 80
    paper_at = lines[0].index("paper")
    rows = [line for line in lines[1:] if line[:paper_at].strip()]
    assert [r.split()[0] for r in rows] == list(REGISTRY)
    for row in lines[1:]:  # every paper (and every wrapped continuation) starts in its column
        assert row[paper_at - 1] == " " and row[paper_at] != " ", row
    ends = {line.rstrip().rfind("min") for line in rows}
    assert len(ends) == 1  # the full-run minutes are right-aligned


def test_lab_list_in_a_pipe_keeps_one_line_per_experiment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    result = CliRunner().invoke(app, ["lab", "list"])
    assert len(result.output.splitlines()) == 1 + len(REGISTRY)


def test_the_ensemble_loop_reports_its_progress(synthetic: Any) -> None:
    """train_ensemble reports how far it is (about 50 times), ending at 1: `lab run` moves within a unit."""
    from normlab.lab.ensemble import TrainConfig, train_ensemble
    from normlab.lab.models import mlp

    seen: list[float] = []
    models = [mlp(synthetic.in_features, 1, 8, synthetic.num_classes, seed=s) for s in (0, 1)]
    with reporting_to(seen.append):
        train_ensemble(models, synthetic, TrainConfig(steps=100, eval_every=None), seeds=[0, 1])
    assert len(seen) == 50 and seen == sorted(seen) and seen[0] == 0.02 and seen[-1] == 1.0


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_run_on_cuda_without_cuda_exits_2_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    out.mkdir()
    result = CliRunner().invoke(
        app, ["lab", "run", "small_batch", "--quick", "--device", "cuda", "--out", str(out)]
    )
    assert result.exit_code == 2
    assert "--device cuda: no CUDA device is available to torch here" in result.output
    assert not any(out.iterdir())  # nothing trained, nothing claimed


@pytest.mark.parametrize("flag", [[], ["--no-tune-allocator"]], ids=["default", "off"])
def test_lab_run_tunes_the_allocator_unless_told_not_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: list[str]
) -> None:
    import normlab.perf

    calls: list[int] = []
    monkeypatch.setattr(normlab.perf, "tune_cpu_allocator", lambda: calls.append(1))
    monkeypatch.setitem(REGISTRY, "silent", _Silent())
    args = ["lab", "run", "silent", "--dataset", "synthetic", "--out", str(tmp_path), *flag]
    result = CliRunner(env={"COLUMNS": "80"}).invoke(app, args)
    assert result.exit_code == 0, result.output
    assert calls == ([] if flag else [1])
