"""The results store: every write atomic, every read checked, every unit claimed before it is trained.

Layout::

    <out>/<experiment>/<dataset>/<config-hash>/config.json    the unit's configuration
                                              /metrics.jsonl  progress lines (append-only)
                                              /claim.lock     the unit's claim (an OS file lock)
                                              /result.json    the unit's metrics + provenance (written last)
    <out>/<experiment>/<dataset>/claims.json                  claims, once every unit finished

A unit counts as finished only when its ``result.json`` is whole and belongs to
it. Files are written to a temporary file, fsynced and renamed, so a run killed
at any instant (even ``SIGKILL``) leaves either the whole file or none, and
rerunning the same command completes the missing units. Every file read may be
damaged all the same (a full disk, a copy gone wrong, an edit): a damaged
``result.json`` counts as unfinished, with a :class:`LabWarning` naming it, and
is trained again. The config hash covers the configuration *and the normlab
version*, so results of other code are never reused.

Several processes may share one results folder (on one machine, or on the nodes
of a cluster over a shared filesystem): a process trains a unit only while it
holds the unit's claim, a ``filelock`` lock on ``claim.lock``. The operating
system releases the lock when its process dies, however it dies, so another
process takes a dead owner's unit over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from .. import __version__

__all__ = [
    "DamagedFileError",
    "LabWarning",
    "RunStore",
    "StoreError",
    "atomic_write_json",
    "check_results_folder",
    "config_hash",
    "provenance",
    "read_json",
    "read_jsonl",
]


class StoreError(RuntimeError):
    """The results folder cannot be used (a file, not writable, changed while read); the message says why."""


class DamagedFileError(ValueError):
    """A file in the results folder is unreadable or not what its name promises; the message names it."""


class LabWarning(UserWarning):
    """A damaged or foreign file in the results folder was skipped (or its unit will be trained again)."""


def _jsonable(value: Any) -> Any:
    """NaN/Inf become ``null`` (strict JSON); tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _normalized(value: Any) -> Any:
    """``value`` as it reads back from the store's JSON."""
    return json.loads(json.dumps(_jsonable(value), allow_nan=False))


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an OS error while writing under ``path`` into a :class:`StoreError` that names it."""
    try:
        yield
    except OSError as exc:
        raise StoreError(
            f"cannot write to the results folder {path}: {exc.strerror or exc}"
        ) from exc


def _file_mode() -> int:
    """The mode ``open`` gives a new file: 0666 less the process's umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` via a temporary file + fsync + rename (+ fsync of the folder).

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "a.json"
    >>> atomic_write_json(path, {"x": float("nan")})
    >>> read_json(path)
    {'x': None}
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # mkstemp's 0600 would hide results from a shared group
            os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_jsonable(data), f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename durable; not every filesystem allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_json(path: Path) -> Any:
    """The JSON value in ``path``.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    DamagedFileError
        It cannot be read, is not UTF-8 or is not JSON; the message names the file and the problem.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise DamagedFileError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DamagedFileError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise DamagedFileError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read JSON lines, ignoring a torn (incomplete) last line left by a killed writer."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # the writer died mid-line
            raise
    return records


def config_hash(
    experiment: str, dataset: str, config: dict[str, Any], *, version: str | None = None
) -> str:
    """Hash of what determines a unit's result: experiment, dataset, config and the normlab
    ``version`` (default: this one)."""
    blob = json.dumps(
        _jsonable(
            {
                "experiment": experiment,
                "dataset": dataset,
                "config": config,
                "normlab": version or __version__,
            }
        ),
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
    """What produced a result: versions, commit, threads, machine, process, data checksum."""
    return {
        "normlab": __version__,
        "torch": torch.__version__,
        "git_commit": _git_commit(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "dataset_checksum": dataset_checksum,
    }


def check_results_folder(out: Path) -> Path:
    """``out`` as a results folder: it may not exist yet, but it may not be a file.

    Raises
    ------
    StoreError
        ``out`` (or a folder above it) is a file.
    """
    out = Path(out)
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise StoreError(f"the results folder {out} is not a folder: {p} is a file")
        if p.exists():
            break
    return out


class RunStore:
    """Results of one experiment on one dataset under ``root``."""

    def __init__(self, root: Path, experiment: str, dataset: str) -> None:
        self.dir = check_results_folder(Path(root)) / experiment / dataset
        self.experiment, self.dataset = experiment, dataset

    def unit_dir(self, config: dict[str, Any]) -> Path:
        return self.dir / config_hash(self.experiment, self.dataset, config)

    @property
    def claims_path(self) -> Path:
        return self.dir / "claims.json"

    # --- reading -------------------------------------------------------------------

    def read(self, unit: str) -> dict[str, Any]:
        """The record in ``<unit>/result.json``, checked: ``config``, ``metrics`` and ``provenance``
        objects, and a config (with the version that wrote it) that hashes to ``unit``.

        Raises
        ------
        FileNotFoundError
            The unit has no result (it is unfinished).
        DamagedFileError
            The result is damaged or belongs to another unit.
        """
        path = self.dir / unit / "result.json"
        record = read_json(path)
        if not isinstance(record, dict):
            raise DamagedFileError(f"{path}: not a result (a JSON {type(record).__name__})")
        for key in ("config", "metrics", "provenance"):
            if not isinstance(record.get(key), dict):
                raise DamagedFileError(f"{path}: not a result (no {key!r} object)")
        version = record["provenance"].get("normlab")
        if not isinstance(version, str) or unit != config_hash(
            self.experiment, self.dataset, record["config"], version=version
        ):
            raise DamagedFileError(
                f"{path}: its config and version do not hash to {unit}: it belongs to another unit"
            )
        return record

    def load(self, config: dict[str, Any]) -> dict[str, Any] | None:
        """The finished unit's record (``metrics``, ``provenance``, ``seconds``, ``id``), or ``None``.

        A damaged ``result.json`` counts as unfinished: a :class:`LabWarning` names it.
        """
        unit = self.unit_dir(config).name
        try:
            record = self.read(unit)
        except FileNotFoundError:
            return None
        except DamagedFileError as exc:
            warnings.warn(
                LabWarning(f"{exc}; the unit counts as unfinished and is trained again"),
                stacklevel=2,
            )
            return None
        if record["config"] != _normalized(config):  # a hash collision: never in practice
            return None
        return record

    def owner(self, config: dict[str, Any]) -> str:
        """Who last started the unit (``host pid N``), from its ``metrics.jsonl``."""
        with contextlib.suppress(OSError, ValueError):
            starts = [r for r in read_jsonl(self.unit_dir(config) / "metrics.jsonl") if "pid" in r]
            if starts:
                return f"{starts[-1].get('host', '?')} pid {starts[-1]['pid']}"
        return "another process"

    # --- claiming and writing ---------------------------------------------------------

    @contextlib.contextmanager
    def claim(self, config: dict[str, Any], *, wait: bool) -> Iterator[bool]:
        """Hold the unit's claim for the ``with`` block; yields whether it was obtained.

        ``wait=False`` gives up at once when another process holds it; ``wait=True`` waits until
        that process releases it (it finished the unit, or died: the OS drops a dead process's
        locks). The claim is an OS file lock (``filelock.FileLock``) on ``<unit>/claim.lock``.

        Raises
        ------
        StoreError
            The results folder cannot be written.
        """
        d = self.unit_dir(config)
        with _writing(d):
            d.mkdir(parents=True, exist_ok=True)
            lock = FileLock(d / "claim.lock")
            try:
                lock.acquire(timeout=-1 if wait else 0, poll_interval=0.2)
                held = True
            except Timeout:
                held = False
            except NotImplementedError as exc:  # older filelock where flock is unsupported
                raise StoreError(
                    f"the filesystem of {d} does not support file locks ({exc}); see "
                    "docs/lab-workers.md"
                ) from exc
        try:
            yield held
        finally:
            if held:
                lock.release()

    def begin(self, config: dict[str, Any]) -> None:
        """Record that this process starts the unit (call it while holding the claim)."""
        d = self.unit_dir(config)
        with _writing(d):
            for stale in d.glob(".*.tmp"):  # left by a writer killed mid-write
                stale.unlink(missing_ok=True)
            atomic_write_json(
                d / "config.json",
                {"experiment": self.experiment, "dataset": self.dataset, "config": config},
            )
        self.log(config, {"event": "start", "host": socket.gethostname(), "pid": os.getpid()})

    def log(self, config: dict[str, Any], record: dict[str, Any]) -> None:
        """Append one progress line to the unit's ``metrics.jsonl``."""
        path = self.unit_dir(config) / "metrics.jsonl"
        with _writing(path.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(_jsonable(record), allow_nan=False) + "\n")
                f.flush()

    def finish(
        self, config: dict[str, Any], metrics: dict[str, Any], prov: dict[str, Any], seconds: float
    ) -> None:
        """Write the unit's ``result.json`` (atomically; a fresh ``id`` tells this write from others)."""
        self.log(config, {"event": "finish", "seconds": seconds})
        d = self.unit_dir(config)
        with _writing(d):
            atomic_write_json(
                d / "result.json",
                {
                    "config": config,
                    "metrics": metrics,
                    "provenance": prov,
                    "seconds": seconds,
                    "id": uuid.uuid4().hex,
                },
            )

    def write_claims(self, record: dict[str, Any]) -> None:
        """Write ``claims.json`` unless it already holds ``record`` (so a read-only folder whose
        units are all finished can be run again)."""
        with contextlib.suppress(FileNotFoundError, DamagedFileError):
            if read_json(self.claims_path) == _normalized(record):
                return
        with _writing(self.dir):
            atomic_write_json(self.claims_path, record)
