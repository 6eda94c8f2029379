"""report and check: provenance header, claims and sanity checks apart, intervals, JSON rows and exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

from normlab.cli import app
from normlab.lab.experiments import REGISTRY, Claim, ClaimResult, Experiment, Results
from normlab.lab.report import CHECK_FIELDS, check_rows, claims_rows, write_report
from normlab.lab.runner import run_experiment
from normlab.lab.store import LabWarning


class _Lab(Experiment):
    """Two claims and a sanity check on hand-set per-seed values (no training)."""

    name = "lab_toy"
    paper = "nobody 2026"
    summary = "toy"
    setup = "Taken from nowhere."
    paper_numbers = "none"
    claims: ClassVar[tuple[Claim, ...]] = (
        Claim(
            "up",
            "values are positive",
            "nobody",
            "value",
            ">",
            0.0,
            "Fig. 1: 3.0",
            threshold_origin="paper",
        ),
        Claim("ratio", "ratios are ≥ 2", "nobody", "ratio", ">=", 2.0, "Table 2: 4×", scale="log"),
        Claim(
            "same",
            "sanity: equal",
            "nobody",
            "|diff|",
            "<=",
            0.01,
            "by construction",
            kind="sanity",
        ),
    )

    def __init__(self, up: list[float | None], ratio: list[float]) -> None:
        self.up, self.ratio = up, ratio

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        return [{"seeds": seeds, "up": self.up, "ratio": self.ratio}]

    def run(self, config: dict[str, Any], data: Any, *, progress: bool = False) -> dict[str, Any]:
        return {"up": config["up"], "ratio": config["ratio"]}

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        m = results[0][1]
        return [
            self.claim("up").check(m["up"]),
            self.claim("ratio").check(m["ratio"]),
            self.claim("same").check([0.0] * len(m["ratio"])),
        ]

    def table(self, results: Results) -> str:
        return "| a | b |\n|---|---|\n| 1 | 2 |\n\nA sentence after the table."


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **values: Any) -> Path:
    exp = _Lab(**values)
    monkeypatch.setitem(REGISTRY, exp.name, exp)
    run_experiment(exp, "synthetic", seeds=[0, 1, 2, 3, 4], quick=True, out=tmp_path)
    return tmp_path


def test_check_json_has_the_fields_and_exit_0_when_every_claim_is_confirmed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _run(
        tmp_path, monkeypatch, up=[0.1, 0.12, 0.11, 0.09, 0.1], ratio=[4.0, 5.0, 4.5, 4.2, 3.9]
    )
    result = CliRunner().invoke(app, ["lab", "check", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [tuple(r) for r in rows] == [CHECK_FIELDS] * 3
    up, ratio, same = rows
    assert up["experiment"] == "lab_toy" and up["claim"] == "up" and up["kind"] == "claim"
    assert up["dataset"] == "synthetic" and up["n"] == 5 and up["op"] == ">"
    assert up["model"] == "mlp"
    assert (
        up["estimate"] == pytest.approx(0.104) and up["ci_low"] > 0 and up["verdict"] == "confirmed"
    )
    assert up["paper_value"] == "Fig. 1: 3.0" and up["threshold"] == 0.0
    assert ratio["estimate"] < 4.32  # geometric mean, below the arithmetic 4.32
    assert same["kind"] == "sanity"


def test_check_exits_1_when_a_claim_is_inconclusive_but_not_for_sanity_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _run(
        tmp_path, monkeypatch, up=[0.3, -0.2, 0.1, -0.1, 0.05], ratio=[4.0, 5.0, 4.5, 4.2, 3.9]
    )
    result = CliRunner().invoke(app, ["lab", "check", "--out", str(out), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.output)[0]["verdict"] == "inconclusive"
    table = CliRunner().invoke(app, ["lab", "check", "--out", str(out)])
    assert (
        table.exit_code == 1 and "inconclusive" in table.output and "sanity checks" in table.output
    )


def test_missing_values_are_null_in_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _run(tmp_path, monkeypatch, up=[0.1, None, None, None, None], ratio=[4.0] * 5)
    rows = json.loads(CliRunner().invoke(app, ["lab", "check", "--out", str(out), "--json"]).output)
    assert rows[0]["n"] == 1 and rows[0]["ci_low"] is None and rows[0]["ci_high"] is None
    assert rows[0]["verdict"] == "inconclusive"


def test_check_without_results_exits_2_and_skips_old_claims_files(tmp_path: Path) -> None:
    assert (
        CliRunner().invoke(app, ["lab", "check", "--out", str(tmp_path), "--json"]).exit_code == 2
    )
    old = tmp_path / "noisy_bn" / "digits"
    old.mkdir(parents=True)
    (old / "claims.json").write_text(
        json.dumps({"experiment": "noisy_bn", "dataset": "digits", "claims": [{"passed": True}]})
    )
    result = CliRunner(env={"COLUMNS": "1000"}).invoke(
        app, ["lab", "check", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2, result.output
    assert "not a claims file" in result.output and "redoes it" in result.output
    with (
        pytest.raises(FileNotFoundError, match="no experiment results"),
        pytest.warns(LabWarning, match="not a claims file"),
    ):
        write_report(tmp_path)


def test_report_has_provenance_claims_apart_from_sanity_checks_and_intervals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _run(
        tmp_path, monkeypatch, up=[0.1, 0.12, 0.11, 0.09, 0.1], ratio=[4.0, 5.0, 4.5, 4.2, 3.9]
    )
    md_path, html_path = write_report(out)
    md = md_path.read_text()
    head = md.split("## Claims")[0]
    for word in (
        "normlab",
        "git",
        "torch",
        "thread",
        "synthetic (quick)",
        "seeds per experiment: 5",
        "training time",
    ):
        assert word in head, word
    claims, sanity = md.split("## Claims")[1].split("## Sanity checks")
    assert "values are positive" in claims and "sanity: equal" not in claims.split("## lab_toy")[0]
    assert "sanity: equal" in sanity
    assert "(paper)" in claims and "(ours)" in claims and "Fig. 1: 3.0" in claims
    assert "95 % interval" in claims and "t interval" in md and "log scale" in md
    assert "± 0.000" not in md
    page = html_path.read_text()
    assert "class=confirmed" in page and "A sentence after the table." in page


def test_claims_rows_show_interval_threshold_origin_and_note() -> None:
    record = {
        "experiment": "e",
        "dataset": "digits",
        "quick": True,
        "claims": [
            {
                "claim": {
                    "name": "c",
                    "statement": "s",
                    "op": "within",
                    "threshold_origin": "ours",
                    "paper_value": "pv",
                    "kind": "claim",
                },
                "n": 3,
                "estimate": 0.01,
                "ci_low": None,  # −∞, stored as null
                "ci_high": 0.03,
                "threshold": 0.02,
                "verdict": "inconclusive",
                "note": "1 of 4 seeds have no value",
            }
        ],
    }
    (row,) = claims_rows([record])
    assert row[2] == "MLP"  # a claim written without a model is an MLP's
    assert row[3:] == [
        "s",
        "3",
        "0.0100",
        "[−∞, 0.0300]",
        "|x| < 0.0200 (ours)",
        "pv",
        "inconclusive (1 of 4 seeds have no value)",
    ]
    assert check_rows([record])[0]["ci_low"] is None
    assert check_rows([record])[0]["model"] == "mlp"
