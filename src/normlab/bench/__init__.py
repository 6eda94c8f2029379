"""``normlab bench``: speed of normlab against torch, as same-run ratios (never timed in tests).

Suites register here; each is a function ``BenchOptions -> list[Case]``.
``allocator`` is special: it runs its two settings in child processes and returns
results directly (:func:`allocator_results`).
"""

from collections.abc import Callable

from ._alloc import allocator_results
from ._bn import act_cases, bn_cases, make_input, module_cases, variant_cases
from ._core import (
    BenchOptions,
    Case,
    Result,
    Traffic,
    floor_op,
    geomean_ratios,
    machine_info,
    run_cases,
    time_many,
    time_pair,
)
from ._fold import fold_cases, fold_speedup
from ._lab import lab_cases
from ._model import model_cases
from ._plot import plot_ratios
from ._standardizer import standardizer_cases, standardizer_results


def _models(options: BenchOptions) -> list[Case]:
    """Eager always; under ``torch.compile`` too in the full run (compiling takes a minute)."""
    return model_cases(options) + ([] if options.quick else model_cases(options, compiled=True))


SUITES: dict[str, Callable[[BenchOptions], list[Case]]] = {
    "batchnorm": bn_cases,
    "act": act_cases,
    "variants": variant_cases,
    "model": _models,
    "fold": fold_cases,
    "lab": lab_cases,
}
RESULT_SUITES: dict[str, Callable[[BenchOptions], list[Result]]] = {
    "allocator": allocator_results,
    "standardizer": standardizer_results,  # its busy-core rows run beside a spinning child
}

__all__ = [
    "RESULT_SUITES",
    "SUITES",
    "BenchOptions",
    "Case",
    "Result",
    "Traffic",
    "allocator_results",
    "floor_op",
    "fold_speedup",
    "geomean_ratios",
    "machine_info",
    "make_input",
    "module_cases",
    "plot_ratios",
    "run_cases",
    "standardizer_cases",
    "standardizer_results",
    "time_many",
    "time_pair",
]
