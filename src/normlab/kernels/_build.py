"""Build, publish and load the fused C++ kernels: never a hang, never someone else's code.

The source ``batch_norm_cpu.cpp`` is compiled once per (source, flags, torch version,
CPU instruction set) into a per-user cache — ``$NORMLAB_KERNEL_CACHE`` or
``~/.cache/normlab/kernels`` — and imported as a Python extension module: its ops register
in ``torch.ops.normlab_fused`` and a few hot entry points are plain Python functions (a
``torch.ops`` call costs ~15 µs of boxing, a pybind call ~1 µs).

Three rules make the cache safe to share between processes that may be killed at any moment:

* **No lock to wait on.** A build runs in a private temporary folder
  (``.build-<key>-XXXX``) and its finished library is published with one atomic
  :func:`os.rename` to ``normlab_fused_<key>/``. A process killed mid-build leaves only its
  private folder, which nobody waits for (later builds clear such leftovers after an
  hour). Two processes that build at once both succeed; the second rename loses and its
  copy is discarded.
* **Only the user's own files run.** The cache folder is created ``0700``; a folder or
  library that is not owned by the user, or that others may write, is refused — ``auto``
  then falls back to ATen with a warning, an explicit ``backend="fused"`` raises.
* **A library must hold every op.** One that loads but lacks an op (an older or foreign
  build) is refused the same way instead of failing on every call.

A process that has to compile says so in one line on stderr (it takes ~15–60 s).
``normlab kernels build`` compiles ahead of time; ``normlab kernels status`` reports.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import stat
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "OPS",
    "KernelError",
    "KernelStatus",
    "build_kernels",
    "cache_dir",
    "host_function",
    "kernel_status",
    "load_fused",
    "require_fused",
]

log = logging.getLogger("normlab")

SOURCE = Path(__file__).with_name("batch_norm_cpu.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-DNDEBUG", "-fno-math-errno"]
#: the ops a usable library registers in ``torch.ops.normlab_fused``, and its module's functions
OPS = ("forward_train", "backward_train", "stats", "forward_eval", "invert_act")
FUNCTIONS = (
    "aten_train",
    "update_running",
    "forward_train",
    "backward_train",
    "forward_eval",
    "stats",
    "invert_act",
    "short_runs",
)
_STALE_BUILD_SECONDS = 3600.0
_MODULE: Any = None  # the extension module, once imported in this process


def _cpu_fingerprint() -> str:
    """The CPU's feature flags (``-march=native`` binaries are only valid on the same ISA)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_dir() -> Path:
    """Where compiled kernels are kept (``$NORMLAB_KERNEL_CACHE`` or ``~/.cache/normlab/kernels``)."""
    root = os.environ.get("NORMLAB_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "normlab" / "kernels"


def _key() -> str:
    return hashlib.sha256(
        SOURCE.read_bytes()
        + " ".join(FLAGS).encode()
        + torch.__version__.encode()
        + _cpu_fingerprint().encode()
    ).hexdigest()[:16]


def _paths() -> tuple[Path, str, Path]:
    """``(cache root, extension name, published library path)``."""
    name = f"normlab_fused_{_key()}"
    root = cache_dir()
    return root, name, root / name / f"{name}.so"


class KernelError(RuntimeError):
    """The fused kernels cannot be used; the message says why.

    Parameters
    ----------
    message : str
        Why.
    refused : bool
        The kernels exist but were refused (foreign owner, writable by others, ops
        missing) — worth a warning, unlike a machine without a compiler.

    Examples
    --------
    >>> from normlab.kernels import KernelError
    >>> err = KernelError("no C++ compiler")
    >>> str(err), err.refused
    ('no C++ compiler', False)
    """

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


def _check_owned(path: Path, what: str) -> None:
    """Refuse ``path`` unless this user owns it and nobody else may write to it."""
    info = path.stat()
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise KernelError(
            f"the kernel {what} {path} is owned by another user (uid {info.st_uid}); "
            "normlab only loads code from a cache the user owns. Point NORMLAB_KERNEL_CACHE "
            "at a folder of your own.",
            refused=True,
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KernelError(
            f"the kernel {what} {path} is writable by other users (mode "
            f"{stat.S_IMODE(info.st_mode):o}); normlab refuses to load code others could have "
            f"placed there. Fix it with `chmod go-w {path}` or point NORMLAB_KERNEL_CACHE "
            "elsewhere.",
            refused=True,
        )


def _prepare_root(root: Path) -> None:
    """Create the cache folder private to the user (0700), or vet an existing one."""
    if not root.exists():
        root.mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chmod(root, 0o700)  # mkdir's mode is filtered by the umask
    if not root.is_dir():
        raise KernelError(f"the kernel cache {root} is not a folder")
    _check_owned(root, "cache folder")


def _clear_leftovers(root: Path, name: str) -> None:
    """Remove private build folders of killed processes (older than an hour) and report a
    lock file an older normlab left in the published folder."""
    now = time.time()
    for entry in root.glob(f".build-{name}-*"):
        try:
            if now - entry.stat().st_mtime > _STALE_BUILD_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue
    legacy = root / name / "lock"
    if legacy.exists():
        warnings.warn(
            f"normlab: removed a stale kernel build lock {legacy} (a build was killed); "
            "building again",
            RuntimeWarning,
            stacklevel=4,
        )
        legacy.unlink(missing_ok=True)


def _ninja_on_path() -> bool:
    """``ninja`` on PATH, or installed beside this Python (then its folder is put on PATH)."""
    if shutil.which("ninja") is not None:
        return True
    candidate = Path(sys.executable).with_name("ninja")
    if candidate.exists():
        os.environ["PATH"] = f"{candidate.parent}{os.pathsep}{os.environ.get('PATH', '')}"
        return True
    return False


def _compile(root: Path, name: str, library: Path, announce: bool) -> Any:
    """Compile into a private folder, then publish it with one atomic rename."""
    if not _ninja_on_path():
        raise KernelError("ninja is not installed (pip install ninja)")
    from torch.utils import cpp_extension

    if announce:
        print(
            f"normlab: compiling the fused batch-norm kernels into {root} "
            "(once per machine and torch version, ~15-60 s)",
            file=sys.stderr,
            flush=True,
        )
    private = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=root))
    try:
        try:
            module = cpp_extension.load(
                name=name,
                sources=[str(SOURCE)],
                extra_cflags=FLAGS,
                extra_ldflags=["-fopenmp"],
                build_directory=str(private),
                is_python_module=True,
                verbose=False,
            )
        except Exception as err:
            raise KernelError(f"the build failed: {err}") from err
        (private / "lock").unlink(missing_ok=True)
        try:
            os.rename(private, library.parent)  # atomic: others see all of it or nothing
        except OSError:  # another process published first: its library is as good as ours
            if not library.exists():
                shutil.rmtree(library.parent, ignore_errors=True)
                os.rename(private, library.parent)
    finally:
        if private.exists():
            shutil.rmtree(private, ignore_errors=True)
    return module


def _import(name: str, library: Path) -> Any:
    """Import the published extension module (its static initializers register the ops)."""
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise KernelError(f"cannot import the kernel library {library}", refused=True)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Fused:
    """The loaded kernels: ``torch.ops.normlab_fused`` ops as attributes, and ``module``, the
    extension module whose functions are called without ``torch.ops``' boxing."""

    ops: Any
    module: Any

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ops, name)


def _ops_namespace(module: Any) -> Fused:
    ops = torch.ops.normlab_fused
    missing = [op for op in OPS if not _has_op(ops, op)]
    missing += [f for f in FUNCTIONS if not hasattr(module, f)]
    if missing:
        raise KernelError(
            f"the loaded kernel library lacks the op(s) {', '.join(missing)} (an older or "
            "foreign build); delete the cache folder or run `normlab kernels build`",
            refused=True,
        )
    return Fused(ops, module)


def _has_op(ops: Any, op: str) -> bool:
    try:
        getattr(ops, op)
    except (AttributeError, RuntimeError):
        return False
    return True


@functools.cache
def _load(announce: bool = True) -> tuple[Any | None, KernelError | None]:
    """``(ops, None)`` when the kernels are usable, else ``(None, why)``. Once per process;
    a compile says so on stderr unless ``announce`` is False."""
    global _MODULE
    try:
        if _MODULE is None:
            root, name, library = _paths()
            _prepare_root(root)
            _clear_leftovers(root, name)
            if library.exists():
                _check_owned(library.parent, "folder")
                _check_owned(library, "library")
                _MODULE = _import(name, library)
            else:
                _MODULE = _compile(root, name, library, announce)
        return _ops_namespace(_MODULE), None
    except KernelError as err:
        return None, err
    except Exception as err:  # a damaged library, an unreadable cache: never fatal under auto
        return None, KernelError(f"{type(err).__name__}: {err}", refused=True)


_warned = False


def load_fused() -> Any | None:
    """The ``torch.ops.normlab_fused`` namespace, compiling it on first use; ``None`` when the
    kernels cannot be used (callers under ``auto`` fall back to ATen).

    A refused cache (foreign owner, writable by others, missing ops) is reported once as a
    :class:`RuntimeWarning`; a missing compiler or ``ninja`` only at debug log level.
    """
    global _warned
    ops, error = _load()
    if error is not None and not _warned:
        _warned = True
        if error.refused:
            warnings.warn(f"normlab: fused kernels not used: {error}", RuntimeWarning, stacklevel=3)
        else:
            log.debug("normlab: fused kernels unavailable (%s); falling back to ATen", error)
    return ops


@functools.cache
def host_function(name: str) -> Any:
    """The compiled extension module's function ``name`` (one of ``FUNCTIONS``: a pybind call
    of ~1 µs, for eager CPU code), or ``None`` when the kernels cannot be used.

    Parameters
    ----------
    name : str
        A name in ``FUNCTIONS``.

    Returns
    -------
    callable or None

    Examples
    --------
    >>> import torch
    >>> from normlab.kernels import host_function
    >>> update = host_function("update_running")
    >>> rm, rv = torch.zeros(2), torch.ones(2)
    >>> bad = update and update(rm, rv, None, torch.tensor([1.0, 2.0]), torch.ones(2), 0.5, 1.0, 0)
    >>> update is None or (bad == 0 and rm.tolist() == [0.5, 1.0])
    True
    """
    fused = load_fused()
    return None if fused is None else getattr(fused.module, name)


def require_fused(*, announce: bool = True) -> Any:
    """The kernels' ops namespace, compiling them first if needed.

    Parameters
    ----------
    announce : bool
        Log a line when a compilation starts (it takes 15–60 s).

    Returns
    -------
    object
        ``torch.ops.normlab_fused``-style namespace of the C++ entry points.

    Raises
    ------
    KernelError
        The kernels cannot be used; the message says why and where the cache is.

    Examples
    --------
    >>> from normlab.kernels import KernelError, require_fused
    >>> try:
    ...     ops = require_fused(announce=False)
    ... except KernelError:                # e.g. no C++ compiler on this machine
    ...     ops = None
    >>> ops is None or hasattr(ops, "forward_train")
    True
    """
    ops, error = _load(announce)
    if error is not None:
        raise KernelError(
            f"backend='fused' was requested but the fused kernels cannot be used: {error}. "
            "`normlab kernels status` shows the cache; backend='auto' falls back to ATen.",
            refused=error.refused,
        )
    return ops


@dataclass(frozen=True)
class KernelStatus:
    """What ``normlab kernels status`` reports (:func:`kernel_status`).

    Parameters
    ----------
    cache : Path
        The cache folder (``$NORMLAB_KERNEL_CACHE`` or ``~/.cache/normlab/kernels``).
    library : Path
        Where this machine's and torch version's library is (or would be).
    built : bool
        The library exists.
    usable : bool
        It exists and passes the ownership checks.
    reason : str or None
        Why it is not usable.

    Examples
    --------
    >>> from normlab.kernels import kernel_status
    >>> status = kernel_status()
    >>> status.usable == (status.reason is None)
    True
    """

    cache: Path
    library: Path
    built: bool
    usable: bool
    reason: str | None


def kernel_status() -> KernelStatus:
    """Where the cache is and whether the kernels are built and usable (nothing is compiled).

    Returns
    -------
    KernelStatus

    Examples
    --------
    >>> from normlab.kernels import kernel_status
    >>> kernel_status().library.suffix
    '.so'
    """
    root, _, library = _paths()
    reason: str | None = None
    try:
        if root.exists():
            _check_owned(root, "cache folder")
        if library.exists():
            _check_owned(library.parent, "folder")
            _check_owned(library, "library")
        else:
            reason = "not built yet (`normlab kernels build`)"
    except KernelError as err:
        reason = str(err)
    except OSError as err:
        reason = f"{type(err).__name__}: {err}"
    return KernelStatus(root, library, library.exists(), reason is None, reason)


def build_kernels(*, announce: bool = True) -> Path:
    """Compile (if needed) and load the kernels — what ``normlab kernels build`` runs.

    Parameters
    ----------
    announce : bool
        Log a line when a compilation starts.

    Returns
    -------
    Path
        The compiled library.

    Raises
    ------
    KernelError
        No compiler, a refused cache, or a failed build; the message says which.

    Examples
    --------
    >>> from normlab.kernels import KernelError, build_kernels
    >>> try:
    ...     library = build_kernels(announce=False)
    ... except KernelError:                # e.g. no C++ compiler on this machine
    ...     library = None
    >>> library is None or library.suffix == ".so"
    True
    """
    require_fused(announce=announce)
    return _paths()[2]
