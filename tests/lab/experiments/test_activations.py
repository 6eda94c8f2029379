"""activations: weight gains, the init profile (std per layer, saturation) and the claims."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from normlab.lab.data import Dataset
from normlab.lab.experiments import REGISTRY, Results
from normlab.lab.experiments.activations import ARMS, DEPTH, GAINS, WIDTH, build, init_profile

EXP = REGISTRY["activations"]


def test_gain_scales_the_hidden_weights_only(synthetic: Dataset) -> None:
    base = build(synthetic, "none", "tanh", 1.0, seed=0)
    big = build(synthetic, "none", "tanh", 4.0, seed=0)
    lin = [(a, b) for a, b in zip(base, big) if isinstance(a, nn.Linear)]
    assert len(lin) == DEPTH + 1
    for a, b in lin[:-1]:
        torch.testing.assert_close(b.weight, 4.0 * a.weight)
    torch.testing.assert_close(lin[-1][1].weight, lin[-1][0].weight)  # the output layer stays LeCun
    assert float(lin[1][0].weight.detach().std()) == pytest.approx(1 / math.sqrt(WIDTH), rel=0.1)


def test_init_profile_against_a_manual_forward(synthetic: Dataset) -> None:
    model = build(synthetic, "none", "tanh", 4.0, seed=1)
    x = synthetic.x_test[:128]
    prof = init_profile(model, x)
    h = x
    stds = []
    with torch.no_grad():
        for layer in model[:-1]:
            pre = h
            h = layer(h)
            if isinstance(layer, nn.Tanh):
                stds.append(float(h.std()))
                last_pre = pre
    assert prof["std"] == pytest.approx(stds)
    # tanh' = 1 − tanh² is below 5 % of tanh'(0) = 1 where |tanh| > √0.95
    expected = float((torch.tanh(last_pre).abs() > math.sqrt(0.95)).float().mean())
    assert prof["saturation"] == pytest.approx(expected)
    small = init_profile(build(synthetic, "none", "tanh", 0.5, seed=1), x)
    assert small["saturation"] < prof["saturation"]


def _results(
    tolerated: dict[str, int], selu_std: float, tanh_sat: float, tanh_drop: float
) -> Results:
    """Arm ``act`` reaches 0.95 at its first ``tolerated[act]`` gains, chance after; tanh loses
    ``tanh_drop`` at the largest gain relative to gain 1."""
    out: Results = []
    for norm, act in ARMS:
        members: list[dict[str, Any]] = []
        for j, g in enumerate(GAINS):
            for s in range(5):
                acc = 0.95 if j < tolerated.get(act, 7) else 0.1
                if act == "tanh" and g == GAINS[-1]:
                    acc = 0.95 - tanh_drop + 0.005 * s
                members.append(
                    {
                        "gain": g,
                        "seed": s,
                        "final_test_acc": acc,
                        "diverged": False,
                        "init_std": [1.0] * (DEPTH - 1) + [selu_std * (1 + 0.01 * s)],
                        "saturation": tanh_sat + 0.01 * s,
                    }
                )
        cfg = {"norm": norm, "activation": act, "seeds": list(range(5)), "dataset": "digits"}
        out.append((cfg, {"members": members, "num_classes": 10}))
    return out


def test_claims_on_hand_made_results() -> None:
    good = {
        c.claim.name: c
        for c in EXP.evaluate(_results({"relu": 3, "selu": 5}, 1.0, 0.8, 0.5), dataset="digits")
    }
    assert good["selu_unit_variance"].verdict == "confirmed"
    assert good["selu_wider_than_relu"].estimate == pytest.approx(2.0)
    assert good["selu_wider_than_relu"].verdict == "confirmed"
    assert good["tanh_saturates"].verdict == "confirmed"
    assert good["tanh_worse_at_large_scale"].estimate == pytest.approx(0.5 - 0.01)
    assert good["tanh_worse_at_large_scale"].verdict == "confirmed"
    bad = {
        c.claim.name: c
        for c in EXP.evaluate(_results({"relu": 5, "selu": 3}, 3.0, 0.1, -0.02), dataset="digits")
    }
    assert [
        bad[n].verdict
        for n in (
            "selu_unit_variance",
            "selu_wider_than_relu",
            "tanh_saturates",
            "tanh_worse_at_large_scale",
        )
    ] == ["refuted"] * 4
    assert "BN-ReLU" in EXP.table(_results({}, 1.0, 0.8, 0.5))
