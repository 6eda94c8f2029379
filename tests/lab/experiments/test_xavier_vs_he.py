"""xavier_vs_he: the 22-layer case (full runs) beside the 30-layer one, and their claims."""

from __future__ import annotations

from typing import Any

import pytest

from normlab.lab.experiments import REGISTRY, Results
from normlab.lab.experiments.xavier_vs_he import BUDGET, DEPTH, SHALLOW

EXP = REGISTRY["xavier_vs_he"]


def test_full_runs_add_the_22_layer_unit() -> None:
    quick = EXP.configs(quick=True, seeds=[0], dataset="digits")
    full = EXP.configs(quick=False, seeds=[0], dataset="digits")
    assert [c.get("depth", DEPTH) for c in quick] == [DEPTH]
    assert [(c.get("depth", DEPTH), c["optimizer"]) for c in full] == [
        (DEPTH, "sgd"),
        (SHALLOW, "sgd"),
        (DEPTH, "adam"),
    ]


def _unit(depth: int | None, escapes: dict[str, list[int | None]]) -> tuple[dict[str, Any], Any]:
    cfg: dict[str, Any] = {"optimizer": "sgd", "inits": list(escapes), "seeds": list(range(5))}
    cfg["steps"] = BUDGET
    if depth is not None:
        cfg["depth"] = depth
    members = [
        {"init": init, "seed": s, "escape": e, "final_test_acc": 0.95, "init_activation_std": [1.0]}
        for init, values in escapes.items()
        for s, e in enumerate(values)
    ]
    return cfg, {"members": members}


def test_claims_for_both_depths() -> None:
    deep = _unit(None, {"he": [100] * 5, "xavier": [None] * 5})
    results: Results = [deep]
    claims = {c.claim.name: c for c in EXP.evaluate(results, dataset="digits")}
    assert claims["glorot_stalls"].verdict == "confirmed"
    assert claims["glorot_converges_22"].verdict == "inconclusive"  # quick: not run
    assert claims["he_earlier_22"].verdict == "inconclusive" and claims["he_earlier_22"].n == 0
    shallow = _unit(SHALLOW, {"he": [100, 120, 100, 80, 100], "xavier": [300, 400, 200, 500, 300]})
    claims = {c.claim.name: c for c in EXP.evaluate([deep, shallow], dataset="digits")}
    assert claims["glorot_converges_22"].estimate == 1.0
    assert claims["glorot_converges_22"].verdict == "confirmed"
    assert claims["he_earlier_22"].verdict == "confirmed"
    assert claims["he_earlier_22"].values == pytest.approx([3.0, 400 / 120, 2.0, 6.25, 3.0])
    assert claims["escape_ratio"].n == 5  # the 30-layer claims still read the 30-layer unit only
    slow = _unit(SHALLOW, {"he": [300] * 5, "xavier": [None] * 5})
    claims = {c.claim.name: c for c in EXP.evaluate([deep, slow], dataset="digits")}
    assert claims["glorot_converges_22"].verdict == "refuted"
    assert "22" in EXP.table([deep, slow])
