"""Benchmark cases: normlab ``BatchNorm*`` against ``torch.nn.BatchNorm*`` on the same input."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import nn as nlnn
from ._core import BenchOptions, Case

__all__ = ["bn_cases", "module_cases"]

_FULL_SHAPES: list[tuple[tuple[int, ...], str, torch.dtype]] = [
    ((256, 512), "contiguous", torch.float32),
    ((64, 128, 100), "contiguous", torch.float32),
    ((32, 64, 56, 56), "contiguous", torch.float32),
    ((32, 64, 56, 56), "channels_last", torch.float32),
    ((32, 256, 14, 14), "contiguous", torch.float32),
    ((8, 32, 16, 16, 16), "contiguous", torch.float32),
    ((32, 64, 56, 56), "contiguous", torch.bfloat16),
]
_QUICK_SHAPES = [
    _FULL_SHAPES[0],
    _FULL_SHAPES[1],
    (((16, 64, 28, 28)), "contiguous", torch.float32),
    ((16, 64, 28, 28), "channels_last", torch.float32),
]

_TORCH_BN = {
    2: torch.nn.BatchNorm1d,
    3: torch.nn.BatchNorm1d,
    4: torch.nn.BatchNorm2d,
    5: torch.nn.BatchNorm3d,
}
_OURS_BN = {2: nlnn.BatchNorm1d, 3: nlnn.BatchNorm1d, 4: nlnn.BatchNorm2d, 5: nlnn.BatchNorm3d}


def make_input(
    shape: tuple[int, ...], layout: str, dtype: torch.dtype, seed: int = 0
) -> torch.Tensor:
    """A standard-normal input in the requested layout (``contiguous`` or ``channels_last``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


def _label(shape: tuple[int, ...], layout: str, dtype: torch.dtype) -> str:
    dt = str(dtype).removeprefix("torch.").replace("float", "fp").replace("bfp16", "bf16")
    lay = "NHWC" if layout == "channels_last" else "contig"
    return f"{tuple(shape)} {lay} {dt}"


def module_cases(
    suite: str,
    label: str,
    baseline: torch.nn.Module,
    candidate: torch.nn.Module,
    x: torch.nn.Parameter | torch.Tensor,
) -> list[Case]:
    """Train fwd, train fwd+bwd and eval fwd cases for two modules on the same input."""
    xg = x.detach().clone().requires_grad_(True)
    grad = torch.randn_like(x)

    def fwd(m: torch.nn.Module, train: bool) -> Callable[[], object]:
        def run() -> object:
            m.train(train)
            with torch.no_grad():
                return m(x)

        return run

    def fwd_bwd(m: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            m.train(True)
            y = m(xg)
            y.backward(grad)
            return y

        return run

    def zero() -> None:
        xg.grad = None
        for m in (baseline, candidate):
            m.zero_grad(set_to_none=True)

    return [
        Case(suite, label, "train fwd", fwd(baseline, True), fwd(candidate, True)),
        Case(suite, label, "train fwd+bwd", fwd_bwd(baseline), fwd_bwd(candidate), setup=zero),
        Case(suite, label, "eval fwd", fwd(baseline, False), fwd(candidate, False)),
    ]


def bn_cases(options: BenchOptions) -> list[Case]:
    """normlab BatchNorm (``backend=options.backend``) vs torch BatchNorm, per shape/layout/dtype."""
    cases: list[Case] = []
    for shape, layout, dtype in _QUICK_SHAPES if options.quick else _FULL_SHAPES:
        x = make_input(shape, layout, dtype)
        ndim = len(shape)
        ref = _TORCH_BN[ndim](shape[1])
        ours = _OURS_BN[ndim](shape[1], backend=options.backend)
        ours.load_state_dict(ref.state_dict())
        cases += module_cases("batchnorm", _label(shape, layout, dtype), ref, ours, x)
    return cases
