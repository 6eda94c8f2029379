"""Building and loading the fused kernels: a killed build never blocks, only the user's own code runs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from normlab.kernels import KernelError, _build, fused_available, kernel_status

needs_fused = pytest.mark.skipif(not fused_available(), reason="no C++ compiler/ninja")

LAYER = (
    "import torch, normlab.nn as n; from normlab.kernels import fused_available;"
    "y = n.BatchRenorm2d(8)(torch.randn(4, 8, 3, 3)); print('fused', fused_available(), tuple(y.shape))"
)


def _python(code: str, cache: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NORMLAB_KERNEL_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
    )


def _published(cache: Path) -> Path:
    """A cache holding a copy of this session's built library (no compile needed)."""
    library = kernel_status().library
    cache.mkdir(mode=0o700)
    shutil.copytree(library.parent, cache / library.parent.name)
    return cache / library.parent.name / library.name


@needs_fused
@pytest.mark.timeout(400)
def test_a_killed_build_never_blocks_a_later_process(tmp_path: Path) -> None:
    """SIGKILL during the first compile, plus a lock an older normlab left: the next process
    reports the lock, builds, and gets a working layer in bounded time (it used to wait forever)."""
    cache = tmp_path / "cache"
    env = {**os.environ, "NORMLAB_KERNEL_CACHE": str(cache)}
    build = subprocess.Popen(
        [sys.executable, "-c", "from normlab.kernels import fused_available; fused_available()"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert build.stderr is not None
    line = build.stderr.readline()  # printed before the compiler starts
    assert "normlab: compiling the fused batch-norm kernels" in line
    time.sleep(3)
    build.send_signal(signal.SIGKILL)
    build.wait()
    assert any(cache.glob(".build-*")), "the killed build left its private folder"
    final = cache / kernel_status().library.parent.name
    final.mkdir()
    (final / "lock").write_text("")  # what a killed build of the old loader left behind
    started = time.time()
    done = _python(LAYER, cache, timeout=360)
    assert done.returncode == 0, done.stderr
    assert "fused True (4, 8, 3, 3)" in done.stdout
    assert "removed a stale kernel build lock" in done.stderr
    assert time.time() - started < 360
    assert (final / kernel_status().library.name).exists()
    assert stat_mode(cache) == 0o700


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@needs_fused
def test_a_published_library_loads_without_compiling(tmp_path: Path) -> None:
    _published(tmp_path / "cache")
    done = _python(LAYER, tmp_path / "cache", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fused True" in done.stdout and "compiling" not in done.stderr


@needs_fused
@pytest.mark.parametrize("what", ["folder", "library"])
def test_code_others_could_write_is_refused(tmp_path: Path, what: str) -> None:
    """A cache folder or library writable by others: auto warns and uses ATen, fused raises."""
    library = _published(tmp_path / "cache")
    os.chmod(tmp_path / "cache" if what == "folder" else library, 0o777)
    done = _python(LAYER, tmp_path / "cache", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fused False (4, 8, 3, 3)" in done.stdout
    assert "is writable by other users" in done.stderr and "chmod go-w" in done.stderr
    explicit = _python(
        "import torch, normlab.nn as n; n.BatchNorm2d(3, backend='fused')(torch.randn(2, 3, 2, 2))",
        tmp_path / "cache",
        timeout=120,
    )
    assert explicit.returncode != 0
    assert (
        "KernelError: backend='fused' was requested but the fused kernels cannot be used"
        in explicit.stderr
    )


def test_a_cache_owned_by_someone_else_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(KernelError, match="is owned by another user") as info:
        _build._check_owned(tmp_path, "cache folder")
    assert info.value.refused


def test_a_library_without_every_op_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_build, "_has_op", lambda ops, op: op != "invert_act")
    ops, error = _build._load.__wrapped__()
    assert ops is None and error is not None and error.refused
    assert "lacks the op(s) invert_act" in str(error)


def test_status_reports_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NORMLAB_KERNEL_CACHE", str(tmp_path / "none"))
    status = kernel_status()
    assert status.cache == tmp_path / "none" and not status.built and not status.usable
    assert "not built yet" in (status.reason or "")
    assert not (tmp_path / "none").exists()  # status creates and compiles nothing


def test_kernels_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from normlab.cli import app

    runner = CliRunner()
    env = {"NORMLAB_KERNEL_CACHE": str(tmp_path / "empty")}
    result = runner.invoke(app, ["kernels", "status"], env=env)
    assert result.exit_code == 1
    assert f"cache: {tmp_path / 'empty'}" in result.output and "not built yet" in result.output
    if fused_available():
        result = runner.invoke(app, ["kernels", "status"])
        assert result.exit_code == 0 and "usable: yes" in result.output
        result = runner.invoke(app, ["kernels", "build"])
        assert result.exit_code == 0 and "fused kernels ready:" in result.output


def test_explicit_fused_never_silently_runs_on_aten(monkeypatch: pytest.MonkeyPatch) -> None:
    import normlab.nn as nlnn

    monkeypatch.setattr(
        _build, "_load", lambda announce=True: (None, KernelError("the build failed: no compiler"))
    )
    with pytest.raises(KernelError, match="the build failed: no compiler"):
        nlnn.BatchRenorm2d(3, backend="fused")(torch.randn(2, 3, 2, 2))
