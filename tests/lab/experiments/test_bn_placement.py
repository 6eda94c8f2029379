"""bn_placement: report only — the four arms, their models, the table and the curves."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from normlab.lab.data import Dataset
from normlab.lab.experiments import REGISTRY
from normlab.lab.models import mlp

EXP = REGISTRY["bn_placement"]


def test_declares_no_claim_and_covers_both_activations_and_placements() -> None:
    assert EXP.claims == ()
    configs = EXP.configs(quick=False, seeds=[0, 1, 2, 3, 4], dataset="digits")
    assert {(c["activation"], c["norm"]) for c in configs} == {
        (a, p) for a in ("relu", "sigmoid") for p in ("bn", "bn_after")
    }
    assert all(c["seeds"] == [0, 1, 2, 3, 4] and c["epochs"] == 20 for c in configs)


def test_placement_puts_bn_before_or_after_the_activation() -> None:
    before = [type(m) for m in mlp(8, 2, 16, 3, activation="sigmoid", norm="bn")]
    after = [type(m) for m in mlp(8, 2, 16, 3, activation="sigmoid", norm="bn_after")]
    assert before.index(nn.Sigmoid) == before.index(nn.Linear) + 2
    assert after.index(nn.Sigmoid) == after.index(nn.Linear) + 1
    assert issubclass(after[after.index(nn.Sigmoid) + 1], nn.modules.batchnorm._BatchNorm)
    # a Linear followed directly by BN needs no bias (β replaces it); one followed by the activation keeps it
    assert mlp(8, 2, 16, 3, norm="bn")[0].bias is None
    assert mlp(8, 2, 16, 3, norm="bn_after")[0].bias is not None


def test_quick_run_end_to_end_on_synthetic(
    synthetic: Dataset, capped_training: None, tmp_path: Path
) -> None:
    configs = EXP.configs(quick=True, seeds=[0, 1, 2], dataset="synthetic")
    results = [(cfg, EXP.run(cfg, synthetic)) for cfg in configs]
    assert EXP.evaluate(results, dataset="synthetic") == []
    for _, metrics in results:
        assert len(metrics["members"]) == 3
        assert all(len(m["steps"]) == len(m["test_acc"]) >= 2 for m in metrics["members"])
    table = EXP.table(results)
    assert table.count("| relu |") == 2 and "before" in table and "after" in table
    (png,) = EXP.plot(results, tmp_path)
    assert png.stat().st_size > 5000
