"""``Standardizer.partial_fit`` throughput against scikit-learn's ``StandardScaler.partial_fit``."""

from __future__ import annotations

import numpy as np

from ..preprocessing import Standardizer
from ._core import BenchOptions, Case

__all__ = ["standardizer_cases"]


def standardizer_cases(options: BenchOptions) -> list[Case]:
    """Stream the same (N, F) float64 batches through both; small batches are where overhead shows."""
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    cases = []
    shapes = [(64, 100, 200), (8192, 100, 8)] if not options.quick else [(64, 100, 50)]
    for rows, features, count in shapes:
        batches = [rng.normal(3, 2, size=(rows, features)) for _ in range(count)]

        def ours(batches=batches) -> None:
            s = Standardizer()
            for b in batches:
                s.partial_fit(b)

        def sklearn(batches=batches) -> None:
            s = StandardScaler()
            for b in batches:
                s.partial_fit(b)

        cases.append(
            Case(
                "standardizer",
                f"{count} batches of ({rows}, {features})",
                "partial_fit",
                sklearn,
                ours,
                baseline_label="sklearn",
            )
        )
    return cases
