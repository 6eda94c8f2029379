"""Progress of a lab run: how far the unit in training is, and when the run should end.

An experiment may call :func:`report_progress` while it trains a unit (once per epoch or
evaluation); ``normlab lab run`` then moves its bar and its ETA within the unit. The call is
optional and does nothing outside a run: a unit that never calls it advances when it ends.

:class:`SuiteClock` turns finished units and those reports into an ETA: each unit weighs its
experiment's estimated time (``minutes_quick``/``minutes_full`` over its units), and the
measured seconds per estimated second of the units trained so far scale what is left. Units
found already finished (an earlier run, another worker) count as done but not as speed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["SuiteClock", "format_duration", "report_progress", "reporting_to"]

_REPORT: ContextVar[Callable[[float], None] | None] = ContextVar(
    "normlab_lab_progress", default=None
)


def report_progress(done: float, total: float) -> None:
    """Report that the unit in training is ``done`` of ``total`` of the way (e.g. epochs).

    Does nothing outside ``normlab lab run`` (or :func:`reporting_to`); values outside
    ``[0, total]`` are clipped.

    Parameters
    ----------
    done : float
        Work finished in this unit, in any unit of count (epochs, evaluations, steps).
    total : float
        The unit's whole work in the same count; must be positive and finite.

    Raises
    ------
    ValueError
        ``total`` is not a positive finite number, or ``done`` is NaN.

    Examples
    --------
    >>> seen = []
    >>> with reporting_to(seen.append):
    ...     for epoch in range(4):
    ...         report_progress(epoch + 1, 4)
    >>> seen
    [0.25, 0.5, 0.75, 1.0]
    >>> report_progress(1, 4)  # outside a run: nothing happens
    """
    if not (math.isfinite(total) and total > 0):
        raise ValueError(f"report_progress: total must be positive and finite, got {total!r}")
    if math.isnan(done):
        raise ValueError("report_progress: done is NaN")
    callback = _REPORT.get()
    if callback is not None:
        callback(min(max(done / total, 0.0), 1.0))


@contextmanager
def reporting_to(callback: Callable[[float], None] | None) -> Iterator[None]:
    """Send the :func:`report_progress` calls made inside the block to ``callback(fraction)``.

    Parameters
    ----------
    callback : callable or None
        Called with the fraction of the unit done, in ``[0, 1]``; ``None`` ignores reports.
    """
    token = _REPORT.set(callback)
    try:
        yield
    finally:
        _REPORT.reset(token)


def format_duration(seconds: float) -> str:
    """``seconds`` as people read a remaining time: ``"42 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``.

    Examples
    --------
    >>> format_duration(4.4), format_duration(185), format_duration(3725)
    ('4 s', '3 min 05 s', '1 h 02 min')
    """
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class SuiteClock:
    """The ETA of a run of units with estimated costs, corrected by their measured times.

    Parameters
    ----------
    units : mapping of str to (int, float)
        Per experiment: its number of units and their total estimated seconds (a rough
        estimate is enough; only the ratios between experiments matter once a unit is done).
    now : callable, optional
        The clock (seconds); :func:`time.monotonic` by default.

    Examples
    --------
    >>> t = [0.0]
    >>> clock = SuiteClock({"a": (2, 20.0), "b": (1, 40.0)}, now=lambda: t[0])
    >>> clock.eta()  # nothing measured yet: the estimates
    60.0
    >>> clock.start("a"); t[0] = 20.0; clock.finish("a")  # twice as slow as estimated
    20.0
    >>> clock.eta(), clock.done, clock.total
    (100.0, 1, 3)
    >>> clock.start("a"); t[0] = 30.0; clock.advance("a", 0.5)  # half of the unit in 10 s
    >>> clock.eta()  # the rate is now (20 + 10) s / (10 + 5) estimated s: 2 per second
    90.0
    """

    def __init__(
        self,
        units: Mapping[str, tuple[int, float]],
        *,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._now = now
        self._weight = {name: (sec / n if n else 0.0) for name, (n, sec) in units.items()}
        self.total = sum(n for n, _ in units.values())
        self.done = 0
        self._left = sum(sec for _, sec in units.values())  # estimated seconds not yet done
        self._measured = 0.0  # seconds of the units trained here
        self._measured_weight = 0.0  # their estimated seconds
        self._current: str | None = None
        self._fraction = 0.0
        self._started = self._reported = 0.0

    def start(self, experiment: str) -> None:
        """A unit of ``experiment`` starts training here."""
        self._current, self._fraction = experiment, 0.0
        self._started = self._reported = self._now()

    def advance(self, experiment: str, fraction: float) -> None:
        """The unit in training is ``fraction`` done (from :func:`report_progress`)."""
        if experiment == self._current:
            self._fraction, self._reported = fraction, self._now()

    def finish(self, experiment: str) -> float | None:
        """A unit of ``experiment`` is finished; its seconds if it was trained here, else None."""
        self.done += 1
        weight = self._weight.get(experiment, 0.0)
        self._left = max(self._left - weight, 0.0)
        if experiment != self._current:
            return None
        seconds = self._now() - self._started
        self._measured += seconds
        self._measured_weight += weight
        self._current = None
        return seconds

    @property
    def current(self) -> str | None:
        """The experiment whose unit is in training here, if any."""
        return self._current

    @property
    def fraction(self) -> float:
        """How far the unit in training is (0 when none is)."""
        return self._fraction if self._current is not None else 0.0

    def eta(self) -> float:
        """Seconds until the last unit is finished (0 when all are)."""
        if self.done >= self.total:
            return 0.0
        weight = self._weight.get(self._current, 0.0) if self._current is not None else 0.0
        partial = weight * self._fraction
        seconds = self._measured + (self._reported - self._started if partial else 0.0)
        rate = (
            seconds / (self._measured_weight + partial) if self._measured_weight + partial else 1.0
        )
        others = rate * max(self._left - weight, 0.0)
        if self._current is None:
            return others
        # the unit in training counts down from its last report, but never below zero
        current = rate * weight * (1.0 - self._fraction) - (self._now() - self._reported)
        return others + max(current, 0.0)
