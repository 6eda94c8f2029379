"""The lab's experiments: each tests published claims on real data and gives verdicts with intervals.

How to add an experiment
------------------------
1. Write ``normlab/lab/experiments/<name>.py`` with a subclass of :class:`Experiment`:

   * ``configs(quick=, seeds=, dataset=)`` → the units of work, each a JSON-able dict
     (e.g. ``{"norm": "bn", "seeds": [0, 1, 2, 3, 4]}``); the runner caches each unit.
   * ``run(config, data, progress=)`` → JSON-able metrics for one unit (use
     :func:`normlab.lab.ensemble.train_ensemble` to train seeds and sweeps at once).
   * ``evaluate(results, dataset=)`` → :class:`ClaimResult` list, one per declared claim, in
     order (:meth:`Claim.check` for per-seed values, :meth:`Claim.check_rate` for rates,
     :meth:`Claim.check_bootstrap` for statistics of the whole set of seeds).
   * ``plot(results, out_dir)`` → PNG paths (:mod:`normlab.lab.plots`: per-seed dots, shared axes).
   * ``table(results)`` → a markdown table (:func:`._common.fmt` for mean ± sd over seeds).
   * class attributes ``name``, ``paper``, ``summary``, ``setup`` (what was taken from the paper
     and what was changed, and why), ``paper_numbers``, ``minutes_quick``, ``minutes_full``
     and the declared ``claims`` (each with the paper's own value beside our threshold).
2. Decorate the class with :func:`register` and add its name to :data:`EXPERIMENTS`.

An experiment that also runs on the ConvNet (:func:`normlab.lab.models.convnet`) adds units with
``"model": "cnn"`` in their config (:func:`._common.model_units`: only on datasets of images; a unit
without the key is an MLP's) and declares the ConvNet's claims with :meth:`Claim.for_model`
(named ``<name>_cnn``); ``evaluate`` splits the results with :func:`._common.by_model` and gives
each model's claims from its own units, in the declared order.

Thresholds on absolute accuracy are written for digits; :func:`accuracy_level` lowers them by
0.10 on fashion-mnist (differences and ratios stay as they are).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ._claims import (
    LEVEL,
    OPS,
    Claim,
    ClaimResult,
    accuracy_level,
    as_floats,
    t_interval,
    verdict,
)

__all__ = [
    "EXPERIMENTS",
    "FULL_SEEDS",
    "LEVEL",
    "OPS",
    "QUICK_SEEDS",
    "REGISTRY",
    "Claim",
    "ClaimResult",
    "Experiment",
    "Results",
    "accuracy_level",
    "as_floats",
    "register",
    "t_interval",
    "verdict",
]

Results = list[tuple[dict[str, Any], dict[str, Any]]]  # (config, metrics) per unit

#: Seeds per run unless ``--seeds`` says otherwise: enough for a 95 % interval to mean something.
QUICK_SEEDS, FULL_SEEDS = 5, 10


class Experiment:
    """Base class; see the module docstring for what a subclass provides."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    setup: ClassVar[str] = ""
    paper_numbers: ClassVar[str] = ""
    minutes_quick: ClassVar[float] = 0.5  # measured on digits: 2 shared cores, one thread
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

    def claim(self, name: str, dataset: str = "digits", model: str = "mlp") -> Claim:
        """The declared claim ``name`` (on ``model``: ``"cnn"`` looks up ``<name>_cnn``), its
        accuracy levels rendered for ``dataset``."""
        full = name if model == "mlp" else f"{name}_{model}"
        for c in self.claims:
            if c.name == full:
                return c.for_dataset(dataset)
        raise KeyError(f"{self.name} declares no claim {full!r}")


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
    "lr_init_map",
    "xavier_vs_he",
    "activations",
    "signal_propagation",
    "small_batch",
    "noisy_bn",
    "covariate_shift",
    "landscape",
    "gradients_at_init",
    "rank_collapse",
    "input_normalization",
    "bn_placement",
    "precise_bn",
)
for _name in EXPERIMENTS:
    importlib.import_module(f"{__name__}.{_name}")
