"""Choosing a kernel for ``backend=``: an explicit argument, never a global switch."""

from __future__ import annotations

import logging
from typing import Literal, Protocol

import torch
from torch import Tensor

from ..kernels import NativeKernel
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


def register_kernel(name: str, kernel: BatchNormKernel) -> None:
    """Make ``kernel`` available as ``backend=name`` (used by the fused fast path)."""
    _KERNELS[name] = kernel


def _under_functorch(x: Tensor) -> bool:
    if (
        torch.compiler.is_compiling()
    ):  # dynamo cannot trace the check; compiled graphs are not vmapped
        return False
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))


def resolve_kernel(backend: str, x: Tensor, mask: Tensor | None) -> BatchNormKernel:
    """The kernel for ``backend`` and this input.

    ``"auto"`` picks the fastest path known to be correct: ``reference`` for masked
    input and inside ``torch.func`` transforms (vmap/grad need pure ops), else
    ATen's ``native``. An explicit backend that cannot serve the call raises.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if mask is not None or _under_functorch(x):
            return _KERNELS["reference"]
        return _KERNELS["native"]
    if backend not in _KERNELS:
        raise RuntimeError(f"backend {backend!r} is not available in this installation")
    if mask is not None and backend != "reference":
        raise ValueError(f"backend={backend!r} does not support mask; use 'auto' or 'reference'")
    return _KERNELS[backend]
