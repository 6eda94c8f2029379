"""The fold bench suite times the same computation on both sides (no timing assertions)."""

from __future__ import annotations

import torch

from normlab.bench import SUITES, BenchOptions


def test_fold_suite_sides_compute_the_same_output() -> None:
    (case,) = SUITES["fold"](BenchOptions(quick=True))
    assert case.suite == "fold" and case.baseline_label == "unfolded"
    a, b = case.baseline(), case.candidate()
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
