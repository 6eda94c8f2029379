"""The lab's experiments: each tests published claims on real data and says pass or fail.

How to add an experiment
------------------------
1. Write ``normlab/lab/experiments/<name>.py`` with a subclass of :class:`Experiment`:

   * ``configs(quick=, seeds=, dataset=)`` → the units of work, each a JSON-able dict
     (e.g. ``{"norm": "bn", "seeds": [0, 1, 2]}``); the runner caches each unit.
   * ``run(config, data, progress=)`` → JSON-able metrics for one unit (use
     :func:`normlab.lab.ensemble.train_ensemble` to train seeds/sweeps at once).
   * ``evaluate(results, dataset=)`` → :class:`ClaimResult` list (use :meth:`Claim.check`).
   * ``plot(results, out_dir)`` → PNG paths (matplotlib, Agg; titles, labelled axes, legends).
   * ``table(results)`` → a markdown table of mean ± std.
   * class attributes ``name``, ``paper``, ``summary``, ``setup``, ``paper_numbers``,
     ``minutes_quick``, ``minutes_full`` and the declared ``claims``.
2. Decorate the class with :func:`register` and import the module at the bottom of this file.

Thresholds are written for digits; :func:`accuracy_level` lowers absolute accuracy
levels by 0.10 on fashion-mnist (differences and upper bounds stay as they are).
"""

from __future__ import annotations

import importlib
import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

__all__ = [
    "EXPERIMENTS",
    "REGISTRY",
    "Claim",
    "ClaimResult",
    "Experiment",
    "Results",
    "accuracy_level",
    "as_floats",
    "mean_std",
    "register",
]

Results = list[tuple[dict[str, Any], dict[str, Any]]]  # (config, metrics) per unit

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda a, b: a <= b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
}


def accuracy_level(level: float, dataset: str) -> float:
    """An absolute accuracy threshold written for digits, adjusted for ``dataset`` (−0.10 on fashion-mnist)."""
    return level - 0.10 if dataset == "fashion-mnist" else level


def as_floats(values: Sequence[float | None]) -> list[float]:
    """``values`` as floats; ``None`` (a diverged run, stored as JSON null) becomes NaN."""
    return [float("nan") if v is None else float(v) for v in values]


def mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaNs (and ``None``) propagate."""
    vals = as_floats(values)
    if not vals:
        return float("nan"), float("nan")
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 and all(map(math.isfinite, vals)) else 0.0
    return mean, std


_LEVEL = re.compile(r"\{(pct|level):(\d*\.\d+)\}")


@dataclass(frozen=True)
class Claim:
    """A published claim as a measurable comparison: ``measured <comparison> threshold``.

    ``statement`` and ``quantity`` may name absolute accuracy levels as ``{pct:0.90}`` (shown
    as "90%") or ``{level:0.80}`` (shown as "0.80"); :meth:`for_dataset` renders them at the
    dataset's level (:func:`accuracy_level`), so a Fashion-MNIST claim reads "80%".
    """

    name: str
    statement: str
    paper: str
    quantity: str
    comparison: str
    threshold: float

    def __post_init__(self) -> None:
        if self.comparison not in _OPS:
            raise ValueError(f"comparison must be one of {sorted(_OPS)}, got {self.comparison!r}")

    def for_dataset(self, dataset: str) -> Claim:
        """This claim with its accuracy levels rendered for ``dataset``."""

        def render(m: re.Match[str]) -> str:
            level = accuracy_level(float(m.group(2)), dataset)
            return f"{level:.0%}" if m.group(1) == "pct" else f"{level:.2f}"

        return replace(
            self,
            statement=_LEVEL.sub(render, self.statement),
            quantity=_LEVEL.sub(render, self.quantity),
        )

    def check(
        self, values: Sequence[float | None] | float, *, threshold: float | None = None
    ) -> ClaimResult:
        """Evaluate on the per-seed values (their mean is compared; NaN or ``None`` fails)."""
        vals = [float(values)] if isinstance(values, int | float) else as_floats(values)
        mean, std = mean_std(vals)
        limit = self.threshold if threshold is None else threshold
        passed = math.isfinite(mean) and _OPS[self.comparison](mean, limit)
        return ClaimResult(self, vals, mean, std, limit, bool(passed))


@dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    values: list[float]
    mean: float
    std: float
    threshold: float
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["claim"] = asdict(self.claim)
        return d


class Experiment:
    """Base class; see the module docstring for what a subclass provides."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    setup: ClassVar[str] = ""
    paper_numbers: ClassVar[str] = ""
    minutes_quick: ClassVar[float] = 0.5
    minutes_full: ClassVar[float] = 2.0
    claims: ClassVar[tuple[Claim, ...]] = ()

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    def run(self, config: dict[str, Any], data: Any, *, progress: bool = False) -> dict[str, Any]:
        raise NotImplementedError

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        raise NotImplementedError

    def plot(self, results: Results, out_dir: Path) -> list[Path]:
        return []

    def table(self, results: Results) -> str:
        return ""

    def claim(self, name: str, dataset: str = "digits") -> Claim:
        """The declared claim ``name``, its accuracy levels rendered for ``dataset``."""
        for c in self.claims:
            if c.name == name:
                return c.for_dataset(dataset)
        raise KeyError(f"{self.name} declares no claim {name!r}")


REGISTRY: dict[str, Experiment] = {}
_E = TypeVar("_E", bound=type[Experiment])


def register(cls: _E) -> _E:
    """Class decorator: add one instance of the experiment to :data:`REGISTRY` (in import order)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    REGISTRY[cls.name] = cls()
    return cls


# --- the experiments, in listing order (the order of the mission's claims) -------------
EXPERIMENTS = (
    "convergence",
    "learning_rate",
    "init_sensitivity",
    "xavier_vs_he",
    "signal_propagation",
    "small_batch",
    "noisy_bn",
    "landscape",
    "gradients_at_init",
    "input_normalization",
    "bn_placement",
    "precise_bn",
)
for _name in EXPERIMENTS:
    importlib.import_module(f"{__name__}.{_name}")
