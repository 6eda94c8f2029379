"""Timing core of ``normlab bench``: paired, alternating, median-of-repeats ratios against torch.

Timings on a shared machine are noisy, so every figure is a *ratio* of two
callables measured in the same process, interleaved (torch, normlab, torch, …)
so that drift in machine load hits both alike.

Bandwidth efficiency: batch norm is memory-bound, so each case may declare its
minimum traffic (:class:`Traffic`: read+write pairs and extra reads of a tensor
like its input). The floor time of that traffic is measured in the same run — a
copy into a preallocated tensor for a read+write pair, a ``sum`` for a read — and
efficiency = floor time / measured time (1.0: at the floor; above 1.0 means the
op beat the floor, e.g. by re-reading from cache or streaming its stores).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = [
    "BenchOptions",
    "Case",
    "Result",
    "Traffic",
    "floor_op",
    "geomean_ratios",
    "run_cases",
    "time_many",
    "time_pair",
]


@dataclass(frozen=True)
class BenchOptions:
    """What the user asked for on the command line."""

    quick: bool = False
    repeats: int = 20
    warmup: int = 3
    backend: str = "auto"
    tune_allocator: bool = True


@dataclass(frozen=True)
class Traffic:
    """Minimum memory traffic of an op in units of the tensor ``like``.

    ``copies`` read+write pairs (priced at the copy floor) plus ``reads`` extra
    reads (priced at the reduction floor). Train forward: 1 copy + 1 read (read x
    for the statistics, read it again and write y); eval: 1 copy. The floor is
    timed interleaved with the two sides of its case, so load drift hits all three.
    """

    like: torch.Tensor
    copies: int
    reads: int = 0


@dataclass
class Case:
    """One row of the table: a torch baseline and a normlab candidate doing the same work.

    ``setup`` (optional) runs before each timed call of either side, untimed
    (e.g. zeroing gradients). ``traffic`` is the minimum memory traffic of the op,
    for the bandwidth-efficiency columns; ``floor`` instead is the floor's own work
    when it is not a memory traffic (e.g. a training step's matrix products alone),
    timed interleaved with both sides the same way.
    """

    suite: str
    name: str
    mode: str
    baseline: Callable[[], Any]
    candidate: Callable[[], Any]
    setup: Callable[[], Any] | None = None
    traffic: Traffic | None = None
    baseline_label: str = "torch"
    floor: Callable[[], Any] | None = None


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
    floor_ms: float | None = None
    baseline_eff: float | None = None
    normlab_eff: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timed(fn: Callable[[], Any], setup: Callable[[], Any] | None) -> float:
    if setup is not None:
        setup()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_many(
    fns: Sequence[Callable[[], Any]],
    *,
    repeats: int = 20,
    warmup: int = 3,
    setup: Callable[[], Any] | None = None,
) -> list[float]:
    """Median seconds of each callable, measured round-robin (the starting one rotates)."""
    for _ in range(warmup):
        for fn in fns:
            _timed(fn, setup)
    times: list[list[float]] = [[] for _ in fns]
    for i in range(repeats):
        # rotate which side goes first, so none always runs on a warmer cache
        for k in range(len(fns)):
            j = (i + k) % len(fns)
            times[j].append(_timed(fns[j], setup))
    return [statistics.median(t) for t in times]


def time_pair(
    baseline: Callable[[], Any],
    candidate: Callable[[], Any],
    *,
    repeats: int = 20,
    warmup: int = 3,
    setup: Callable[[], Any] | None = None,
) -> tuple[float, float]:
    """Median seconds of ``baseline`` and ``candidate``, measured alternately."""
    base, cand = time_many([baseline, candidate], repeats=repeats, warmup=warmup, setup=setup)
    return base, cand


def floor_op(traffic: Traffic) -> Callable[[], Any]:
    """The floor's own work: ``copies`` copies into a preallocated tensor, ``reads`` sums."""
    like = traffic.like
    out = torch.empty_like(like)

    def run() -> None:
        for _ in range(traffic.copies):
            out.copy_(like)
        for _ in range(traffic.reads):
            like.sum()

    return run


def geomean_ratios(results: Sequence[Result]) -> float:
    """Geometric mean of the ratios (nan when empty)."""
    if not results:
        return math.nan
    return math.exp(sum(math.log(r.ratio) for r in results) / len(results))


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
        fns = [case.baseline, case.candidate]
        if case.floor is not None:  # the floor runs interleaved with both sides
            fns.append(case.floor)
        elif case.traffic is not None:
            fns.append(floor_op(case.traffic))
        base, cand, *rest = time_many(
            fns, repeats=options.repeats, warmup=options.warmup, setup=case.setup
        )
        floor = rest[0] if rest else None
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
                floor_ms=None if floor is None else floor * 1e3,
                baseline_eff=None if floor is None else floor / base,
                normlab_eff=None if floor is None else floor / cand,
            )
        )
    return results


def machine_info() -> dict[str, Any]:
    """What the timings depend on: CPU model and vector extensions, cores, threads, versions."""
    import datetime
    import os
    import platform

    from .. import __version__

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "vector": sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_tile")),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "normlab": __version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
