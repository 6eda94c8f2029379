"""noisy_bn: the noise module, the instability measure, the claims' arithmetic, a smoke run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from normlab.lab.data import Dataset
from normlab.lab.ensemble import EnsembleMLP
from normlab.lab.experiments import REGISTRY, Results
from normlab.lab.experiments.noisy_bn import (
    DEPTH,
    NoiseInjection,
    _model,
    _NoiseState,
    instability,
    relu_inputs,
)

EXP = REGISTRY["noisy_bn"]


def test_noise_is_per_member_time_varying_and_off_in_eval() -> None:
    state = _NoiseState(5, seeds=[0, 1])
    layer = NoiseInjection(state)
    x = torch.randn(2, 7, 5)  # (K, N, C)
    y = layer(x)
    assert torch.allclose(y, x * state.scale[:, None] + state.shift[:, None])
    assert not torch.allclose(state.shift[0], state.shift[1])  # each seed its own noise
    assert (state.scale != 1).all() and (state.shift != 0).all()  # non-unit scale, non-zero mean
    before = state.shift.clone()
    state.resample()
    assert not torch.allclose(before, state.shift)  # a new distribution every step
    assert torch.equal(layer.eval()(x), x)
    # a member's noise depends on its own seed only, not on its ensemble companions
    assert torch.equal(_NoiseState(5, seeds=[1]).shift[0], _NoiseState(5, seeds=[0, 1]).shift[1])


def test_noise_rejects_a_different_number_of_members() -> None:
    layer = NoiseInjection(_NoiseState(5, seeds=[0, 1]))
    with pytest.raises(ValueError, match="holds noise for 2 members, got 3"):
        layer(torch.randn(3, 4, 5))


def test_noise_follows_every_batch_norm_and_is_shared_by_the_ensemble_copy(
    synthetic: Dataset,
) -> None:
    state = _NoiseState(100, seeds=[0, 1])
    models = [_model(synthetic, "noisy_bn", s, state) for s in (0, 1)]
    kinds = [type(m).__name__ for m in models[0]]
    assert kinds.count("NoiseInjection") == DEPTH
    assert all(kinds[i + 1] == "NoiseInjection" for i, k in enumerate(kinds) if "Norm" in k)
    ens = EnsembleMLP(models)
    copies = [m for m in ens.modules() if isinstance(m, NoiseInjection)]
    assert copies and all(m.state is state for m in copies)


def test_relu_inputs_include_the_noise_and_leave_running_stats_alone(synthetic: Dataset) -> None:
    state = _NoiseState(100, seeds=[0])
    ens = EnsembleMLP([_model(synthetic, "noisy_bn", 0, state)]).eval()
    buffers = [b.clone() for b in ens.buffers()]
    hs = relu_inputs(ens, synthetic.x_test)
    assert len(hs) == DEPTH and hs[0].shape == (1, len(synthetic.y_test), 100)
    # right after a BN (batch statistics, γ=1, β=0) the noise sets each unit's mean and std
    torch.testing.assert_close(hs[0].mean(1)[0], state.shift[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(hs[0].std(1, correction=0)[0], state.scale[0], atol=1e-3, rtol=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(buffers, ens.buffers())) and not ens.training


def test_instability_is_the_mean_over_layers_units_and_steps_of_mean_plus_std_change() -> None:
    # (T, L, mean/std, C): layer 0 moves its means by 1, layer 1 its stds by 3, then nothing moves
    a = np.zeros((3, 2, 2, 4))
    a[1, 0, 0] = 1.0
    a[1, 1, 1] = 3.0
    a[2] = a[1]
    # |Δ| summed over mean/std: step 1 → layer 0: 1, layer 1: 3 per unit; step 2 → 0
    assert instability(a.tolist()) == pytest.approx((1 + 3 + 0 + 0) / 4)


def _member(acc: float, inst: float | None, diverged: bool = False) -> dict[str, Any]:
    return {"final_test_acc": acc, "instability": inst, "diverged": diverged}


def _results(arms: dict[str, list[dict[str, Any]]]) -> Results:
    return [({"arm": arm, "seeds": list(range(len(m)))}, {"members": m}) for arm, m in arms.items()]


def test_claims_on_hand_made_metrics() -> None:
    results = _results(
        {
            "plain": [_member(0.5, 0.1), _member(0.0, None, diverged=True), _member(0.6, 0.2)],
            "bn": [_member(0.97, 0.01), _member(0.96, 0.01), _member(0.98, 0.01)],
            "noisy_bn": [_member(0.96, 0.5), _member(0.95, 0.6), _member(0.95, 0.4)],
        }
    )
    claims = {c.claim.name: c for c in EXP.evaluate(results, dataset="digits")}
    assert claims["noisy_matches_bn"].values == pytest.approx([0.01, 0.01, 0.03])
    assert claims["noisy_matches_bn"].passed  # mean 0.0167 <= 0.02
    # the seed whose plain run diverged has no distribution to compare: ratios 5 and 2
    assert claims["noisy_unstable"].values == pytest.approx([5.0, 2.0])
    assert claims["noisy_unstable"].passed  # mean 3.5 >= 3
    assert claims["both_beat_plain"].values == pytest.approx([0.46, 0.95, 0.35])
    results[2][1]["members"][2]["final_test_acc"] = 0.80  # noisy far below BN and below plain there
    claims = {c.claim.name: c for c in EXP.evaluate(results, dataset="digits")}
    assert not claims["noisy_matches_bn"].passed
    assert claims["both_beat_plain"].values[2] == pytest.approx(0.20)


def test_quick_run_end_to_end_on_synthetic(
    synthetic: Dataset, capped_training: None, tmp_path: Path
) -> None:
    configs = EXP.configs(quick=True, seeds=[0, 1, 2], dataset="synthetic")
    assert [c["arm"] for c in configs] == ["plain", "bn", "noisy_bn"]
    results = [(cfg, EXP.run(cfg, synthetic)) for cfg in configs]
    noisy = results[2][1]["members"]
    assert len(noisy) == 3 and all(m["instability"] > 0 for m in noisy)
    assert np.asarray(noisy[0]["unit_quantiles"]).shape == (len(noisy[0]["steps"]), 5)
    claims = EXP.evaluate(results, dataset="synthetic")
    assert [c.claim.name for c in claims] == [c.name for c in EXP.claims]
    assert "distributional instability" in EXP.table(results)
    (png,) = EXP.plot(results, tmp_path)
    assert png.stat().st_size > 5000
