"""Choosing a kernel for ``backend=``: one protocol, one decision, an explicit argument.

Every kernel implements :class:`BatchNormKernel`. A kernel declares what it fuses
(``activations``, batch ``chunks``); :mod:`normlab.functional._train` composes the rest
around it (an activation after the kernel, a loop over chunks), so every kernel serves
every layer. :func:`resolve_kernel` is the only place where a backend is chosen.
"""

from __future__ import annotations

from typing import Literal, Protocol, cast

import torch
from torch import Tensor

from ..kernels import FusedKernel, NativeKernel, fused_available, require_fused
from ._activation import Activation
from ._checks import check_choice
from ._reference import ReferenceKernel

__all__ = [
    "BACKENDS",
    "FUSED_BF16_MIN_SPATIAL",
    "FUSED_MIN_NUMEL",
    "Backend",
    "BatchNormKernel",
    "register_kernel",
    "resolve_kernel",
]

Backend = Literal["auto", "reference", "native", "fused"]


class BatchNormKernel(Protocol):
    """What a backend provides. Channel axis 1, ``(N, C, *)`` input in any memory layout.

    Statistics come back in the accumulation dtype (float32 for fp16/bf16 input), the
    variance biased; with ``chunks`` (consecutive batch chunks, each its own batch) they are
    ``(len(chunks)·C,)``, chunk-major. A kernel is only handed an ``act`` it lists in
    ``activations``, ``chunks`` when ``chunked`` and a ``mask`` when it is the reference.
    """

    name: str
    activations: frozenset[str]
    chunked: bool
    differentiable: bool  # forward_train is differentiable itself (ATen's own autograd)

    @staticmethod
    def serves(x: Tensor) -> bool: ...

    @staticmethod
    def stats(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]: ...

    @staticmethod
    def forward_train(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        act: Activation | None = None,
        chunks: list[int] | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]: ...

    @staticmethod
    def backward_train(
        dy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        needs: tuple[bool, bool, bool],
        act: Activation | None = None,
        chunks: list[int] | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]: ...

    @staticmethod
    def forward_eval(
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        act: Activation | None = None,
    ) -> Tensor: ...

    @staticmethod
    def invert(
        y: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        act: Activation | None,
    ) -> Tensor | None: ...


_KERNELS: dict[str, BatchNormKernel] = {
    "reference": cast(BatchNormKernel, ReferenceKernel()),
    "native": cast(BatchNormKernel, NativeKernel()),
    "fused": cast(BatchNormKernel, FusedKernel()),
}
BACKENDS: tuple[str, ...] = ("auto", "reference", "native", "fused")

# "auto" takes the fused kernels for plain batch norm from this many elements on: below it
# a call is dominated by fixed costs (the Python autograd.Function, ~30 µs) that ATen's
# C++ autograd does not pay. Layers that run the Function anyway (activation, chunks,
# correction) take the fused kernels at every size.
FUSED_MIN_NUMEL = 1 << 20
# bf16 NCHW with short spatial runs stays on ATen (measured slower, docs/performance.md)
FUSED_BF16_MIN_SPATIAL = 1024
_FUSED_AUTO_DTYPES = (torch.float32, torch.bfloat16)


def register_kernel(name: str, kernel: BatchNormKernel) -> None:
    """Make ``kernel`` available as ``backend=name``."""
    _KERNELS[name] = kernel


def _auto_prefers_fused(x: Tensor, variant: bool) -> bool:
    if not variant and x.numel() < FUSED_MIN_NUMEL:  # the common small case, decided first
        return False
    if not FusedKernel.serves_input(x):
        return False
    if variant:  # the layer pays for a Python autograd.Function either way
        return fused_available()
    if x.dtype not in _FUSED_AUTO_DTYPES:
        return False
    nchw_bf16 = x.dtype == torch.bfloat16 and x.dim() > 2 and x.is_contiguous()  # (N, C, S)
    if nchw_bf16 and x.numel() // (x.shape[0] * x.shape[1]) < FUSED_BF16_MIN_SPATIAL:
        return False
    return fused_available()


def resolve_kernel(
    backend: str,
    x: Tensor,
    *,
    mask: Tensor | None = None,
    variant: bool = False,
    differentiable: bool = False,
) -> BatchNormKernel:
    """The kernel for ``backend`` and this input — the one place a backend is chosen.

    ``"auto"`` picks the fastest path known to be correct: ``reference`` for masked input
    and inside ``torch.func`` transforms (vmap/grad need pure ops); ATen (``native``) under
    ``torch.compile`` (Inductor generates its own kernel from ATen's); the ``fused`` C++
    kernels for CPU input they serve when they are built and either the input is large
    (fp32/bf16, ``FUSED_MIN_NUMEL`` elements) or ``variant`` (the call runs normlab's
    autograd Function anyway: an activation, chunks, a correction); else ``native``.

    ``differentiable``: the call needs a kernel whose ``forward_eval`` autograd can
    differentiate (eval with gradients, e.g. fine-tuning with frozen statistics): the fused
    kernels' is not, so ATen's — the same affine map — serves instead, ``"fused"`` included.

    An explicit backend that cannot serve the call raises: ``"fused"`` when the kernels
    cannot be built or loaded (:class:`~normlab.kernels.KernelError`, with the reason) or
    for an input they do not serve; any backend but ``"reference"`` with a mask.
    """
    kernel = _resolve(backend, x, mask, variant)
    if differentiable and not kernel.differentiable and kernel.name != "reference":
        return _KERNELS["native"]
    return kernel


def _resolve(backend: str, x: Tensor, mask: Tensor | None, variant: bool) -> BatchNormKernel:
    if backend == "auto":
        if mask is not None:
            return _KERNELS["reference"]
        if (
            torch.compiler.is_compiling()
        ):  # compiled graphs are not vmapped; dynamo cannot trace the check below
            return _KERNELS["native"]
        if torch._C._functorch.is_functorch_wrapped_tensor(x):  # vmap/grad need pure ops
            return _KERNELS["reference"]
        return _KERNELS["fused" if _auto_prefers_fused(x, variant) else "native"]
    check_choice(backend, "backend", ("auto", *_KERNELS))
    if backend == "reference":
        return _KERNELS["reference"]
    if mask is not None:
        raise ValueError(f"backend={backend!r} does not support mask; use 'auto' or 'reference'")
    if backend == "fused":
        require_fused()
        if not FusedKernel.serves_input(x):
            raise ValueError(
                "backend='fused' serves non-empty CPU tensors of a floating dtype with at least "
                f"2 dimensions; got a {x.dim()}D {x.dtype} tensor on {x.device} with "
                f"{x.numel()} elements (use backend='auto')"
            )
    return _KERNELS[backend]
