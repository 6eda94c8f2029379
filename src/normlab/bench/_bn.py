"""Benchmark cases: normlab's batch norm against torch's on the same input.

Suites (each ``BenchOptions -> list[Case]``):

* ``batchnorm`` — ``normlab.nn.BatchNorm*`` vs ``torch.nn.BatchNorm*`` on the
  ResNet-50 stage shapes at batch 32 (224 px input: ~100 MB fp32 tensors, far outside the
  caches), the same at half the spatial size (3–25 MB, where the caches start to matter),
  two sub-millisecond shapes (where fixed costs rule), plus ``(N, C, L)`` and ``(N, F)``;
  NCHW and channels_last; fp32 and bf16; train fwd, train fwd+bwd, eval fwd.
* ``act`` — ``BatchNormAct2d`` vs torch ``BatchNorm2d`` + the same activation
  (leaky ReLU, ReLU, SiLU).
* ``variants`` — Renorm / Ghost vs normlab's own ``BatchNorm2d``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import nn as nlnn
from ._core import BenchOptions, Case, Traffic

__all__ = [
    "RESNET50_SHAPES",
    "act_cases",
    "bn_cases",
    "make_input",
    "module_cases",
    "variant_cases",
]

Shape = tuple[int, ...]
Config = tuple[Shape, str, torch.dtype]

# ResNet-50's batch-norm inputs per stage at batch 32 (stem, conv2_x … conv5_x outputs)
RESNET50_SHAPES: list[Shape] = [
    (32, 64, 112, 112),
    (32, 256, 56, 56),
    (32, 512, 28, 28),
    (32, 1024, 14, 14),
    (32, 2048, 7, 7),
]
# one halving of the spatial size: tensors of 3-25 MB
MID_SHAPES: list[Shape] = [(32, 64, 56, 56), (32, 256, 28, 28), (32, 512, 14, 14), (32, 1024, 7, 7)]
TINY_SHAPES: list[Shape] = [(8, 64, 14, 14), (4, 32, 8, 8)]  # sub-millisecond: fixed costs
_EXTRA_SHAPES: list[Shape] = [(32, 256, 784), (4096, 1024)]  # (N, C, L), (N, F)
_QUICK_SHAPES: list[Shape] = [(16, 64, 56, 56), (16, 512, 14, 14), (32, 128, 256), (1024, 512)]
_DTYPES = (torch.float32, torch.bfloat16)

# minimum traffic in units of the input tensor: (read+write pairs, extra reads)
TRAFFIC = {"train fwd": (1, 1), "train fwd+bwd": (2, 4), "eval fwd": (1, 0)}

_TORCH_BN = {
    2: torch.nn.BatchNorm1d,
    3: torch.nn.BatchNorm1d,
    4: torch.nn.BatchNorm2d,
    5: torch.nn.BatchNorm3d,
}
_OURS_BN = {2: nlnn.BatchNorm1d, 3: nlnn.BatchNorm1d, 4: nlnn.BatchNorm2d, 5: nlnn.BatchNorm3d}


def make_input(shape: Shape, layout: str, dtype: torch.dtype, seed: int = 0) -> Tensor:
    """A standard-normal input in the requested layout (``contiguous`` or ``channels_last``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


def _label(shape: Shape, layout: str, dtype: torch.dtype) -> str:
    dt = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        dtype, str(dtype)
    )
    lay = "NHWC" if layout == "channels_last" else "NCHW" if len(shape) == 4 else "contig"
    return f"{tuple(shape)} {lay} {dt}"


def configs(options: BenchOptions, shapes: Sequence[Shape] | None = None) -> list[Config]:
    """(shape, layout, dtype) triples: every 4-D shape in both layouts, every shape in fp32 and bf16."""
    if shapes is None:
        shapes = (
            _QUICK_SHAPES
            if options.quick
            else [*RESNET50_SHAPES, *MID_SHAPES, *TINY_SHAPES, *_EXTRA_SHAPES]
        )
    out: list[Config] = []
    for dtype in _DTYPES:
        for shape in shapes:
            for layout in ("contiguous", "channels_last") if len(shape) == 4 else ("contiguous",):
                out.append((tuple(shape), layout, dtype))
    return out


def module_cases(
    suite: str,
    label: str,
    baseline: torch.nn.Module,
    candidate: torch.nn.Module,
    x: Tensor,
    *,
    baseline_label: str = "torch",
    modes: Sequence[str] = tuple(TRAFFIC),
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

    make = {
        "train fwd": lambda: (fwd(baseline, True), fwd(candidate, True), None),
        "train fwd+bwd": lambda: (fwd_bwd(baseline), fwd_bwd(candidate), zero),
        "eval fwd": lambda: (fwd(baseline, False), fwd(candidate, False), None),
    }
    cases = []
    for mode in modes:
        base, cand, setup = make[mode]()
        copies, reads = TRAFFIC[mode]
        cases.append(
            Case(
                suite,
                label,
                mode,
                base,
                cand,
                setup=setup,
                traffic=Traffic(x, copies, reads),
                baseline_label=baseline_label,
            )
        )
    return cases


def bn_cases(options: BenchOptions, shapes: Sequence[Shape] | None = None) -> list[Case]:
    """normlab BatchNorm (``backend=options.backend``) vs torch BatchNorm, per shape/layout/dtype."""
    cases: list[Case] = []
    for shape, layout, dtype in configs(options, shapes):
        x = make_input(shape, layout, dtype)
        ref = _TORCH_BN[len(shape)](shape[1])
        ours = _OURS_BN[len(shape)](shape[1], backend=options.backend)
        ours.load_state_dict(ref.state_dict())
        cases += module_cases("batchnorm", _label(shape, layout, dtype), ref, ours, x)
    return cases


ACTIVATIONS: dict[str, Callable[[], torch.nn.Module]] = {
    "leaky_relu": lambda: torch.nn.LeakyReLU(0.01),
    "relu": torch.nn.ReLU,
    "silu": torch.nn.SiLU,
}


def act_cases(options: BenchOptions, shapes: Sequence[Shape] | None = None) -> list[Case]:
    """``BatchNormAct2d`` vs torch ``BatchNorm2d`` + the same activation, per activation."""
    cases: list[Case] = []
    activations = ["leaky_relu"] if options.quick else list(ACTIVATIONS)
    for shape, layout, dtype in configs(options, shapes):
        if len(shape) != 4:
            continue
        x = make_input(shape, layout, dtype)
        for activation in activations:
            ref = torch.nn.Sequential(torch.nn.BatchNorm2d(shape[1]), ACTIVATIONS[activation]())
            ours = nlnn.BatchNormAct2d(shape[1], activation=activation, backend=options.backend)
            label = f"{activation} {_label(shape, layout, dtype)}"
            cases += module_cases("act", label, ref, ours, x)
    return cases


def variant_cases(options: BenchOptions, shapes: Sequence[Shape] | None = None) -> list[Case]:
    """Renorm and Ghost vs normlab's own ``BatchNorm2d`` (same backend, same shape)."""
    cases: list[Case] = []
    variants: list[tuple[str, Callable[..., torch.nn.Module]]] = [
        ("BatchRenorm2d", nlnn.BatchRenorm2d),
        # virtual batches of 8: four chunks at batch 32 (the default 32 would be one chunk, plain BN)
        ("GhostBatchNorm2d(8)", functools.partial(nlnn.GhostBatchNorm2d, virtual_batch_size=8)),
    ]
    for shape, layout, dtype in configs(options, shapes):
        if len(shape) != 4:
            continue
        x = make_input(shape, layout, dtype)
        for name, layer in variants:
            base = nlnn.BatchNorm2d(shape[1], backend=options.backend)
            cand = layer(shape[1], backend=options.backend)
            label = f"{name} {_label(shape, layout, dtype)}"
            cases += module_cases(
                "variants", label, base, cand, x, baseline_label="normlab BN",
                modes=("train fwd", "train fwd+bwd"),
            )  # fmt: skip
    return cases
