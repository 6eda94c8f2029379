"""Lab tests train tiny models: one intra-op thread is faster and immune to CPU contention."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from normlab.lab.data import Dataset, load_dataset
from normlab.lab.ensemble import TrainConfig


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def capped_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ensemble trains at most 12 steps (a smoke test checks the plumbing, not the claim)."""
    original = TrainConfig.total_steps
    monkeypatch.setattr(TrainConfig, "total_steps", lambda self, n: min(original(self, n), 12))


@pytest.fixture(scope="session")
def synthetic() -> Dataset:
    return load_dataset("synthetic")
