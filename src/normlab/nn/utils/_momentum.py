r"""Momentum conventions, and BatchNorm from Keras weights.

torch: ``running = (1 - m)·running + m·batch`` (default ``m = 0.1``);
Keras / Flax: ``running = m'·running + (1 - m')·batch`` (default ``m' = 0.99``).
So ``m' = 1 - m``: a Keras ``momentum=0.99`` is torch's ``momentum=0.01``, and a
torch model given ``momentum=0.99`` forgets almost everything at every step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._batchnorm import BatchNorm1d

__all__ = ["CONVENTIONS", "KerasBatchNorm", "batchnorm_from_keras", "convert_momentum"]

CONVENTIONS = ("torch", "keras", "flax")


def convert_momentum(value: float, source: str, target: str) -> float:
    """Convert a BatchNorm momentum between conventions.

    torch's ``m`` weighs the batch: ``running = (1 − m)·running + m·batch``; Keras' and
    Flax's ``m'`` weighs the old value, so ``m' = 1 − m``.

    Parameters
    ----------
    value : float
        The momentum in ``source``'s convention, in ``[0, 1]``.
    source : {"torch", "keras", "flax"}
        Its convention.
    target : {"torch", "keras", "flax"}
        The convention wanted.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        An unknown convention, or ``value`` outside ``[0, 1]``.

    Examples
    --------
    >>> from normlab.nn.utils import convert_momentum
    >>> convert_momentum(0.99, "keras", "torch")
    0.01...
    >>> convert_momentum(0.1, "torch", "flax")
    0.9
    """
    for name in (source, target):
        if name not in CONVENTIONS:
            raise ValueError(
                f"unknown momentum convention {name!r}; expected one of {', '.join(CONVENTIONS)}"
            )
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {value}")
    as_torch = value if source == "torch" else 1.0 - value
    return as_torch if target == "torch" else 1.0 - as_torch


class KerasBatchNorm(BatchNorm1d):
    """``BatchNorm1d`` with Keras' update: the *biased* batch variance goes into the moving
    variance (torch uses the unbiased one). :func:`batchnorm_from_keras` builds one.

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels.
    eps : float
        Added to the variance (Keras' ``epsilon``).
    momentum : float or None
        torch's convention (:func:`convert_momentum` turns Keras' into it).
    affine : bool
        Learnable γ and β.
    track_running_stats : bool
        Keep moving statistics.
    device : torch.device or str, optional
        Where parameters and buffers are created.
    dtype : torch.dtype, optional
        Their dtype.
    bias : bool
        A learnable β with ``affine``.
    nonfinite : str
        See :class:`normlab.nn.NormBase`.
    single_sample : str
        See :class:`normlab.nn.NormBase`.
    backend : str
        See :class:`normlab.nn.NormBase`.
    channel_axis : {1, -1}
        ``-1`` (as Keras) takes ``(N, ..., C)`` input.

    Examples
    --------
    >>> import torch
    >>> from normlab.nn.utils import KerasBatchNorm
    >>> bn = KerasBatchNorm(3, momentum=1.0, channel_axis=-1)
    >>> x = torch.randn(10, 3)
    >>> _ = bn(x)
    >>> torch.allclose(bn.running_var, x.var(0, unbiased=False))
    True
    """

    def _variant_spec(self) -> dict[str, Any]:
        return {"unbiased_running_var": False}


def _tensor(a: Any) -> Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float32)


def batchnorm_from_keras(
    gamma: Any,
    beta: Any,
    moving_mean: Any,
    moving_variance: Any,
    *,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
) -> KerasBatchNorm:
    """A BatchNorm over the last axis whose outputs equal Keras' ``BatchNormalization`` in both modes.

    Keras normalizes the last axis (``(N, C)`` or ``(N, …, C)``): the module uses
    ``channel_axis=-1``, ``eps=epsilon``, torch momentum ``1 - momentum`` and Keras'
    biased moving-variance update.

    Parameters
    ----------
    gamma : array-like of shape (C,) or None
        Keras' ``gamma`` (``None`` when ``scale=False``: ones).
    beta : array-like of shape (C,) or None
        Keras' ``beta`` (``None`` when ``center=False``: zeros).
    moving_mean : array-like of shape (C,)
        Keras' ``moving_mean``.
    moving_variance : array-like of shape (C,)
        Keras' ``moving_variance``.
    momentum : float
        Keras' momentum (default 0.99, i.e. torch's 0.01).
    epsilon : float
        Keras' epsilon (default 1e-3).

    Returns
    -------
    KerasBatchNorm
        Takes ``(N, C)`` or ``(N, ..., C)`` input.

    Raises
    ------
    ValueError
        The moving statistics are not 1-D of the same length.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from normlab.nn.utils import batchnorm_from_keras
    >>> bn = batchnorm_from_keras(np.ones(4), np.zeros(4), np.full(4, 2.0), np.full(4, 4.0)).eval()
    >>> bn(torch.full((1, 4), 4.0))                      # (4 - 2) / sqrt(4 + 1e-3)
    tensor([[0.9999, 0.9999, 0.9999, 0.9999]], grad_fn=...)
    """
    mean, var = _tensor(moving_mean), _tensor(moving_variance)
    if mean.dim() != 1 or mean.shape != var.shape:
        raise ValueError(
            f"moving_mean and moving_variance must be 1-D of the same length, got {tuple(mean.shape)} and {tuple(var.shape)}"
        )
    bn = KerasBatchNorm(
        mean.numel(),
        eps=epsilon,
        momentum=convert_momentum(momentum, "keras", "torch"),
        channel_axis=-1,
    )
    with torch.no_grad():
        bn.weight.copy_(_tensor(gamma) if gamma is not None else torch.ones_like(mean))
        bn.bias.copy_(_tensor(beta) if beta is not None else torch.zeros_like(mean))
        assert bn.running_mean is not None and bn.running_var is not None
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    return bn
