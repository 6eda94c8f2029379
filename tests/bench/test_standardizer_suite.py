"""The ``standardizer`` bench suite runs and reports sane columns (never a timing assertion)."""

from __future__ import annotations

import subprocess

import pytest

from normlab.bench import RESULT_SUITES, BenchOptions
from normlab.bench import _standardizer as suite

TINY = BenchOptions(quick=True, repeats=3, warmup=1)


def test_suite_rows_and_columns() -> None:
    results = RESULT_SUITES["standardizer"](TINY)
    rows = {(r.mode, r.name) for r in results}
    assert rows == {
        ("partial_fit", "40 batches (1000, 64) float64 numpy"),
        ("partial_fit", "40 batches (1000, 64) float32 torch"),
        ("partial_fit, 1 core busy", "40 batches (1000, 64) float64 numpy"),
        ("partial_fit, 1 core busy", "40 batches (1000, 64) float32 torch"),
        ("transform", "(1000, 64) fp32"),
        ("transform", "(64, 3, 64, 64) fp32"),
    }
    for r in results:
        assert r.baseline_label == ("torch" if r.mode == "transform" else "sklearn")
        assert r.baseline_ms > 0 and r.normlab_ms > 0 and r.floor_ms is not None
        assert r.ratio == pytest.approx(r.normlab_ms / r.baseline_ms)
        assert r.normlab_eff == pytest.approx(r.floor_ms / r.normlab_ms)


def test_busy_core_spinner_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[subprocess.Popen] = []
    real = subprocess.Popen

    def record(*args, **kwargs):
        started.append(real(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(suite.subprocess, "Popen", record)
    with pytest.raises(KeyboardInterrupt), suite.one_core_busy():
        assert started[0].poll() is None  # spinning
        raise KeyboardInterrupt
    assert started[0].poll() is not None
