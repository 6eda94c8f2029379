"""Shared fixtures for the per-experiment tests: tiny training budgets on the synthetic dataset."""

from __future__ import annotations

import pytest

from normlab.lab.data import Dataset, load_dataset
from normlab.lab.ensemble import TrainConfig


@pytest.fixture
def capped_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ensemble trains at most 12 steps (a smoke test checks the plumbing, not the claim)."""
    original = TrainConfig.total_steps
    monkeypatch.setattr(TrainConfig, "total_steps", lambda self, n: min(original(self, n), 12))


@pytest.fixture(scope="session")
def synthetic() -> Dataset:
    return load_dataset("synthetic")
