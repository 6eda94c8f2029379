"""precise_bn: the claims on hand-made accuracies, and a smoke run that leaves the training alone."""

from __future__ import annotations

from typing import Any

import pytest

from normlab.lab.data import Dataset
from normlab.lab.experiments import REGISTRY, Results

EXP = REGISTRY["precise_bn"]


def _results(triples: list[tuple[float, float, float]]) -> Results:
    members: list[dict[str, Any]] = [
        {
            "seed": i,
            "diverged": False,
            "steps": [0, 50],
            "ema": [0.1, e],
            "precise": [0.1, p],
            "population": [0.1, q],
        }
        for i, (e, p, q) in enumerate(triples)
    ]
    return [({"seeds": list(range(len(triples))), "steps": 50}, {"members": members})]


def test_the_gap_and_the_fraction_precise_bn_closes() -> None:
    triples = [
        (0.80, 0.90, 0.91),
        (0.82, 0.90, 0.92),
        (0.78, 0.88, 0.90),
        (0.81, 0.91, 0.91),
        (0.79, 0.89, 0.90),
    ]
    cost, closes = EXP.evaluate(_results(triples), dataset="digits")
    assert cost.values == pytest.approx([0.11, 0.10, 0.12, 0.10, 0.11])
    assert cost.verdict == "confirmed"
    assert closes.estimate == pytest.approx(0.48 / 0.54)
    assert closes.verdict == "confirmed"
    none = [(0.9, 0.9, 0.9)] * 5  # the EMA costs nothing: refuted, and no fraction to speak of
    cost, closes = EXP.evaluate(_results(none), dataset="digits")
    assert cost.verdict == "refuted" and closes.verdict == "inconclusive"


def test_quick_run_end_to_end_on_synthetic(synthetic: Dataset) -> None:
    configs = EXP.configs(quick=True, seeds=[0, 1], dataset="synthetic")
    configs[0]["steps"] = 60
    results = [(cfg, EXP.run(cfg, synthetic)) for cfg in configs]
    recs = results[0][1]["members"]
    assert [r["seed"] for r in recs] == [0, 1]
    for r in recs:
        assert r["steps"] == [0, 50, 60]
        for kind in ("ema", "precise", "population"):
            assert len(r[kind]) == 3 and all(0.0 <= a <= 1.0 for a in r[kind])
    assert "population statistics" in EXP.table(results)
