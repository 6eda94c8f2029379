"""Choosing a kernel for ``backend=``: an explicit argument, never a global switch."""

from __future__ import annotations

import logging
from typing import Literal, Protocol

import torch
from torch import Tensor

from ..kernels import FusedKernel, NativeKernel, fused_available, fused_serves
from ._reference import ReferenceKernel

__all__ = ["BACKENDS", "Backend", "BatchNormKernel", "register_kernel", "resolve_kernel"]

log = logging.getLogger("normlab")

Backend = Literal["auto", "reference", "native", "fused"]


class BatchNormKernel(Protocol):
    """What a backend provides (channel axis 1, ``(N, C, *)`` input)."""

    name: str

    @staticmethod
    def forward_train(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]: ...

    @staticmethod
    def backward_train(
        dy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        needs: tuple[bool, bool, bool],
        mask: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]: ...

    @staticmethod
    def stats(x: Tensor) -> tuple[Tensor, Tensor]: ...

    @staticmethod
    def forward_eval(
        x: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> Tensor: ...


_KERNELS: dict[str, BatchNormKernel] = {"reference": ReferenceKernel(), "native": NativeKernel()}
BACKENDS: tuple[str, ...] = ("auto", "reference", "native", "fused")

# "auto" uses the fused kernels from this many elements on: below it the call is
# dominated by fixed costs (the Python autograd.Function, the running-stat update,
# ~80 µs together) and a first call would pay the one-off compile for no gain.
FUSED_MIN_NUMEL = 1 << 20
# bf16 NCHW with short spatial runs stays on ATen (measured slower, docs/performance.md)
FUSED_BF16_MIN_SPATIAL = 1024
# where the fused kernels measured faster than ATen
_FUSED_AUTO_DTYPES = (torch.float32, torch.bfloat16)


def register_kernel(name: str, kernel: BatchNormKernel) -> None:
    """Make ``kernel`` available as ``backend=name`` (used by the fused fast path)."""
    _KERNELS[name] = kernel


register_kernel("fused", FusedKernel())


def _prefer_fused(x: Tensor) -> bool:
    """``"auto"``'s choice of the fused kernels: CPU, fp32/bf16, not tiny, eager, compiled OK
    (and, for bf16 NCHW, spatial planes of at least ``FUSED_BF16_MIN_SPATIAL``).

    Under ``torch.compile`` Inductor generates its own batch norm from ATen's, so
    the graph keeps ``native``. Where the kernels cannot be compiled,
    :func:`~normlab.kernels.fused_available` is ``False`` (said once at debug
    level) and ATen serves — never a failure where ``native`` works.
    """
    if (
        x.device.type != "cpu"
        or x.dtype not in _FUSED_AUTO_DTYPES
        or x.numel() < FUSED_MIN_NUMEL
        or torch.compiler.is_compiling()
    ):
        return False
    nchw_bf16 = x.dtype == torch.bfloat16 and x.dim() > 2 and x.is_contiguous()  # (N, C, S)
    if nchw_bf16 and x.numel() // (x.shape[0] * x.shape[1]) < FUSED_BF16_MIN_SPATIAL:
        return False
    return fused_available()


def _under_functorch(x: Tensor) -> bool:
    if (
        torch.compiler.is_compiling()
    ):  # dynamo cannot trace the check; compiled graphs are not vmapped
        return False
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))


def resolve_kernel(backend: str, x: Tensor, mask: Tensor | None) -> BatchNormKernel:
    """The kernel for ``backend`` and this input.

    ``"auto"`` picks the fastest path known to be correct: ``reference`` for masked
    input and inside ``torch.func`` transforms (vmap/grad need pure ops); the
    ``fused`` C++ kernels for CPU fp32/bf16 input of at least ``FUSED_MIN_NUMEL``
    elements when they compile; else ATen's ``native``. An explicit backend that
    cannot serve the call raises.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if mask is not None or _under_functorch(x):
            return _KERNELS["reference"]
        return _KERNELS["fused" if _prefer_fused(x) else "native"]
    if backend not in _KERNELS:
        raise RuntimeError(f"backend {backend!r} is not available in this installation")
    if mask is not None and backend != "reference":
        raise ValueError(f"backend={backend!r} does not support mask; use 'auto' or 'reference'")
    return _KERNELS[backend]


def fused_for_layer(backend: str, x: Tensor) -> bool:
    """Whether a layer that runs its own ``autograd.Function`` (Renorm, Ghost, BN+act) should use
    the fused kernels for ``x``: where ``backend`` resolves to them, and under ``"auto"`` also
    where plain BatchNorm stays on ATen (small or bf16-NCHW input). Those thresholds weigh ATen's
    C++ autograd against a Python ``Function``; these layers pay for the Function either way, and
    their ATen route needs extra passes (a float32 copy for bf16 statistics, a fold, torch-op
    backwards)."""
    kernel = resolve_kernel(backend, x, None)  # first: under torch.func this is "reference"
    if kernel.name == "fused":
        return fused_serves(x)  # compiles the kernels on first use
    # auto: never inside torch.compile (Inductor generates its own kernel from ATen's ops)
    return (
        backend == "auto"
        and kernel.name == "native"
        and not torch.compiler.is_compiling()
        and fused_serves(x)
    )
