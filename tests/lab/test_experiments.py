"""Every registered experiment runs end to end on synthetic data (training capped); its measures are right."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from normlab.lab.data import Dataset
from normlab.lab.experiments import EXPERIMENTS, REGISTRY, ClaimResult
from normlab.lab.experiments._common import fmt, num
from normlab.lab.experiments.convergence import quantile_drift, steps_to_reach
from normlab.lab.experiments.init_sensitivity import tolerated
from normlab.lab.experiments.learning_rate import largest_trainable, train_rate
from normlab.lab.experiments.signal_propagation import _max_log_ratio
from normlab.lab.experiments.xavier_vs_he import escape_step


def test_registry_lists_the_sixteen_experiments_in_order() -> None:
    assert list(REGISTRY) == list(EXPERIMENTS) and len(EXPERIMENTS) == 16
    for exp in REGISTRY.values():
        assert exp.paper and exp.setup and exp.paper_numbers and exp.summary
        assert "Taken from" in exp.setup, (
            exp.name
        )  # what was taken from the paper, and what changed
        for c in exp.claims:
            assert c.paper_value, (exp.name, c.name)  # the paper's own value beside ours
        # a unit's config holds what determines its result (the store's hash covers it)
        assert all("setup" in cfg for cfg in exp.configs(quick=True, seeds=[0], dataset="digits"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_end_to_end_on_synthetic(
    name: str,
    synthetic: Dataset,
    capped_training: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exp = REGISTRY[name]
    if name == "gradients_at_init":  # a coarser step grid: the plumbing, not the claim
        monkeypatch.setattr(
            "normlab.lab.experiments.gradients_at_init.ALPHAS", tuple(np.logspace(-5, 1, 11))
        )
    results = [
        (cfg, exp.run(cfg, synthetic))
        for cfg in exp.configs(quick=True, seeds=[0, 1], dataset="synthetic")
    ]
    claims = exp.evaluate(results, dataset="synthetic")
    assert [c.claim.name for c in claims] == [c.name for c in exp.claims]
    for c in claims:
        assert isinstance(c, ClaimResult)
        assert c.verdict in ("confirmed", "refuted", "inconclusive")
        assert c.ci_low <= c.ci_high or math.isnan(c.estimate)
    assert "|" in exp.table(results)
    pngs = exp.plot(results, tmp_path)
    assert pngs and all(p.exists() and p.stat().st_size > 5000 for p in pngs)


def test_quick_runs_use_five_seeds_and_full_runs_ten() -> None:
    from normlab.lab.experiments import FULL_SEEDS, QUICK_SEEDS

    assert QUICK_SEEDS >= 5 and FULL_SEEDS >= 10


def test_steps_to_reach_and_escape_step() -> None:
    assert steps_to_reach([0, 20, 40], [0.1, 0.95, 0.97], 0.9) == 20
    assert steps_to_reach([0, 20, 40], [0.1, 0.5, 0.6], 0.9) is None
    assert escape_step([0, 20, 40], [float("nan"), 2.2, 1.5], 2.07) == 40
    assert escape_step([0, 20], [None, 2.3], 2.07) is None


def test_quantile_drift_is_the_net_move_in_spreads() -> None:
    # (T, 3 quantiles, C=1): spread 2 throughout; the distribution moves by 1 after 10 %
    steps = [0, 10, 50, 100]
    hist = [
        [[-1.0], [0.0], [1.0]],
        [[-1.0], [0.0], [1.0]],
        [[5.0], [6.0], [7.0]],  # a transient excursion does not count
        [[0.0], [1.0], [2.0]],
    ]
    assert quantile_drift(steps, hist) == pytest.approx(0.5)
    scaled = [[[v[0] * 10] for v in h] for h in hist]
    assert quantile_drift(steps, scaled) == pytest.approx(0.5)  # scale-free
    with pytest.raises(ValueError, match="at least two probes"):
        quantile_drift([0], hist[:1])


def test_largest_trainable_learning_rate_needs_the_rate() -> None:
    success = np.array(
        [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 1, 0]], dtype=bool
    )  # (seeds, lrs)
    lrs = [0.1, 0.2, 0.4, 0.8]
    assert train_rate(success).tolist() == [1.0, 0.8, 0.8, 0.2]
    assert largest_trainable(success, lrs) == 0.4  # 4 of 5 train at 0.4
    assert largest_trainable(success, lrs, rate=1.0) == 0.1
    assert largest_trainable(np.zeros((2, 4), dtype=bool), lrs) == 0.0


def test_tolerated_uses_the_seed_mean() -> None:
    acc = np.array([[0.9, 0.9, 0.1], [0.75, 0.9, 0.1]])  # (seeds, scales)
    assert tolerated(acc, 0.8) == 2  # scale 0: mean 0.825


def test_max_log_ratio() -> None:
    assert _max_log_ratio([1.0, 1.25, 1.0]) == pytest.approx(np.log(1.25))


def test_numbers_are_formatted_one_way() -> None:
    assert [num(x) for x in (0.9534, 12.345, 1.0, 1600.0, 1.2e-5, float("inf"), None)] == [
        "0.953",
        "12.3",
        "1.00",
        "1,600",
        "1.20e-05",
        "∞",
        "n/a",
    ]
    assert fmt([0.5]) == "0.500 (one seed)"  # never "± 0.000" for one value
    assert fmt([0.5, 0.7]) == "0.600 ± 0.141"
    assert fmt([0.5, None, 0.7]) == "0.600 ± 0.141 (1 of 3 seeds have no value)"


def test_claims_render_accuracy_levels_per_dataset() -> None:
    """Claim texts name the level actually tested: 90% on digits, 80% on Fashion-MNIST."""
    he = REGISTRY["xavier_vs_he"].claim("he_trains", "fashion-mnist")
    assert "≥ 80% test accuracy" in he.statement
    assert "≥ 90% test accuracy" in REGISTRY["xavier_vs_he"].claim("he_trains").statement
    lr = REGISTRY["learning_rate"].claim("max_lr_ratio", "fashion-mnist")
    assert "≥ 0.70 test accuracy" in lr.quantity
    for exp in REGISTRY.values():  # no placeholder is left unrendered anywhere
        for c in exp.claims:
            for ds in ("digits", "fashion-mnist"):
                rendered = exp.claim(c.name, ds)
                assert "{" not in rendered.statement + rendered.quantity, (exp.name, c.name)
        assert "{" not in exp.setup, exp.name


@pytest.mark.parametrize("name", ["noisy_bn", "input_normalization"])
def test_a_unit_gives_the_same_numbers_when_rerun(
    name: str, synthetic: Dataset, capped_training: None
) -> None:
    """Same config, same machine and threads → the same metrics (noise, data order, distortions and
    initializations all come from seeded generators)."""
    exp = REGISTRY[name]
    cfg = exp.configs(quick=True, seeds=[0, 1], dataset="synthetic")[-1]
    first, second = (json.dumps(exp.run(cfg, synthetic), sort_keys=True) for _ in range(2))
    assert first == second  # (as JSON: a NaN equals itself there)
