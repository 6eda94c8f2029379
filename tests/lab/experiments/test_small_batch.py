"""small_batch: the claims' arithmetic on hand-made accuracies, Renorm's schedule in steps, micro-batches."""

from __future__ import annotations

from typing import Any

import pytest
from torch import nn

from normlab.lab.data import Dataset
from normlab.lab.experiments import REGISTRY, Results
from normlab.lab.experiments.small_batch import (
    BATCH,
    D_END,
    MICRO,
    MOMENTUM_STATS,
    R_END,
    UNITS,
    WARMUP,
    renorm_schedule,
)
from normlab.lab.models import MicroBatch

EXP = REGISTRY["small_batch"]


def _results(acc: dict[tuple[str, int], list[float | None]]) -> Results:
    """Units as the runner hands them to evaluate(): one per (method, micro-batch), members per seed."""
    out: Results = []
    for (method, micro), values in acc.items():
        cfg: dict[str, Any] = {"method": method, "micro": micro, "seeds": list(range(len(values)))}
        out.append(
            (cfg, {"members": [{"seed": i, "final_test_acc": v} for i, v in enumerate(values)]})
        )
    return out


def _acc(**override: list[float | None]) -> dict[tuple[str, int], list[float | None]]:
    acc: dict[tuple[str, int], list[float | None]] = {u: [0.95] * 5 for u in UNITS}
    for key, values in override.items():
        method, micro = key.rsplit("_", 1)
        acc[(method, int(micro))] = values
    return acc


def _claims(acc: dict[tuple[str, int], list[float | None]]) -> dict[str, Any]:
    return {c.claim.name: c for c in EXP.evaluate(_results(acc), dataset="digits")}


def test_claims_are_paired_differences_and_a_paired_ratio_of_means() -> None:
    claims = _claims(
        _acc(
            bn_2=[0.60, 0.62, 0.58, 0.61, 0.59],
            bn_32=[0.95, 0.96, 0.94, 0.95, 0.95],
            renorm_2=[0.85, 0.86, 0.82, 0.84, 0.83],
        )
    )
    assert claims["bn_drop"].values == pytest.approx([0.35, 0.34, 0.36, 0.34, 0.36])
    assert claims["bn_drop"].verdict == "confirmed"
    # (mean(Renorm₂ − BN₂) / mean(BN₃₂ − BN₂)) = 0.24 / 0.35
    assert claims["renorm_recovery"].estimate == pytest.approx(0.24 / 0.35)
    assert (
        claims["renorm_recovery"].verdict == "confirmed"
        and "bootstrap" in claims["renorm_recovery"].method
    )
    assert claims["layernorm_flat"].verdict == "confirmed"
    assert claims["layernorm_flat"].claim.kind == claims["groupnorm_flat"].claim.kind == "sanity"


def test_a_failed_recovery_is_refuted_and_a_diverged_seed_inconclusive() -> None:
    worse = _claims(_acc(bn_2=[0.6] * 5, renorm_2=[0.62, 0.61, 0.63, 0.6, 0.62]))
    assert worse["renorm_recovery"].verdict == "refuted"
    diverged = _claims(_acc(bn_2=[0.6] * 5, renorm_2=[0.9, None, 0.9, 0.9, 0.9]))
    assert diverged["renorm_recovery"].verdict == "inconclusive"
    assert "1 of 5 seeds have no value" in EXP.table(
        _results(_acc(renorm_2=[0.9, None, 0.9, 0.9, 0.9]))
    )
    flat = _claims(_acc(layer_2=[0.90] * 5))  # LayerNorm not flat: the sanity check catches it
    assert flat["layernorm_flat"].verdict == "refuted"


def test_renorm_schedule_is_in_steps_with_a_warmup_of_five_time_constants() -> None:
    r_max, d_max = renorm_schedule()
    assert round(5 / MOMENTUM_STATS) == WARMUP
    assert (r_max(0), d_max(0), r_max(WARMUP), d_max(WARMUP)) == (1.0, 0.0, 1.0, 0.0)
    assert d_max(D_END) == pytest.approx(5.0) and r_max(R_END) == pytest.approx(3.0)
    assert r_max(10 * R_END) == 3.0 and 0.0 < d_max((WARMUP + D_END) // 2) < 5.0
    # Ioffe's proportions: d_max ends at 5× and r_max at 8× the warm-up (25k and 40k after 5k)
    assert (D_END, R_END) == (5 * WARMUP, 8 * WARMUP)


def test_units_normalize_micro_batches_at_a_fixed_gradient_batch(
    synthetic: Dataset, capped_training: None
) -> None:
    configs = EXP.configs(quick=True, seeds=[0, 1], dataset="synthetic")
    assert {(c["method"], c["micro"]) for c in configs} == set(UNITS)
    assert {c["micro"] for c in configs if c["method"] == "bn"} == set(MICRO)
    full = EXP.configs(quick=False, seeds=[0], dataset="synthetic")
    assert full[0]["steps"] > configs[0]["steps"]
    results = [(cfg, EXP.run(cfg, synthetic)) for cfg in configs]
    claims = EXP.evaluate(results, dataset="synthetic")
    assert [c.claim.name for c in claims] == [c.name for c in EXP.claims]
    # per-sample norms ignore the micro-batch: identical results at 2 and 32
    by = {(c["method"], c["micro"]): m["members"] for c, m in results}
    assert [m["final_test_acc"] for m in by[("layer", 2)]] == [
        m["final_test_acc"] for m in by[("layer", BATCH)]
    ]
    assert "micro-batch 2" in EXP.table(results)


def test_the_bn_model_wraps_every_norm_in_micro_batches() -> None:
    from normlab.lab.models import mlp

    model = mlp(8, 3, 16, 3, norm="renorm", micro_batch=4)
    wrapped = [m for m in model if isinstance(m, MicroBatch)]
    assert len(wrapped) == 3 and all(m.size == 4 for m in wrapped)
    assert not any(isinstance(m, MicroBatch) for m in mlp(8, 3, 16, 3, norm="layer", micro_batch=4))
    assert isinstance(mlp(8, 1, 16, 3, norm="group", micro_batch=4)[1], nn.GroupNorm)
