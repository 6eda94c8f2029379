"""noisy_bn: the noise (per sample, per step, per seed; stacked = alone), the instability measure, the claims."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from normlab.lab.data import Dataset
from normlab.lab.ensemble import Ensemble, TrainConfig, train_ensemble
from normlab.lab.experiments import REGISTRY, Results
from normlab.lab.experiments.convergence import inputs_of
from normlab.lab.experiments.noisy_bn import (
    DEPTH,
    LR_HIGH,
    LR_LOW,
    NoiseInjection,
    instability,
    model,
)

EXP = REGISTRY["noisy_bn"]


def test_noise_is_iid_per_sample_redrawn_every_step_and_off_in_eval() -> None:
    layer = NoiseInjection(200, seed=0)
    x = torch.ones(500, 200)
    y1, y2 = layer(x), layer(x)
    # per sample and unit: the rows differ
    assert y1.std(0).min() > 0.05
    # the distribution's parameters change from step to step: per-unit means move by ~0.3
    assert (y1.mean(0) - y2.mean(0)).abs().mean() > 0.1
    # non-zero mean and non-unit scale (x = 1: y = s + m)
    assert y1.mean(0).abs().max() > 0.3 and (y1.mean(0) - 1).abs().mean() > 0.1
    assert torch.equal(layer.eval()(x), x)


def test_stacked_noise_is_per_member_deterministic_and_leaves_the_members_alone(
    synthetic: Dataset,
) -> None:
    layers = [NoiseInjection(50, seed=s) for s in (3, 4)]
    before = [layer.generator.get_state() for layer in layers]
    stacked = NoiseInjection.stack(layers).train()
    x = torch.ones(2, 400, 50)
    y = stacked(x)
    assert not torch.allclose(y[0].mean(0), y[1].mean(0), atol=0.05)  # each member its own noise
    again = NoiseInjection.stack([NoiseInjection(50, seed=s) for s in (3, 4)]).train()
    assert torch.equal(again(x), y)  # the same seeds: the same noise
    assert torch.equal(stacked.eval()(x), x)
    assert all(torch.equal(b, layer.generator.get_state()) for b, layer in zip(before, layers))
    # a whole run is reproducible
    cfg = TrainConfig(lr=0.05, batch_size=32, steps=5, eval_every=None)
    runs = [
        train_ensemble(
            [model(synthetic, "noisy_bn", s) for s in (0, 1)], synthetic, cfg, seeds=[0, 1]
        )[0]
        for _ in range(2)
    ]
    assert [r.final_test_acc for r in runs[0]] == [r.final_test_acc for r in runs[1]]
    assert sum(isinstance(m, NoiseInjection) for m in model(synthetic, "noisy_bn", 0)) == DEPTH


def test_relu_inputs_include_the_noise_and_leave_running_stats_alone(synthetic: Dataset) -> None:
    ens = Ensemble([model(synthetic, "noisy_bn", 0)]).eval()
    buffers = [b.clone() for b in ens.buffers()]
    hs = inputs_of(ens, ens.outputs(synthetic.x_test, train=True), torch.nn.ReLU)
    assert len(hs) == DEPTH and hs[0].shape == (1, len(synthetic.y_test), 100)
    # after a BN (batch statistics, γ=1, β=0) the noise sets each unit's mean: not all ≈ 0
    assert hs[0].mean(1).abs().max() > 0.2
    assert all(torch.equal(a, b) for a, b in zip(buffers, ens.buffers())) and not ens.training


def test_instability_is_the_mean_over_layers_units_and_steps_of_mean_plus_std_change() -> None:
    # (T, L, mean/std, C): layer 0 moves its means by 1, layer 1 its stds by 3, then nothing moves
    a = np.zeros((3, 2, 2, 4))
    a[1, 0, 0] = 1.0
    a[1, 1, 1] = 3.0
    a[2] = a[1]
    assert instability(a.tolist()) == pytest.approx((1 + 3 + 0 + 0) / 4)


def _results(acc: dict[tuple[str, float], list[float]], inst: float | None = 0.1) -> Results:
    out: Results = []
    for arm in ("plain", "bn", "noisy_bn"):
        members: list[dict[str, Any]] = []
        for lr in (LR_LOW, LR_HIGH):
            for i, a in enumerate(acc[(arm, lr)]):
                scale = {"plain": 1.0, "bn": 0.5, "noisy_bn": 3.0}[arm]
                members.append(
                    {
                        "lr": lr,
                        "seed": i,
                        "final_test_acc": a,
                        "diverged": False,
                        "instability": None if inst is None else inst * scale * (1 + 0.1 * i),
                    }
                )
        out.append(
            ({"arm": arm, "seeds": list(range(5)), "lrs": [LR_LOW, LR_HIGH]}, {"members": members})
        )
    return out


def _acc(**override: list[float]) -> dict[tuple[str, float], list[float]]:
    base = {
        ("plain", LR_LOW): [0.96, 0.95, 0.97, 0.96, 0.95],
        ("bn", LR_LOW): [0.97, 0.96, 0.97, 0.97, 0.96],
        ("noisy_bn", LR_LOW): [0.965, 0.962, 0.968, 0.972, 0.958],
        ("plain", LR_HIGH): [0.10, 0.40, 0.10, 0.30, 0.10],
        ("bn", LR_HIGH): [0.97, 0.97, 0.96, 0.97, 0.96],
        ("noisy_bn", LR_HIGH): [0.95, 0.96, 0.95, 0.96, 0.95],
    }
    for key, values in override.items():
        arm, which = key.rsplit("_", 1)
        base[(arm, LR_LOW if which == "low" else LR_HIGH)] = values
    return base


def test_claims_on_hand_made_metrics() -> None:
    claims = {c.claim.name: c for c in EXP.evaluate(_results(_acc()), dataset="digits")}
    gap = claims["noisy_matches_bn"]
    assert gap.values == pytest.approx([0.005, -0.002, 0.002, -0.002, 0.002])  # signed, paired
    assert gap.verdict == "confirmed"  # the whole interval inside ±0.02
    assert claims["noisy_less_stable"].estimate == pytest.approx(3.0)  # ratio, log scale
    assert claims["noisy_less_stable"].verdict == "confirmed"
    assert claims["bn_beats_plain_high_lr"].verdict == "confirmed"
    assert claims["noisy_beats_plain_high_lr"].verdict == "confirmed"
    far = _acc(noisy_bn_low=[0.90, 0.91, 0.92, 0.90, 0.91])  # noisy 0.05 below BN everywhere
    assert {c.claim.name: c for c in EXP.evaluate(_results(far), dataset="digits")}[
        "noisy_matches_bn"
    ].verdict == "refuted"
    # a plain run without an instability (diverged) leaves that seed's ratio out: inconclusive
    no_inst = {c.claim.name: c for c in EXP.evaluate(_results(_acc(), inst=None), dataset="digits")}
    assert no_inst["noisy_less_stable"].verdict == "inconclusive"


def test_quick_run_end_to_end_on_synthetic(synthetic: Dataset, capped_training: None) -> None:
    configs = EXP.configs(quick=True, seeds=[0, 1, 2], dataset="synthetic")
    assert [c["arm"] for c in configs] == ["plain", "bn", "noisy_bn"]
    results = [(cfg, EXP.run(cfg, synthetic)) for cfg in configs]
    noisy = results[2][1]["members"]
    assert len(noisy) == 6 and {m["lr"] for m in noisy} == {LR_LOW, LR_HIGH}
    assert all(m["instability"] > 0 for m in noisy)
    assert np.asarray(noisy[0]["unit_quantiles"]).shape == (len(noisy[0]["probe_steps"]), 5)
    assert "distributional instability" in EXP.table(results)
