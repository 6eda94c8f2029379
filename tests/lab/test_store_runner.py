"""Store, runner, report and CLI: atomic writes, resume after SIGKILL, claims, exit codes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

from normlab.cli import app
from normlab.lab.data import load_dataset
from normlab.lab.experiments import REGISTRY, Claim, ClaimResult, Experiment, Results
from normlab.lab.report import write_report
from normlab.lab.runner import copy_results, load_claims, load_results, run_experiment
from normlab.lab.store import (
    LabWarning,
    RunStore,
    StoreError,
    atomic_write_json,
    config_hash,
    provenance,
    read_jsonl,
)


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
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would


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
    assert result.exit_code == 0 and result.output.splitlines()[1].startswith("convergence ")
    result = CliRunner().invoke(app, ["lab", "run", "nope"])
    assert result.exit_code != 0 and "unknown experiment(s) ['nope']" in result.output
    result = CliRunner().invoke(app, ["lab", "run", "convergence", "--dataset", "imagenet"])
    assert result.exit_code == 2 and "'imagenet' is not one of" in result.output


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


# --- damaged results: rerun with a warning; report/check skip and say so ------------------

_CLI = CliRunner(env={"COLUMNS": "1000"})  # one line per message


def _toy_run(out: Path, exp: _Toy | None = None) -> RunStore:
    run_experiment(exp or _Toy(), "synthetic", seeds=[0], quick=True, out=out)
    return RunStore(out, "toy", "synthetic")


def _unit(store: RunStore, value: float) -> Path:
    return store.unit_dir({"value": value, "seeds": [0]})


def _starts(unit: Path) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(unit / "metrics.jsonl") if r["event"] == "start"]


def _damage_from_another_unit(unit: Path) -> bytes:
    return (
        unit.parent / config_hash("toy", "synthetic", {"value": 2.0, "seeds": [0]}) / "result.json"
    ).read_bytes()


_DAMAGES = {
    "not utf-8": (lambda unit: b'{"config": "\xff\xfe', r"not UTF-8 text \(byte"),
    "truncated": (lambda unit: (unit / "result.json").read_bytes()[:40], r"not valid JSON"),
    "no metrics": (
        lambda unit: json.dumps(
            {**json.loads((unit / "result.json").read_text()), "metrics": None}
        ).encode(),
        r"not a result \(no 'metrics' object\)",
    ),
    "a list": (lambda unit: b"[1, 2]", r"not a result \(a JSON list\)"),
    "another unit's": (
        _damage_from_another_unit,
        r"do not hash to [0-9a-f]{16}: it belongs to another unit",
    ),
}


@pytest.mark.parametrize("damage", list(_DAMAGES))
def test_damaged_result_is_rerun_with_a_warning_naming_it(tmp_path: Path, damage: str) -> None:
    store = _toy_run(tmp_path)
    unit = _unit(store, 1.0)
    make, match = _DAMAGES[damage]
    (unit / "result.json").write_bytes(make(unit))
    _Toy.calls.clear()
    with pytest.warns(LabWarning, match=match) as record:
        claims = run_experiment(_Toy(), "synthetic", seeds=[0], quick=True, out=tmp_path)
    assert str(unit / "result.json") in str(record[0].message)
    assert "counts as unfinished and is trained again" in str(record[0].message)
    assert [c["value"] for c in _Toy.calls] == [1.0]  # only the damaged unit
    assert claims[0].passed and store.load({"value": 1.0, "seeds": [0]}) is not None
    assert load_claims(tmp_path)[0]["claims"][0]["verdict"] == "confirmed"


def _truncate_claims(out: Path) -> None:
    path = _toy_run(out).claims_path
    path.write_bytes(path.read_bytes()[:50])


def _claims_not_utf8(out: Path) -> None:
    _toy_run(out).claims_path.write_bytes(b"\xff" * 10)


def _claims_without_units(out: Path) -> None:
    _toy_run(out).claims_path.write_text('{"experiment": "toy", "dataset": "synthetic"}')


def _claim_without_fields(out: Path) -> None:
    path = _toy_run(out).claims_path
    path.write_text(json.dumps({**json.loads(path.read_text()), "claims": [{"passed": True}]}))


def _corrupt_result(out: Path) -> None:
    (_unit(_toy_run(out), 2.0) / "result.json").write_bytes(b"\x00garbage")


def _deleted_result(out: Path) -> None:
    (_unit(_toy_run(out), 2.0) / "result.json").unlink()


def _stray_claims(out: Path) -> None:
    (out / "notes" / "misc").mkdir(parents=True)
    _toy_run(out).claims_path.rename(out / "notes" / "misc" / "claims.json")


_CLAIMS_DAMAGES = {
    "truncated claims": (
        _truncate_claims,
        r"skipped .*toy/synthetic/claims.json: not valid JSON .*"
        r"`normlab lab run toy --dataset synthetic --out .*` redoes it",
    ),
    "non-utf-8 claims": (_claims_not_utf8, r"claims.json: not UTF-8 text"),
    "claims without units": (_claims_without_units, r"not a claims file \(no 'seeds' list\)"),
    "a claim without fields": (_claim_without_fields, r"a claim lacks some of \["),
    "corrupt result": (
        _corrupt_result,
        r"claims.json: its unit [0-9a-f]{16} is damaged: .*result.json: not valid JSON",
    ),
    "deleted result": (_deleted_result, r"its unit [0-9a-f]{16} has no result.json"),
    "stray claims in a foreign folder": (
        _stray_claims,
        r"notes/misc/claims.json: its claims are for toy/synthetic but it lies in notes/misc: "
        r"not a results folder of normlab's$",
    ),
}


@pytest.mark.parametrize("damage", list(_CLAIMS_DAMAGES))
def test_report_and_check_skip_damaged_claims_and_say_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    monkeypatch.setitem(REGISTRY, "toy", _Toy())
    make, match = _CLAIMS_DAMAGES[damage]
    make(tmp_path)
    with pytest.warns(LabWarning, match=match):
        assert load_claims(tmp_path) == []
    check = _CLI.invoke(app, ["lab", "check", "--out", str(tmp_path)])
    assert check.exit_code == 2 and isinstance(check.exception, SystemExit), check.output
    assert "warning: skipped" in check.output
    assert f"no intact experiment results under {tmp_path} (1 skipped)" in check.output
    report = _CLI.invoke(app, ["lab", "report", "--out", str(tmp_path)])
    assert report.exit_code == 2 and isinstance(report.exception, SystemExit), report.output
    assert "warning: skipped" in report.output and "no experiment results" in report.output


def test_check_never_passes_over_a_damaged_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One experiment intact and passing, another's result corrupt: not exit 0, the file named."""
    monkeypatch.setitem(REGISTRY, "toy", _Toy())
    _toy_run(tmp_path)
    other = RunStore(tmp_path, "toy", "digits")
    run_experiment(
        _Toy(), "digits", seeds=[0], quick=True, out=tmp_path, data=load_dataset("synthetic")
    )
    (_unit(other, 1.0) / "result.json").write_bytes(b"\xff\xfe\x00")
    result = _CLI.invoke(app, ["lab", "check", "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "warning: skipped " in result.output and "toy/digits/claims.json" in result.output
    assert "1 damaged or foreign claims file(s) skipped" in result.output
    assert "confirmed" in result.output  # the intact experiment is still shown


def test_check_prints_claim_text_literally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Text read from claims.json is text, not rich markup (``[/x]`` used to crash)."""
    monkeypatch.setitem(REGISTRY, "toy", _Toy())
    path = _toy_run(tmp_path).claims_path
    record = json.loads(path.read_text())
    record["claims"][0]["claim"]["name"] = "big[/x][bold]"
    path.write_text(json.dumps(record))
    result = _CLI.invoke(app, ["lab", "check", "--out", str(tmp_path)])
    assert result.exit_code == 0 and "toy: big[/x][bold]" in result.output, result.output


def test_load_results_raises_when_a_result_changes_after_the_check(tmp_path: Path) -> None:
    store = _toy_run(tmp_path)
    (rec,) = load_claims(tmp_path)
    (_unit(store, 1.0) / "result.json").write_text("{}")
    with pytest.raises(
        StoreError,
        match=r"result.json: not a result.*changed while being read|changed while being read",
    ):
        load_results(tmp_path, rec)


# --- the results folder: a file, read-only, nothing left to do ----------------------------


def test_out_naming_a_file_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(REGISTRY, "toy", _Toy())
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        for args in (["run", "toy", "--dataset", "synthetic"], ["report"], ["check"]):
            result = _CLI.invoke(app, ["lab", *args, "--out", str(out)])
            assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
            assert (
                f"error: the results folder {out} is not a folder: {tmp_path / 'f'} is a file"
                in result.output
            )
    with pytest.raises(StoreError, match=r"is not a folder: .*/f is a file"):
        _toy_run(tmp_path / "f")


def test_run_with_nothing_left_to_do_writes_nothing(tmp_path: Path) -> None:
    _toy_run(tmp_path)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in tmp_path.rglob("*")}
    _Toy.calls.clear()
    _toy_run(tmp_path)
    assert not _Toy.calls
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in tmp_path.rglob("*")} == before


def test_the_claim_is_held_while_a_unit_trains(tmp_path: Path) -> None:
    held: list[bool] = []

    class Probe(_Toy):
        def run(
            self, config: dict[str, Any], data: Any, *, progress: bool = False
        ) -> dict[str, Any]:
            store = RunStore(tmp_path, "toy", "synthetic")
            with store.claim(
                config, wait=False
            ) as got:  # another file descriptor, as another process
                held.append(not got)
            return super().run(config, data)

    _toy_run(tmp_path, Probe())
    assert held == [True, True]


def test_force_leaves_a_unit_another_process_just_trained(tmp_path: Path) -> None:
    _toy_run(tmp_path)

    class Meanwhile(_Toy):
        def run(
            self, config: dict[str, Any], data: Any, *, progress: bool = False
        ) -> dict[str, Any]:
            if config["value"] == 1.0:  # meanwhile another forced process retrains the second unit
                RunStore(tmp_path, "toy", "synthetic").finish(
                    {"value": 2.0, "seeds": [0]}, {"value": 2.0}, provenance("x"), 0.0
                )
            return super().run(config, data)

    _Toy.calls.clear()
    run_experiment(Meanwhile(), "synthetic", seeds=[0], quick=True, out=tmp_path, force=True)
    assert [c["value"] for c in _Toy.calls] == [1.0]


def test_a_filesystem_without_locks_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_flock(*args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("FileSystem does not appear to support flock")

    monkeypatch.setattr("filelock.FileLock.acquire", no_flock)
    with pytest.raises(StoreError, match=r"does not support file locks .*docs/lab-workers.md"):
        _toy_run(tmp_path)


def test_copy_results_then_report_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(REGISTRY, "toy", _Toy())
    _toy_run(tmp_path / "runs")
    (copied,) = copy_results(tmp_path / "runs", tmp_path / "mine")
    assert load_claims(tmp_path / "mine") == [copied]
    result = _CLI.invoke(
        app, ["lab", "report", "--out", str(tmp_path / "runs"), "--to", str(tmp_path / "copy")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "copy" / "report.html").exists() and not (
        tmp_path / "runs" / "report.md"
    ).exists()


# --- several processes: subprocesses running the real command line ------------------------

_TOY_CLI = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    if os.environ.get("TOY_ONLY_CHILD_OF", str(os.getppid())) != str(os.getppid()):
        sys.exit("toy: a worker that fails on start")
    sys.path.insert(0, {here!r})
    from test_store_runner import _Toy
    from normlab.lab.experiments import REGISTRY

    class Sleepy(_Toy):
        def run(self, config, data, *, progress=False):
            if config["value"] == {hang!r}:
                Path({marker!r}).write_text(str(os.getpid()))
                time.sleep(600)  # killed here, holding the unit's claim
            time.sleep({sleep!r})
            return super().run(config, data)

    barrier = Path({barrier!r})
    if {workers!r} > 1:  # start together, so that the workers race for the same units
        barrier.mkdir(exist_ok=True)
        (barrier / str(os.getpid())).touch()
        deadline = time.time() + 120
        while len(list(barrier.iterdir())) < {workers!r} and time.time() < deadline:
            time.sleep(0.05)
    REGISTRY["toy"] = Sleepy(values=tuple(float(v) for v in range(1, {units!r} + 1)))
    from normlab.cli import app, main
    if sys.argv[1] == "--batch":  # several commands in this one process: [exit code, output] lines
        import json
        from typer.testing import CliRunner
        for args in json.loads(sys.argv[2]):
            result = CliRunner(env={{"COLUMNS": "1000"}}).invoke(app, args)
            print(json.dumps([result.exit_code, result.output]))
    else:
        sys.argv = ["normlab", *sys.argv[1:]]
        main()
    """
)


def _toy_cli(
    tmp_path: Path, *, units: int = 2, sleep: float = 0.0, hang: float = -1.0, workers: int = 1
) -> list[str]:
    script = tmp_path / f"toy_cli_{units}_{workers}_{hang}.py"
    script.write_text(
        _TOY_CLI.format(
            here=str(Path(__file__).parent),
            hang=hang,
            marker=str(tmp_path / "hanging"),
            sleep=sleep,
            barrier=str(tmp_path / "barrier"),
            workers=workers,
            units=units,
        )
    )
    return [sys.executable, str(script)]


_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "COLUMNS": "1000"}
_RUN = ["lab", "run", "toy", "--dataset", "synthetic", "--quick", "--seeds", "1"]


def test_three_workers_share_a_suite_and_train_every_unit_once(tmp_path: Path) -> None:
    """The documented recipe: N `normlab lab run` processes on one --out."""
    out = tmp_path / "runs"
    cmd = [*_toy_cli(tmp_path, units=9, sleep=0.3, workers=3), *_RUN, "--out", str(out)]
    procs = [
        subprocess.Popen(cmd, env=_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    units = sorted(p for p in (out / "toy" / "synthetic").iterdir() if p.is_dir())
    assert len(units) == 9
    starts = [_starts(u) for u in units]
    assert [len(s) for s in starts] == [1] * 9, starts  # every unit trained exactly once
    trainers = {s[0]["pid"] for s in starts}
    assert len(trainers) >= 2 and trainers <= {p.pid for p in procs}  # the work was shared
    claims = json.loads((out / "toy" / "synthetic" / "claims.json").read_text())
    assert claims["claims"][0]["n"] == 9 and claims["claims"][0]["verdict"] == "confirmed"
    assert all("confirmed" in o for o in outputs)
    for o in outputs:  # each worker: one line per unit, whoever trained it
        counts = re.findall(r"^toy: .*, (\d)/9 units, ETA ", o, flags=re.M)
        assert counts == [str(k) for k in range(1, 10)], o


def test_a_dead_workers_claim_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    cmd = [*_toy_cli(tmp_path, units=2, hang=2.0), *_RUN, "--out", str(out)]
    first = subprocess.Popen(cmd, env=_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "second.log"
    try:
        deadline = time.time() + 60
        while not (tmp_path / "hanging").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "hanging").exists(), "the first worker never reached the unit"
        with log.open("w") as f:  # the second worker waits for the unit the first one holds
            second = subprocess.Popen(
                [*_toy_cli(tmp_path, units=2), *_RUN, "--out", str(out)],
                env=_ENV,
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        while "waiting for a unit" not in log.read_text() and time.time() < deadline:
            assert second.poll() is None, log.read_text()
            time.sleep(0.05)
        assert f"toy: waiting for a unit claimed by {socket.gethostname()} pid {first.pid}" in (
            log.read_text()
        )
        unit = _unit(RunStore(out, "toy", "synthetic"), 2.0)
        assert len(_starts(unit)) == 1 and second.poll() is None  # it waits, it does not duplicate
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.wait(timeout=120) == 0, log.read_text()
    assert [s["pid"] for s in _starts(unit)] == [first.pid, second.pid]
    assert len(_starts(_unit(RunStore(out, "toy", "synthetic"), 1.0))) == 1
    assert json.loads((unit / "result.json").read_text())["provenance"]["pid"] == second.pid


def _read_only(cmd: list[str]) -> list[str]:
    """``cmd`` as a process that file permissions apply to (root keeps them only without
    CAP_DAC_OVERRIDE)."""
    if os.geteuid() != 0:
        return cmd
    prefix = [
        shutil.which("setpriv") or "setpriv",
        "--bounding-set",
        "-dac_override,-dac_read_search",
        "--",
    ]
    if subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root without setpriv: cannot make a folder read-only")
    return [*prefix, *cmd]


def test_read_only_results_folder(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    _toy_run(out)  # the same two units the subprocess's toy defines
    subprocess.run(["chmod", "-R", "a-w", str(out)], check=True)
    commands = [
        [*_RUN, "--out", str(out)],  # nothing left to do: reads only
        ["lab", "check", "--out", str(out)],
        ["lab", "report", "--out", str(out)],
        ["lab", "report", "--out", str(out), "--to", str(tmp_path / "report")],
        [*_RUN, "--seeds", "2", "--out", str(out)],  # new units: a clear error, before training
    ]
    try:
        batch = subprocess.run(
            _read_only([*_toy_cli(tmp_path, units=2), "--batch", json.dumps(commands)]),
            env=_ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(out)], check=True)
    assert batch.returncode == 0, batch.stderr
    done, check, report, elsewhere, more = [json.loads(line) for line in batch.stdout.splitlines()]
    assert done[0] == 0 and "confirmed" in done[1], done
    assert check[0] == 0, check
    assert report[0] == 2 and "pass --to DIR to write it elsewhere" in report[1], report
    assert elsewhere[0] == 0 and (tmp_path / "report" / "report.html").exists(), elsewhere
    assert more[0] == 2, more
    assert f"error: cannot write to the results folder {out / 'toy' / 'synthetic'}" in more[1]
    assert "Permission denied" in more[1] and "Traceback" not in more[1]
    assert not (out / "report.md").exists()


def test_workers_option_shares_the_suite_among_processes(tmp_path: Path) -> None:
    """--workers 3: this process and two more train the units between them, each once."""
    out = tmp_path / "runs"
    # no start barrier (the extra workers start from this process's command); units long
    # enough for them to arrive while units are left
    cmd = [*_toy_cli(tmp_path, units=9, sleep=1.5), *_RUN, "--out", str(out)]
    proc = subprocess.run(
        [*cmd, "--workers", "3"], env=_ENV, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    units = sorted(p for p in (out / "toy" / "synthetic").iterdir() if p.is_dir())
    starts = [_starts(u) for u in units]
    assert [len(s) for s in starts] == [1] * 9, starts  # every unit trained exactly once
    assert len({s[0]["pid"] for s in starts}) >= 2  # by more than one process
    assert "confirmed" in proc.stdout


def test_a_failing_worker_is_named(tmp_path: Path) -> None:
    """The extra worker dies on start: this process trains every unit, then fails naming it."""
    out = tmp_path / "runs"
    cmd = [*_toy_cli(tmp_path, units=2), *_RUN, "--out", str(out), "--workers", "2"]
    env = {**_ENV, "TOY_ONLY_CHILD_OF": str(os.getpid())}  # processes this one did not start fail
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "worker 2 exited with status 1: toy: a worker that fails on start" in proc.stderr
    assert len([p for p in (out / "toy" / "synthetic").iterdir() if p.is_dir()]) == 2
