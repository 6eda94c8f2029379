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
    """Convert a BatchNorm momentum between conventions (``"torch"``, ``"keras"``, ``"flax"``)."""
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
    """``BatchNorm1d`` over the last axis with Keras' update: the *biased* batch variance
    goes into the moving variance (torch uses the unbiased one)."""

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
    biased moving-variance update. ``gamma``/``beta`` may be ``None`` (``center``/
    ``scale`` off in Keras).
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
