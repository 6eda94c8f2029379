"""``normlab bench``: speed of normlab against torch, as same-run ratios (never timed in tests).

Suites register here; each is a function ``BenchOptions -> list[Case]``.
"""

from collections.abc import Callable

from ._bn import bn_cases, make_input, module_cases
from ._core import BenchOptions, Case, Result, run_cases, time_pair
from ._fold import fold_cases, fold_speedup

SUITES: dict[str, Callable[[BenchOptions], list[Case]]] = {
    "batchnorm": bn_cases,
    "fold": fold_cases,
}

__all__ = [
    "SUITES",
    "BenchOptions",
    "Case",
    "Result",
    "fold_speedup",
    "make_input",
    "module_cases",
    "run_cases",
    "time_pair",
]
