"""rank_collapse: the numerical rank against torch, the hidden representations, the claims."""

from __future__ import annotations

import math

import pytest
import torch

from normlab.lab.data import Dataset
from normlab.lab.experiments import REGISTRY, Results
from normlab.lab.experiments.rank_collapse import (
    ARMS,
    DEPTHS,
    RTOL,
    hidden_representations,
    numerical_rank,
)
from normlab.lab.models import mlp

EXP = REGISTRY["rank_collapse"]


@pytest.mark.parametrize("rank", [1, 3, 17])
def test_numerical_rank_matches_torch(rank: int) -> None:
    g = torch.Generator().manual_seed(rank)
    h = torch.randn(64, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, 32, generator=g, dtype=torch.float64
    )
    h += 1e-6 * torch.randn(64, 32, generator=g, dtype=torch.float64)  # noise below the tolerance
    assert numerical_rank(h) == rank == int(torch.linalg.matrix_rank(h, rtol=RTOL))
    assert numerical_rank(torch.zeros(5, 4)) == 0
    assert numerical_rank(torch.full((5, 4), float("nan"))) == 0


def test_hidden_representations_are_each_blocks_output(synthetic: Dataset) -> None:
    model = mlp(synthetic.in_features, 3, 16, synthetic.num_classes, norm="bn", seed=0)
    x = synthetic.x_test[:40]
    hs = hidden_representations(model, x)
    assert len(hs) == 3 and all(h.shape == (40, 16) and h.dtype == torch.float64 for h in hs)
    with torch.no_grad():
        manual = model[:3](x.double())  # Linear → BN → ReLU
    torch.testing.assert_close(hs[0], manual)
    assert bool((hs[-1] >= 0).all())  # after the last ReLU


def _results(ranks: dict[tuple[str, str], float]) -> Results:
    out: Results = []
    for arm in ARMS:
        members = [
            {
                "seed": s,
                "rank": [32] * (len(DEPTHS) - 1) + [ranks[arm] + (s % 2)],
                "spectrum": [1.0],
            }
            for s in range(5)
        ]
        out.append(
            ({"norm": arm[0], "activation": arm[1], "seeds": list(range(5))}, {"members": members})
        )
    return out


def test_claims_on_hand_made_ranks() -> None:
    collapse = {
        ("none", "identity"): 1,
        ("bn", "identity"): 12,
        ("none", "relu"): 2,
        ("bn", "relu"): 14,
    }
    claims = {c.claim.name: c for c in EXP.evaluate(_results(collapse), dataset="digits")}
    assert all(c.verdict == "confirmed" for c in claims.values())
    assert claims["relu_bn_keeps_more"].estimate == pytest.approx(12.0)
    flat = dict.fromkeys(collapse, 20)
    claims = {c.claim.name: c for c in EXP.evaluate(_results(flat), dataset="digits")}
    assert claims["linear_collapses"].verdict == "refuted"
    assert claims["linear_bn_keeps_rank"].verdict == "confirmed"  # 20 ≥ √32
    assert claims["relu_bn_keeps_more"].verdict == "refuted"
    assert math.sqrt(32) == pytest.approx(EXP.claim("linear_bn_keeps_rank").threshold)
