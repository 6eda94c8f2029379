"""The results store: every write atomic, every result traceable to the code and data that made it.

Layout::

    <out>/<experiment>/<dataset>/<config-hash>/config.json    the unit's configuration
                                              /metrics.jsonl  progress lines (append-only)
                                              /result.json    the unit's metrics + provenance (written last)
    <out>/<experiment>/<dataset>/claims.json                  claims, once every unit finished

A unit counts as finished only when ``result.json`` exists; it is written to a
temporary file and renamed, so a run killed at any instant (even ``SIGKILL``)
leaves either the whole file or none, and rerunning the same command completes
the missing units. The config hash covers the configuration *and the normlab
version*, so results of other code are never reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from .. import __version__

__all__ = ["RunStore", "atomic_write_json", "config_hash", "provenance", "read_jsonl"]


def _jsonable(value: Any) -> Any:
    """NaN/Inf become ``null`` (strict JSON); tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` via a temporary file + fsync + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(data), f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read JSON lines, ignoring a torn (incomplete) last line left by a killed writer."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # the writer died mid-line
            raise
    return records


def config_hash(experiment: str, dataset: str, config: dict[str, Any]) -> str:
    """Hash of what determines a unit's result: experiment, dataset, config and normlab's version."""
    blob = json.dumps(
        {"experiment": experiment, "dataset": dataset, "config": config, "normlab": __version__},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(dataset_checksum: str) -> dict[str, Any]:
    """What produced a result: versions, commit, threads, machine, data checksum."""
    return {
        "normlab": __version__,
        "torch": torch.__version__,
        "git_commit": _git_commit(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "dataset_checksum": dataset_checksum,
    }


class RunStore:
    """Results of one experiment on one dataset under ``root``."""

    def __init__(self, root: Path, experiment: str, dataset: str) -> None:
        self.dir = Path(root) / experiment / dataset
        self.experiment, self.dataset = experiment, dataset

    def unit_dir(self, config: dict[str, Any]) -> Path:
        return self.dir / config_hash(self.experiment, self.dataset, config)

    def load(self, config: dict[str, Any]) -> dict[str, Any] | None:
        """The finished unit's record (``metrics``, ``provenance``, ``seconds``), or ``None``."""
        path = self.unit_dir(config) / "result.json"
        if not path.exists():
            return None
        try:
            record: dict[str, Any] = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None  # never happens with atomic writes; treat as unfinished to be safe
        return record

    def begin(self, config: dict[str, Any]) -> None:
        d = self.unit_dir(config)
        atomic_write_json(
            d / "config.json",
            {"experiment": self.experiment, "dataset": self.dataset, "config": config},
        )
        self.log(config, {"event": "start"})

    def log(self, config: dict[str, Any], record: dict[str, Any]) -> None:
        """Append one progress line to the unit's ``metrics.jsonl``."""
        path = self.unit_dir(config) / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(_jsonable(record), allow_nan=False) + "\n")
            f.flush()

    def finish(
        self, config: dict[str, Any], metrics: dict[str, Any], prov: dict[str, Any], seconds: float
    ) -> None:
        self.log(config, {"event": "finish", "seconds": seconds})
        atomic_write_json(
            self.unit_dir(config) / "result.json",
            {"config": config, "metrics": metrics, "provenance": prov, "seconds": seconds},
        )

    def results(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """All finished units as ``(config, metrics)``, in directory order."""
        out = []
        for path in sorted(self.dir.glob("*/result.json")):
            try:
                record = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue
            out.append((record["config"], record["metrics"]))
        return out

    @property
    def claims_path(self) -> Path:
        return self.dir / "claims.json"
