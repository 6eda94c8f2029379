"""Timing core of ``normlab bench``: paired, alternating, median-of-repeats ratios against torch.

Timings on a shared machine are noisy, so every figure is a *ratio* of two
callables measured in the same process, interleaved (torch, normlab, torch, …)
so that drift in machine load hits both alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["BenchOptions", "Case", "Result", "run_cases", "time_pair"]


@dataclass(frozen=True)
class BenchOptions:
    """What the user asked for on the command line."""

    quick: bool = False
    repeats: int = 20
    warmup: int = 3
    backend: str = "auto"


@dataclass
class Case:
    """One row of the table: a torch baseline and a normlab candidate doing the same work.

    ``setup`` (optional) runs before each timed call of either side, untimed
    (e.g. zeroing gradients). ``bytes_moved`` is the minimum traffic of the op,
    for bandwidth figures.
    """

    suite: str
    name: str
    mode: str
    baseline: Callable[[], Any]
    candidate: Callable[[], Any]
    setup: Callable[[], Any] | None = None
    bytes_moved: int | None = None
    baseline_label: str = "torch"


@dataclass
class Result:
    suite: str
    name: str
    mode: str
    baseline_ms: float
    normlab_ms: float
    ratio: float
    repeats: int
    baseline_label: str = "torch"
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timed(fn: Callable[[], Any], setup: Callable[[], Any] | None) -> float:
    if setup is not None:
        setup()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_pair(
    baseline: Callable[[], Any],
    candidate: Callable[[], Any],
    *,
    repeats: int = 20,
    warmup: int = 3,
    setup: Callable[[], Any] | None = None,
) -> tuple[float, float]:
    """Median seconds of ``baseline`` and ``candidate``, measured alternately."""
    for _ in range(warmup):
        _timed(baseline, setup)
        _timed(candidate, setup)
    a: list[float] = []
    b: list[float] = []
    for i in range(repeats):
        # alternate which side goes first, so neither always runs on a warmer cache
        if i % 2 == 0:
            a.append(_timed(baseline, setup))
            b.append(_timed(candidate, setup))
        else:
            b.append(_timed(candidate, setup))
            a.append(_timed(baseline, setup))
    return statistics.median(a), statistics.median(b)


def run_cases(
    cases: Sequence[Case],
    options: BenchOptions,
    progress: Callable[[Case], None] | None = None,
) -> list[Result]:
    """Time every case; ratio = normlab / baseline (below 1 means normlab is faster)."""
    results = []
    for case in cases:
        if progress is not None:
            progress(case)
        base, cand = time_pair(
            case.baseline,
            case.candidate,
            repeats=options.repeats,
            warmup=options.warmup,
            setup=case.setup,
        )
        results.append(
            Result(
                case.suite,
                case.name,
                case.mode,
                base * 1e3,
                cand * 1e3,
                cand / base,
                options.repeats,
                case.baseline_label,
            )
        )
    return results
