"""The allocator's effect: the same BN train step in two fresh processes, default vs tuned malloc.

:func:`normlab.perf.tune_cpu_allocator` cannot be undone inside a process, so
each setting runs in its own child (``python -m normlab.bench._alloc``); the row's
ratio is tuned / default for one implementation (torch's or normlab's).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from ._core import BenchOptions, Result, time_pair

__all__ = ["allocator_results"]


def _measure(shape: tuple[int, ...], backend: str, repeats: int, tune: bool) -> dict[str, float]:
    """Median ms of torch's and normlab's BatchNorm2d train fwd+bwd in this process."""
    if tune:
        from ..perf import tune_cpu_allocator

        tune_cpu_allocator()
    from .. import nn as nlnn

    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    ref, ours = torch.nn.BatchNorm2d(shape[1]), nlnn.BatchNorm2d(shape[1], backend=backend)

    def step(m: torch.nn.Module) -> None:
        x.grad = None
        m(x).backward(grad)

    t_ref, t_ours = time_pair(lambda: step(ref), lambda: step(ours), repeats=repeats)
    return {"torch": t_ref * 1e3, "normlab": t_ours * 1e3}


def allocator_results(options: BenchOptions) -> list[Result]:
    """Rows ``allocator``: default-malloc ms (baseline column) vs tuned-malloc ms, per implementation."""
    shape = (8, 64, 56, 56) if options.quick else (32, 64, 112, 112)
    runs = {}
    for tune in (False, True):
        cmd = [sys.executable, "-m", "normlab.bench._alloc", "--shape", *map(str, shape)]
        cmd += ["--backend", options.backend, "--repeats", str(options.repeats)]
        cmd += ["--tune"] if tune else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs[tune] = json.loads(out.strip().splitlines()[-1])
    return [
        Result(
            "allocator",
            f"{who} BatchNorm2d {shape} NCHW fp32",
            "train fwd+bwd",
            runs[False][who],
            runs[True][who],
            runs[True][who] / runs[False][who],
            options.repeats,
            baseline_label="default malloc",
        )
        for who in ("torch", "normlab")
    ]


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=4, required=True)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tune", action="store_true")
    args = parser.parse_args()
    print(json.dumps(_measure(tuple(args.shape), args.backend, args.repeats, args.tune)))


if __name__ == "__main__":
    _main()
