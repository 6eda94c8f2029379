r"""The functional entry points: :func:`batch_norm` (torch's signature) and :func:`batch_norm_train`."""

from __future__ import annotations

from torch import Tensor

from ._activation import Activation
from ._backend import resolve_kernel
from ._checks import check_channels, check_choice, check_eps, check_input, check_momentum
from ._layer import LayerSpec, batch_norm_layer, check_batch_size
from ._running import NONFINITE, NonFinite
from ._train import Correction, Plan, train

__all__ = ["batch_norm", "batch_norm_train"]


def batch_norm_train(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    mask: Tensor | None = None,
    backend: str = "auto",
    activation: Activation | None = None,
    chunks: list[int] | None = None,
    correction: Correction | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize ``input`` ``(N, C, *)`` with its own batch statistics: ``(y, mean, var)``.

    ``var`` is biased; both statistics are in the accumulation dtype, without gradient,
    ``(C,)`` — or ``(len(chunks), C)`` when ``chunks`` (sizes of consecutive batch chunks,
    each normalized with its own statistics) is given. ``activation`` follows the affine map;
    ``correction(mean, var) -> (r, d)`` (per channel, no gradient) turns the output into
    ``weight·(r·x̂ + d) + bias`` — Batch Renormalization — at plain batch-norm cost.

    Parameters
    ----------
    input : Tensor, shape (N, C, *)
        Floating point.
    weight : Tensor of shape (C,) or None
        γ.
    bias : Tensor of shape (C,) or None
        β.
    eps : float
        Added to the variance.
    mask : Tensor of bool, optional
        Valid positions, the input's shape without the channel axis.
    backend : str
        See :func:`batch_norm`.
    activation : Activation, optional
        Applied after the affine map (:func:`make_activation`).
    chunks : list of int, optional
        Sizes of consecutive batch chunks (:func:`ghost_chunks`).
    correction : callable, optional
        ``(mean, var) -> (r, d)`` (:func:`renorm_correction`).

    Returns
    -------
    (Tensor, Tensor, Tensor)
        ``y`` (the input's shape), ``mean`` and biased ``var``.

    Examples
    --------
    >>> import torch
    >>> from normlab.functional import batch_norm_train, ghost_chunks, make_activation
    >>> x = torch.randn(12, 4, requires_grad=True)
    >>> y, mean, var = batch_norm_train(x, None, None, 1e-5, activation=make_activation("relu"),
    ...                                 chunks=ghost_chunks(12, 6))
    >>> y.shape, mean.shape, bool((y >= 0).all())
    (torch.Size([12, 4]), torch.Size([2, 4]), True)
    >>> y.sum().backward()                               # the closed-form backward
    """
    check_input(input)
    check_channels(input, weight=weight, bias=bias)
    eps = check_eps(eps)
    check_batch_size(input, mask)
    per_sample = input.numel() // max(1, input.shape[0] * input.shape[1])
    if chunks is not None and (
        sum(chunks) != input.shape[0] or min(chunks) < 1 or min(chunks) * per_sample < 2
    ):
        raise ValueError(
            "chunks must be positive sizes summing to the batch size "
            f"{input.shape[0]}, each with more than 1 value per channel; got {chunks}"
        )
    if chunks is not None and mask is not None:
        raise ValueError("batch_norm_train: chunks and mask cannot be combined")
    variant = activation is not None or chunks is not None or correction is not None
    kernel = resolve_kernel(backend, input, mask=mask, variant=variant)
    result = train(input, weight, bias, Plan(kernel, eps, activation, chunks, correction), mask)
    return result.y, result.mean, result.var


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    mask: Tensor | None = None,
    backend: str = "auto",
    nonfinite: NonFinite = "propagate",
) -> Tensor:
    r"""Batch normalization with :func:`torch.nn.functional.batch_norm`'s arguments and results.

    .. math::
        y = \gamma\,\frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    In training, :math:`\mu, \sigma^2` are the batch mean and biased variance per channel
    (axis 1) over ``n = N * prod(spatial)`` values, and the running buffers, when given,
    are updated in place as torch does: ``running = (1 - momentum) * running + momentum *
    batch`` with the unbiased variance ``var * n / (n - 1)``. In eval, the running
    statistics are used.

    Parameters
    ----------
    input : Tensor
        ``(N, C, *)``, floating point.
    running_mean, running_var : Tensor or None
        ``(C,)`` buffers; required in eval (``training=False``).
    weight, bias : Tensor or None
        ``(C,)`` affine parameters γ and β.
    training : bool
        Batch statistics (True) or running statistics (False).
    momentum : float
        In ``[0, 1]``.
    eps : float
        Added to the variance; ``>= 0``.
    mask : Tensor, optional
        bool, the input's shape without the channel axis: statistics use only ``True``
        positions; masked positions output ``bias`` (finite whatever they hold), in
        training and in eval alike.
    backend : str
        ``"auto"`` (fastest correct path), ``"reference"`` (plain torch ops, the oracle),
        ``"native"`` (ATen), ``"fused"`` (normlab's C++ kernels; raises if they cannot be
        built or do not serve the input).
    nonfinite : str
        For channels whose batch statistics are NaN/Inf: ``"propagate"`` (torch),
        ``"skip"`` (warns, leaves those channels' running statistics unchanged) or
        ``"raise"``.

    Returns
    -------
    Tensor
        The normalized input, same shape, dtype and memory layout.

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(8, 3, 4, 4)
    >>> rm, rv = torch.zeros(3), torch.ones(3)
    >>> y = batch_norm(x, rm, rv, training=True)
    >>> torch.allclose(y, torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3), training=True), atol=1e-6)
    True

    The training path's backward is the closed form
    ``dx = γ/σ · (dy − mean(dy) − x̂·mean(dy·x̂))``; double backward is supported.
    """
    check_input(input)
    if not training and (running_mean is None or running_var is None):
        raise ValueError(
            "batch_norm in eval mode (training=False) needs running_mean and running_var"
        )
    if (running_mean is None and running_var is not None) or (
        running_var is None and running_mean is not None
    ):
        raise ValueError("batch_norm needs both running_mean and running_var, or neither")
    momentum = check_momentum(momentum)  # type: ignore[assignment]
    if momentum is None:
        raise ValueError(
            "batch_norm needs a float momentum (None, the cumulative average, is a layer option)"
        )
    spec = LayerSpec(
        name="batch_norm",
        num_features=input.shape[1],
        training=training,
        momentum=momentum,
        eps=check_eps(eps),
        nonfinite=check_choice(nonfinite, "nonfinite", NONFINITE),
        backend=backend,
    )
    return batch_norm_layer(input, mask, running_mean, running_var, None, weight, bias, spec)
