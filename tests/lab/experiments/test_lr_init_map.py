"""lr_init_map: the inits, the map's cells and the claims on hand-made results."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from normlab.lab.data import Dataset
from normlab.lab.experiments import REGISTRY, Results
from normlab.lab.experiments.lr_init_map import (
    INITS,
    LRS,
    LSUV_SAMPLES,
    WIDTH,
    build,
    cell_success,
    trainable_cells,
)

EXP = REGISTRY["lr_init_map"]


def test_inits_have_the_named_scales(synthetic: Dataset) -> None:
    def hidden_std(init: str) -> float:
        m = build(synthetic, "none", init, seed=0)
        return float(m[2].weight.detach().std())  # the second hidden Linear: WIDTH → WIDTH

    assert hidden_std("unit_normal") == pytest.approx(1.0, rel=0.15)
    assert hidden_std("small_normal") == pytest.approx(0.01, rel=0.15)
    assert hidden_std("he") == pytest.approx((2 / WIDTH) ** 0.5, rel=0.15)
    assert hidden_std("glorot") == pytest.approx((1 / WIDTH) ** 0.5, rel=0.15)


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_lsuv_gives_unit_variance_outputs(norm: str, synthetic: Dataset) -> None:
    model = build(synthetic, norm, "lsuv", seed=3)
    idx = torch.randperm(len(synthetic.y_train), generator=torch.Generator().manual_seed(3))
    h = synthetic.x_train[idx[:LSUV_SAMPLES]]
    model.eval()
    with torch.no_grad():
        for layer in model:
            h = layer(h)
            if isinstance(layer, nn.Linear):
                assert float(h.var()) == pytest.approx(1.0, abs=0.11)  # lsuv_ tol 0.1


def test_cells_and_the_trainable_region() -> None:
    seeds = [0, 1, 2, 3, 4]
    records = [
        {
            "seed": s,
            "init": i,
            "lr": lr,
            "diverged": lr > 1.0,
            "final_test_acc": 0.95 - 0.1 * (s == 0),
        }
        for s in seeds
        for i in INITS
        for lr in LRS
    ]
    success = cell_success(records, seeds, 0.9)
    assert success.shape == (5, len(INITS), len(LRS))
    # lrs ≤ 1.0 train for 4 of 5 seeds (seed 0 is below the level): exactly the 80 % rate
    assert trainable_cells(success) == len(INITS) * sum(lr <= 1.0 for lr in LRS)
    assert trainable_cells(success, rate=1.0) == 0


def _results(plain_ok: int, bn_ok: int, gap: float) -> Results:
    """Plain trains at the first ``plain_ok`` rates (every init), BN at the first ``bn_ok``; at the
    smallest rate BN's accuracy is plain's + ``gap`` (± a little per seed)."""
    out: Results = []
    for norm, ok in (("none", plain_ok), ("bn", bn_ok)):
        members: list[dict[str, Any]] = []
        for init in INITS:
            for j, lr in enumerate(LRS):
                for s in range(5):
                    acc = 0.9 + (gap + 0.002 * (s - 2) if norm == "bn" and j == 0 else 0.0)
                    members.append(
                        {
                            "init": init,
                            "lr": lr,
                            "seed": s,
                            "final_test_acc": acc if j < ok else 0.1,
                            "diverged": False,
                        }
                    )
        cfg = {"norm": norm, "seeds": list(range(5)), "dataset": "digits", "lrs": list(LRS)}
        out.append((cfg, {"members": members, "num_classes": 10}))
    return out


def test_claims_on_hand_made_results() -> None:
    claims = {c.claim.name: c for c in EXP.evaluate(_results(3, 6, 0.0), dataset="digits")}
    region = claims["bn_larger_region"]
    assert region.estimate == pytest.approx(2.0) and region.verdict == "confirmed"
    assert claims["same_at_smallest_lr"].verdict == "confirmed"  # gap 0 ± 0.003 inside ±0.02
    claims = {c.claim.name: c for c in EXP.evaluate(_results(4, 4, 0.05), dataset="digits")}
    assert claims["bn_larger_region"].verdict == "refuted"  # the same region: ratio 1
    assert claims["same_at_smallest_lr"].verdict == "refuted"
    assert claims["same_at_smallest_lr"].estimate == pytest.approx(0.05)
    assert "**" in EXP.table(_results(3, 6, 0.0))  # trainable cells in bold
    assert np.isinf(
        {c.claim.name: c for c in EXP.evaluate(_results(0, 6, 0.0), dataset="digits")}[
            "bn_larger_region"
        ].estimate
    )
