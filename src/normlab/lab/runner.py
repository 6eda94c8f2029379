"""Running experiments: each unit claimed, trained once and cached in the store; claims evaluated once
every unit is done. Any number of processes may run on the same results folder and share the work."""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import FILE_DATASETS, Dataset, load_dataset
from .ensemble import training_device
from .experiments import REGISTRY, Claim, ClaimResult, Experiment, Results
from .progress import reporting_to
from .store import (
    DamagedFileError,
    LabWarning,
    RunStore,
    StoreError,
    atomic_write_json,
    check_results_folder,
    provenance,
    read_json,
)

__all__ = [
    "QUICK_SUBSET",
    "copy_results",
    "load_claims",
    "load_results",
    "run_experiment",
    "run_suite",
]

# --quick on the large datasets trains on a fixed stratified 5k-sample training subset (the test set stays
# whole). The issue allows up to 10k; at 10k the suite needs ~30 min on 2 cores, over its 20-minute budget,
# while 5k keeps every setup's epochs unchanged (no experiment has a separate, shorter fashion schedule).
QUICK_SUBSET = 5_000


def _dataset_for(name: str, *, quick: bool, data_dir: Path | None) -> Dataset:
    subset = QUICK_SUBSET if quick and name in FILE_DATASETS else None
    return load_dataset(name, data_dir=data_dir, subset=subset)


@dataclass
class _Plan:
    """One experiment's units and what is known of them."""

    exp: Experiment
    store: RunStore
    configs: list[dict[str, Any]]
    stale: dict[str, str | None]  # under force: each unit's result id at the start (rerun those)
    done: dict[str, dict[str, Any]] = field(default_factory=dict)  # finished units' records

    def key(self, cfg: dict[str, Any]) -> str:
        return self.store.unit_dir(cfg).name


def run_suite(
    experiments: Sequence[str | Experiment],
    dataset: str = "digits",
    *,
    seeds: list[int],
    quick: bool,
    out: Path,
    data_dir: Path | None = None,
    force: bool = False,
    progress: bool = False,
    data: Dataset | None = None,
    on_unit: Callable[[str, dict[str, Any]], None] | None = None,
    on_wait: Callable[[str, dict[str, Any], str], None] | None = None,
    on_start: Callable[[str, dict[str, Any]], None] | None = None,
    on_progress: Callable[[str, dict[str, Any], float], None] | None = None,
    device: str = "cpu",
) -> Iterator[tuple[Experiment, list[ClaimResult]]]:
    """Run (or resume) every unit of ``experiments`` on ``dataset``; yield each experiment's claims
    (also written to its ``claims.json``) as soon as all its units are finished.

    Each unit is trained only while this process holds its claim (see :class:`RunStore`), so any
    number of processes can run the same suite on the same ``out`` and share the work: a first
    pass trains every unit no other process holds, a second waits for the units others hold and
    trains those whose owner died. A unit with a damaged ``result.json`` is trained again (a
    :class:`~normlab.lab.store.LabWarning` names the file).

    Parameters
    ----------
    experiments : sequence of str or Experiment
        Registered names or experiment objects.
    dataset, data_dir, quick, seeds :
        What to run on (:func:`~normlab.lab.data.load_dataset`), loaded only if a unit needs it.
    out : Path
        The results folder.
    force : bool
        Train again units that had results when this call started (units other processes
        finish meanwhile are not trained twice).
    data : Dataset, optional
        Use this dataset instead of loading ``dataset``.
    on_unit : callable, optional
        ``on_unit(experiment, config)`` once per unit, when it is finished (trained here, or
        found finished: by an earlier run or another process).
    on_wait : callable, optional
        ``on_wait(experiment, config, owner)`` before waiting for a unit another process trains.
    on_start : callable, optional
        ``on_start(experiment, config)`` when this process starts training a unit.
    on_progress : callable, optional
        ``on_progress(experiment, config, fraction)`` whenever the unit in training calls
        :func:`normlab.lab.progress.report_progress` (the ensemble's training loop does, about 50
        times per unit; an experiment that trains otherwise and never calls it advances only
        through ``on_unit``).
    device : str
        Where the batched ensembles train (:func:`normlab.lab.ensemble.training_device`); the data,
        and whatever an experiment measures outside the ensemble's training, stay on the CPU.

    Yields
    ------
    (Experiment, list[ClaimResult])

    Raises
    ------
    StoreError
        ``out`` is not a folder, or a unit must be trained and ``out`` cannot be written.
    DatasetError
        A unit must be trained and the dataset is missing or damaged.
    """

    def get_data() -> Dataset:
        nonlocal data
        if data is None:
            data = _dataset_for(dataset, quick=quick, data_dir=data_dir)
        return data

    plans = []
    for item in experiments:
        exp = REGISTRY[item] if isinstance(item, str) else item
        store = RunStore(out, exp.name, dataset)
        configs = exp.configs(quick=quick, seeds=seeds, dataset=dataset)
        stale: dict[str, str | None] = {}
        if force:
            with warnings.catch_warnings():  # damaged results are rerun under force anyway
                warnings.simplefilter("ignore", LabWarning)
                for cfg in configs:
                    rec = store.load(cfg)
                    stale[store.unit_dir(cfg).name] = rec.get("id") if rec else None
        plans.append(_Plan(exp, store, configs, stale))

    def finished(plan: _Plan, cfg: dict[str, Any]) -> bool:
        key = plan.key(cfg)
        if key not in plan.done:
            rec = plan.store.load(cfg)
            if rec is None or (force and rec.get("id") == plan.stale[key]):
                return False
            plan.done[key] = rec
            if on_unit is not None:
                on_unit(plan.exp.name, cfg)
        return True

    def attempt(plan: _Plan, cfg: dict[str, Any], *, wait: bool) -> None:
        with plan.store.claim(cfg, wait=wait) as held:
            if held and not finished(plan, cfg):  # another process may have finished it meanwhile
                ds = get_data()
                plan.store.begin(cfg)
                if on_start is not None:
                    on_start(plan.exp.name, cfg)
                report = (
                    None
                    if on_progress is None
                    else lambda fraction: on_progress(plan.exp.name, cfg, fraction)
                )
                start = time.perf_counter()
                with reporting_to(report), training_device(device):
                    metrics = plan.exp.run(cfg, ds, progress=progress)
                seconds = time.perf_counter() - start
                plan.store.finish(cfg, metrics, provenance(ds.checksum), seconds)
                finished(plan, cfg)

    def evaluate(plan: _Plan) -> list[ClaimResult]:
        results: Results = [(cfg, plan.done[plan.key(cfg)]["metrics"]) for cfg in plan.configs]
        claims = plan.exp.evaluate(results, dataset=dataset)
        plan.store.write_claims(
            {
                "experiment": plan.exp.name,
                "dataset": dataset,
                "quick": quick,
                "seeds": seeds,
                "units": [plan.key(cfg) for cfg in plan.configs],
                "claims": [c.as_dict() for c in claims],
            }
        )
        return claims

    waiting = []
    for plan in plans:  # pass 1: train what no other process holds
        for cfg in plan.configs:
            if not finished(plan, cfg):
                attempt(plan, cfg, wait=False)
        if all(finished(plan, cfg) for cfg in plan.configs):
            yield plan.exp, evaluate(plan)
        else:
            waiting.append(plan)
    for plan in waiting:  # pass 2: wait for the others' units; take over a dead owner's
        for cfg in plan.configs:
            while not finished(plan, cfg):
                attempt(plan, cfg, wait=False)
                if not finished(plan, cfg):
                    if on_wait is not None:
                        on_wait(plan.exp.name, cfg, plan.store.owner(cfg))
                    attempt(plan, cfg, wait=True)
        yield plan.exp, evaluate(plan)


def run_experiment(
    experiment: str | Experiment, dataset: str = "digits", **kwargs: Any
) -> list[ClaimResult]:
    """Run (or resume) every unit of one experiment and write its ``claims.json``; see :func:`run_suite`."""
    for _, claims in run_suite([experiment], dataset, **kwargs):
        return claims
    raise AssertionError("run_suite yields once per experiment")


# --- reading results back (report, check) ------------------------------------------------

_CLAIMS_KEYS = {"experiment": str, "dataset": str, "seeds": list, "units": list, "claims": list}


def _check_claims(out: Path, path: Path) -> dict[str, Any]:
    """The record in ``path`` (a ``claims.json``) if it, and every unit result it was computed
    from, is whole; :class:`DamagedFileError` naming the first problem otherwise."""
    rec = read_json(path)
    if not isinstance(rec, dict):
        raise DamagedFileError(f"{path}: not a claims file (a JSON {type(rec).__name__})")
    for key, kind in _CLAIMS_KEYS.items():
        if not isinstance(rec.get(key), kind):
            raise DamagedFileError(f"{path}: not a claims file (no {key!r} {kind.__name__})")
    where = (path.parent.parent.name, path.parent.name)
    if (rec["experiment"], rec["dataset"]) != where:
        raise DamagedFileError(
            f"{path}: its claims are for {rec['experiment']}/{rec['dataset']} but it lies in "
            f"{where[0]}/{where[1]}: not a results folder of normlab's"
        )
    result_keys = {f.name for f in dataclasses.fields(ClaimResult)}
    # ``model`` came later: a claim without it was measured on an MLP (check_rows says so)
    claim_keys = {f.name for f in dataclasses.fields(Claim)} - {"model"}
    for c in rec["claims"]:
        if not (
            isinstance(c, dict)
            and result_keys <= c.keys()
            and isinstance(c["claim"], dict)
            and claim_keys <= c["claim"].keys()
        ):
            raise DamagedFileError(
                f"{path}: a claim lacks some of {sorted(result_keys)} (damaged, or written by "
                "another version of normlab)"
            )
    store = RunStore(out, rec["experiment"], rec["dataset"])
    for unit in rec["units"]:
        try:
            store.read(str(unit))
        except FileNotFoundError:
            raise DamagedFileError(
                f"{path}: its unit {unit} has no result.json (deleted after the claims were written)"
            ) from None
        except DamagedFileError as exc:
            raise DamagedFileError(f"{path}: its unit {unit} is damaged: {exc}") from exc
    return rec


def load_claims(
    out: Path, *, experiments: Collection[str] | None = None, dataset: str | None = None
) -> list[dict[str, Any]]:
    """Every checked ``claims.json`` under ``out`` (registry order, then dataset).

    A ``claims.json`` is returned only when it is whole, lies in its own experiment's folder and
    every unit result it was computed from is whole; any other is skipped with a
    :class:`~normlab.lab.store.LabWarning` that names the file and the problem.

    Parameters
    ----------
    out : Path
        The results folder.
    experiments, dataset : optional
        Only these experiments / this dataset.

    Raises
    ------
    StoreError
        ``out`` is not a folder.
    """
    out = check_results_folder(out)
    order = {name: i for i, name in enumerate(REGISTRY)}
    found = []
    for path in sorted(out.glob("*/*/claims.json")):
        if experiments is not None and path.parent.parent.name not in experiments:
            continue
        if dataset is not None and path.parent.name != dataset:
            continue
        try:
            found.append(_check_claims(out, path))
        except DamagedFileError as exc:
            name, ds = path.parent.parent.name, path.parent.name
            redo = (
                f"; `normlab lab run {name} --dataset {ds} --out {out}` redoes it"
                if name in REGISTRY
                else ""
            )
            warnings.warn(LabWarning(f"skipped {exc}{redo}"), stacklevel=2)
    return sorted(found, key=lambda c: (order.get(c["experiment"], len(order)), c["dataset"]))


def load_results(out: Path, claims_record: dict[str, Any]) -> Results:
    """The units a ``claims.json`` record was evaluated on, as ``(config, metrics)``.

    Raises
    ------
    StoreError
        A unit's result went missing or was damaged after :func:`load_claims` checked it.
    """
    store = RunStore(out, claims_record["experiment"], claims_record["dataset"])
    results: Results = []
    for unit in claims_record["units"]:
        try:
            record = store.read(unit)
        except (FileNotFoundError, DamagedFileError) as exc:
            raise StoreError(f"{store.dir / unit}: changed while being read ({exc})") from exc
        results.append((record["config"], record["metrics"]))
    return results


def copy_results(out: Path, dest: Path) -> list[dict[str, Any]]:
    """Copy every checked ``claims.json`` under ``out``, with its units' results, to ``dest``
    (e.g. to write a report beside them when ``out`` is read-only); returns the records copied.

    Raises
    ------
    StoreError
        ``out`` or ``dest`` is not a folder, or ``dest`` cannot be written.
    """
    records = load_claims(out)
    check_results_folder(dest)
    try:
        for rec in records:
            src = RunStore(out, rec["experiment"], rec["dataset"])
            dst = RunStore(dest, rec["experiment"], rec["dataset"])
            for unit in rec["units"]:
                atomic_write_json(dst.dir / unit / "result.json", src.read(unit))
            dst.write_claims(rec)
    except OSError as exc:
        raise StoreError(f"cannot copy the results to {dest}: {exc.strerror or exc}") from exc
    return records
