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

from ..kernels import FusedKernel, NativeKernel, fused_available, host_function, require_fused
from ._activation import Activation
from ._checks import check_choice
from ._reference import ReferenceKernel

__all__ = [
    "BACKENDS",
    "FUSED_BF16_MIN_SPATIAL",
    "FUSED_MIN_NUMEL",
    "FUSED_NCHW_FP32_MIN_NUMEL",
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
    Every method is a static method; :func:`register_kernel` makes a new kernel available
    as ``backend=name``.

    Attributes
    ----------
    name : str
        The backend name.
    activations : frozenset of str
        Activations the kernel fuses into its passes (others are composed after it).
    chunked : bool
        Whether it takes ``chunks`` (Ghost BN) in one call.
    differentiable : bool
        ``forward_train`` is differentiable itself (ATen's own autograd).

    Examples
    --------
    >>> import torch
    >>> from normlab.functional import resolve_kernel
    >>> kernel = resolve_kernel("reference", torch.randn(4, 3))
    >>> kernel.name, kernel.chunked, "relu" in kernel.activations
    ('reference', True, True)
    """

    name: str
    activations: frozenset[str]
    chunked: bool
    differentiable: bool  # forward_train is differentiable itself (ATen's own autograd)

    @staticmethod
    def serves(x: Tensor) -> bool:
        """Whether the kernel computes batch norm of ``x`` (device, dtype, rank).

        Parameters
        ----------
        x : Tensor
            The input, ``(N, C, *)``.

        Returns
        -------
        bool
        """
        ...

    @staticmethod
    def stats(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-channel ``(mean, biased var)`` of ``x``, in the accumulation dtype.

        Parameters
        ----------
        x : Tensor, shape (N, C, *)
            The input.
        mask : Tensor of bool, optional
            Valid positions (the reference kernel only).

        Returns
        -------
        (Tensor, Tensor)
            Each of shape ``(C,)``.
        """
        ...

    @staticmethod
    def forward_train(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        act: Activation | None = None,
        chunks: list[int] | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Training forward with the batch's own statistics.

        Parameters
        ----------
        x : Tensor, shape (N, C, *)
            The input.
        weight : Tensor of shape (C,) or None
            γ.
        bias : Tensor of shape (C,) or None
            β.
        eps : float
            Added to the variance.
        act : Activation, optional
            An activation listed in ``activations``.
        chunks : list of int, optional
            Batch chunks (``chunked`` kernels).
        mask : Tensor of bool, optional
            Valid positions (the reference kernel only).

        Returns
        -------
        (Tensor, Tensor, Tensor, Tensor)
            ``(y, mean, var, invstd)``: ``y`` of ``x``'s shape; statistics ``(C,)`` (or
            ``(G·C,)`` with chunks), ``var`` biased.
        """
        ...

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
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Closed-form gradients of :meth:`forward_train`.

        Parameters
        ----------
        dy : Tensor
            The gradient with respect to ``y``, ``x``'s shape.
        x : Tensor, shape (N, C, *)
            The forward's input.
        weight : Tensor of shape (C,) or None
            γ.
        bias : Tensor of shape (C,) or None
            β.
        mean : Tensor
            The forward's mean.
        invstd : Tensor
            The forward's ``1/sqrt(var + eps)``.
        needs : (bool, bool, bool)
            Which of ``(dx, dweight, dbias)`` to compute.
        act : Activation, optional
            The forward's activation.
        chunks : list of int, optional
            The forward's chunks.
        mask : Tensor of bool, optional
            The forward's mask.

        Returns
        -------
        (Tensor or None, Tensor or None, Tensor or None)
            ``(dx, dweight, dbias)``; ``None`` where ``needs`` is False.
        """
        ...

    @staticmethod
    def forward_eval(
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        act: Activation | None = None,
    ) -> Tensor:
        """Normalize with given statistics (the running ones in eval).

        Parameters
        ----------
        x : Tensor, shape (N, C, *)
            The input.
        mean : Tensor, shape (C,)
            The mean to subtract.
        var : Tensor, shape (C,)
            The variance to divide by (with ``eps``).
        weight : Tensor of shape (C,) or None
            γ.
        bias : Tensor of shape (C,) or None
            β.
        eps : float
            Added to the variance.
        act : Activation, optional
            An activation listed in ``activations``.

        Returns
        -------
        Tensor
            ``x``'s shape and dtype.
        """
        ...

    @staticmethod
    def invert(
        y: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        act: Activation | None,
    ) -> Tensor | None:
        """``x̂``-based input rebuilt from the output ``y = f(γ·x̂ + β)`` (memory-saving BN+act).

        Parameters
        ----------
        y : Tensor, shape (N, C, *)
            The forward's output.
        mean : Tensor, shape (C,)
            The forward's mean.
        invstd : Tensor, shape (C,)
            The forward's ``1/sqrt(var + eps)``.
        weight : Tensor of shape (C,) or None
            γ.
        bias : Tensor of shape (C,) or None
            β.
        act : Activation or None
            An invertible activation.

        Returns
        -------
        Tensor or None
            The input, ``y``'s shape; ``None`` when the kernel does not do this itself.
        """
        ...


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
# fp32 NCHW (planes of at least FUSED_NCHW_MIN_SPATIAL values) from far fewer: ATen's CPU
# training kernel is slowest there (measured: fwd+bwd 0.87x and fwd 0.52x of torch at
# (8, 64, 14, 14), equal fwd+bwd and 0.6x fwd at 2^16 elements; docs/performance.md)
FUSED_NCHW_FP32_MIN_NUMEL = 1 << 16
FUSED_NCHW_MIN_SPATIAL = 16
# bf16 NCHW with planes of 256 to 1023 values stays on ATen (measured slower,
# docs/performance.md); planes under 256 take the kernels' masked short-run path where it is
# compiled (AVX-512 with BF16: measured 0.66-0.92x torch fwd+bwd at 7x7 and 14x14)
FUSED_BF16_MIN_SPATIAL = 1024
FUSED_SHORT_RUN = 256
_FUSED_AUTO_DTYPES = (torch.float32, torch.bfloat16)


def register_kernel(name: str, kernel: BatchNormKernel) -> None:
    """Make ``kernel`` available as ``backend=name``.

    Parameters
    ----------
    name : str
        The backend name (replaces a kernel registered under it).
    kernel : BatchNormKernel
        An object with the protocol's attributes and static methods.

    Examples
    --------
    >>> import torch
    >>> from normlab.functional import ReferenceKernel, register_kernel, resolve_kernel
    >>> x = torch.randn(4, 2)
    >>> original = resolve_kernel("reference", x)
    >>> class Counting(ReferenceKernel):
    ...     calls = 0
    ...     @staticmethod
    ...     def stats(x, chunks=None, mask=None):
    ...         Counting.calls += 1
    ...         return ReferenceKernel.stats(x, chunks, mask)
    >>> register_kernel("reference", Counting())
    >>> type(resolve_kernel("reference", x)).__name__
    'Counting'
    >>> register_kernel("reference", original)          # put the original back
    """
    _KERNELS[name] = kernel


def _large_enough(x: Tensor) -> bool:
    n = x.numel()
    if n >= FUSED_MIN_NUMEL:
        return True
    return (
        n >= FUSED_NCHW_FP32_MIN_NUMEL
        and x.dtype == torch.float32
        and x.dim() > 2
        and x.is_contiguous()
        and n // (x.shape[0] * x.shape[1]) >= FUSED_NCHW_MIN_SPATIAL
    )


def _auto_prefers_fused(x: Tensor, variant: bool) -> bool:
    if not FusedKernel.serves_input(x):
        return False
    if variant:  # the layer pays for a Python autograd.Function either way
        return fused_available()
    if x.dtype not in _FUSED_AUTO_DTYPES:
        return False
    nchw_bf16 = x.dtype == torch.bfloat16 and x.dim() > 2 and x.is_contiguous()  # (N, C, S)
    if nchw_bf16:
        spatial = x.numel() // (x.shape[0] * x.shape[1])
        if spatial < FUSED_BF16_MIN_SPATIAL:
            short_runs = host_function("short_runs")
            return spatial < FUSED_SHORT_RUN and short_runs is not None and bool(short_runs())
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
    (fp32/bf16, ``FUSED_MIN_NUMEL`` elements; fp32 NCHW with planes of 16 values or more from
    ``FUSED_NCHW_FP32_MIN_NUMEL``) or ``variant`` (the call runs normlab's
    autograd Function anyway: an activation, chunks, a correction); else ``native``.

    ``differentiable``: the call needs a kernel whose ``forward_eval`` autograd can
    differentiate (eval with gradients, e.g. fine-tuning with frozen statistics): the fused
    kernels' is not, so ATen's — the same affine map — serves instead, ``"fused"`` included.

    An explicit backend that cannot serve the call raises: ``"fused"`` when the kernels
    cannot be built or loaded (:class:`~normlab.kernels.KernelError`, with the reason) or
    for an input they do not serve; any backend but ``"reference"`` with a mask.

    Parameters
    ----------
    backend : str
        ``"auto"``, or a registered backend (``"reference"``, ``"native"``, ``"fused"``, …).
    x : Tensor, shape (N, C, *)
        The input.
    mask : Tensor of bool, optional
        Valid positions.
    variant : bool
        The call needs normlab's training Function anyway (activation, chunks, correction).
    differentiable : bool
        The call needs an eval forward that autograd can differentiate (see above).

    Returns
    -------
    BatchNormKernel

    Raises
    ------
    ValueError
        An unknown backend, a mask for a backend without masks, or an input the fused
        kernels do not serve.
    KernelError
        ``backend="fused"`` and the kernels cannot be built or loaded.

    Examples
    --------
    >>> import torch
    >>> from normlab.functional import resolve_kernel
    >>> x = torch.randn(4, 3, 5)
    >>> resolve_kernel("auto", x, mask=torch.ones(4, 5, dtype=torch.bool)).name
    'reference'
    >>> resolve_kernel("auto", x).name           # small plain input: ATen
    'native'
    """
    if backend == "auto" and mask is None:  # the common case first, in as few calls as it takes
        if (
            torch.compiler.is_compiling()
        ):  # compiled graphs are not vmapped (dynamo cannot trace the check)
            return _KERNELS["native"]
        if torch._C._functorch.is_functorch_wrapped_tensor(x):  # vmap/grad need pure ops
            return _KERNELS["reference"]
        if (variant or _large_enough(x)) and _auto_prefers_fused(x, variant):
            return _KERNELS["native"] if differentiable else _KERNELS["fused"]
        return _KERNELS["native"]
    kernel = _resolve(backend, x, mask)
    if differentiable and not kernel.differentiable and kernel.name != "reference":
        return _KERNELS["native"]
    return kernel


def _resolve(backend: str, x: Tensor, mask: Tensor | None) -> BatchNormKernel:
    if backend == "auto":  # masked
        return _KERNELS["reference"]
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
