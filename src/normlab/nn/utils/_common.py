"""Small module-tree helpers of the model tools: foldable layer types, a BatchNorm's affine
parameters, eps and channel axis. "Is this a batch norm" is :mod:`normlab._norms`'s."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..._norms import has_running_stats, is_batchnorm, is_frozen_batchnorm

__all__ = [
    "CONV_TYPES",
    "bn_affine",
    "bn_channel_axis",
    "bn_eps",
    "has_running_stats",
    "is_batchnorm",
    "is_frozen_batchnorm",
    "module_dtype_device",
]

# (class, spatial dims, transposed)
CONV_TYPES: dict[type[nn.Module], tuple[int, bool]] = {
    nn.Conv1d: (1, False),
    nn.Conv2d: (2, False),
    nn.Conv3d: (3, False),
    nn.ConvTranspose1d: (1, True),
    nn.ConvTranspose2d: (2, True),
    nn.ConvTranspose3d: (3, True),
}


def bn_channel_axis(module: nn.Module) -> int:
    """The channel axis a BatchNorm normalizes (normlab's ``BatchNorm1d`` may use ``-1``)."""
    return int(getattr(module, "channel_axis", 1))


def bn_affine(module: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    """``(gamma, beta)`` of a BatchNorm, ``None`` where it is not affine."""
    gamma = getattr(module, "weight", None)
    beta = getattr(module, "bias", None)
    return (
        gamma if isinstance(gamma, Tensor) else None,
        beta if isinstance(beta, Tensor) else None,
    )


def bn_eps(module: nn.Module) -> float:
    eps = module.eps
    return float(eps.item()) if isinstance(eps, Tensor) else float(eps)  # type: ignore[arg-type]


def module_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """dtype and device of the first floating-point parameter or buffer (float32/CPU if none)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.float32, torch.device("cpu")
