"""``normlab bench --suite standardizer``: the Standardizer against scikit-learn and torch.

Rows (ratio = normlab / baseline; below 1 is faster, 0.2 is 5× faster):

* ``partial_fit``: a stream of 1000×64 batches (200; 40 with ``--quick``) into a
  fresh ``Standardizer`` vs a fresh ``sklearn.preprocessing.StandardScaler``, as
  float64 numpy arrays and as float32 torch tensors (scikit-learn gets numpy
  views of the same memory; both accumulate in float64). Efficiency: the
  bandwidth floor — one read of every batch (a ``sum``) — over the time.
* ``partial_fit, 1 core busy``: the same while a child process spins on one core
  (work this small must not be split across threads).
* ``transform``: ``Standardizer.transform`` vs ``(x - mean) / scale`` in torch with
  the statistics already in the input's dtype; floor: one copy of the input.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from ..preprocessing import Standardizer
from ._core import BenchOptions, Case, Result, Traffic, run_cases

__all__ = ["one_core_busy", "standardizer_cases", "standardizer_results"]

_ROWS, _FEATURES = 1000, 64


def _partial_fit_cases(options: BenchOptions, mode: str) -> list[Case]:
    from sklearn.preprocessing import StandardScaler

    count = 40 if options.quick else 200
    data = np.random.default_rng(0).normal(3, 2, size=(count, _ROWS, _FEATURES))  # (B, N, F)
    as32 = torch.from_numpy(data).float()
    streams = {  # name: (our batches, scikit-learn's batches, the floor's tensor)
        "float64 numpy": (list(data), list(data), torch.from_numpy(data)),
        "float32 torch": (list(as32), [b.numpy() for b in as32], as32),
    }
    cases = []
    for name, (ours_in, sklearn_in, everything) in streams.items():

        def ours(batches=ours_in) -> None:
            s = Standardizer()
            for b in batches:
                s.partial_fit(b)

        def sklearn(batches=sklearn_in) -> None:
            s = StandardScaler()
            for b in batches:
                s.partial_fit(b)

        cases.append(
            Case(
                "standardizer",
                f"{count} batches ({_ROWS}, {_FEATURES}) {name}",
                mode,
                sklearn,
                ours,
                traffic=Traffic(everything, copies=0, reads=1),
                baseline_label="sklearn",
            )
        )
    return cases


def _transform_cases() -> list[Case]:
    cases = []
    for shape in ((_ROWS, _FEATURES), (64, 3, 64, 64)):
        x = torch.randn(shape) * 2 + 3
        s = Standardizer().fit(x)
        view = [1] * len(shape)
        view[1] = -1
        mean, scale = s.mean_.float().view(view), s.scale_.float().view(view)

        def torch_ops(x=x, mean=mean, scale=scale) -> torch.Tensor:
            return (x - mean) / scale

        def ours(x=x, s=s) -> torch.Tensor:
            return s.transform(x)

        cases.append(
            Case(
                "standardizer",
                f"{shape} fp32",
                "transform",
                torch_ops,
                ours,
                traffic=Traffic(x, copies=1),
            )
        )
    return cases


def standardizer_cases(options: BenchOptions) -> list[Case]:
    """The quiet-machine rows: ``partial_fit`` (both inputs) and ``transform``."""
    return _partial_fit_cases(options, "partial_fit") + _transform_cases()


@contextmanager
def one_core_busy() -> Iterator[None]:
    """Keep one core busy with a spinning child process for the duration of the block."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start spinning
        yield
    finally:
        spinner.terminate()
        spinner.wait()


def standardizer_results(options: BenchOptions) -> list[Result]:
    """Every row of the suite: the quiet ones, then ``partial_fit`` beside a busy core."""
    results = run_cases(standardizer_cases(options), options)
    busy = _partial_fit_cases(options, "partial_fit, 1 core busy")
    with one_core_busy():
        results += run_cases(busy, options)
    return results
