"""precise_bn: the claim is the worst seed's change, the gap table, a smoke run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from normlab.lab.data import Dataset
from normlab.lab.experiments import REGISTRY, Results

EXP = REGISTRY["precise_bn"]


def _results(pairs: list[tuple[float, float]]) -> Results:
    members: list[dict[str, Any]] = [
        {"seed": i, "ema": {"test": e, "train": e + 0.02}, "recalibrated": {"test": r, "train": r}}
        for i, (e, r) in enumerate(pairs)
    ]
    return [({"seeds": list(range(len(pairs))), "epochs": 2}, {"members": members})]


@pytest.mark.parametrize(
    ("pairs", "worst", "passed"),
    [
        ([(0.90, 0.95), (0.90, 0.895)], -0.005, True),  # one seed a little worse: allowed
        ([(0.90, 0.99), (0.90, 0.88)], -0.02, False),  # a gain elsewhere does not hide a loss
        ([(0.80, 0.90), (0.85, 0.86)], 0.01, True),
    ],
)
def test_claim_is_the_worst_seed(
    pairs: list[tuple[float, float]], worst: float, passed: bool
) -> None:
    (claim,) = EXP.evaluate(_results(pairs), dataset="digits")
    assert claim.mean == pytest.approx(worst) and claim.passed is passed


def test_table_reports_the_gap_both_ways() -> None:
    table = EXP.table(_results([(0.90, 0.95), (0.92, 0.93)]))
    assert "EMA running statistics" in table and "recalibrated (precise BN)" in table
    assert "0.020 ± 0.000" in table  # EMA: train − test = 0.02 on both seeds


def test_quick_run_end_to_end_on_synthetic(
    synthetic: Dataset, capped_training: None, tmp_path: Path
) -> None:
    configs = EXP.configs(quick=True, seeds=[0, 1, 2], dataset="synthetic")
    results = [(cfg, EXP.run(cfg, synthetic)) for cfg in configs]
    recs = results[0][1]["members"]
    assert [r["seed"] for r in recs] == [0, 1, 2]
    for r in recs:
        for key in ("ema", "recalibrated"):
            assert 0.0 <= r[key]["test"] <= 1.0 and 0.0 <= r[key]["train"] <= 1.0
    (claim,) = EXP.evaluate(results, dataset="synthetic")
    assert claim.claim.name == "recalibration_never_hurts" and len(claim.values) == 1
    pngs = EXP.plot(results, tmp_path)
    assert len(pngs) == 1 and pngs[0].stat().st_size > 5000
