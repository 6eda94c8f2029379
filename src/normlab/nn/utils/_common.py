"""Small module-tree helpers of the model tools: foldable layer types, a BatchNorm's affine
parameters, eps and channel axis, the statistics of the input a hook sees, and a snapshot of
the running buffers. "Is this a batch norm" is :mod:`normlab._norms`'s."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..._norms import has_running_stats, is_batchnorm, is_frozen_batchnorm
from ...functional import batch_norm_stats
from .._split import _SplitBatchNorm

__all__ = [
    "CONV_TYPES",
    "RunningState",
    "batch_input",
    "bn_affine",
    "bn_channel_axis",
    "bn_eps",
    "has_running_stats",
    "hooked_input",
    "input_stats",
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


def batch_input(batch: Any, owner: str) -> Tensor:
    """The model input of a batch: the batch itself, or the first element of a tuple/list."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(
        f"{owner}: data must yield tensors or tuples/lists whose first element is the input "
        f"tensor, got {type(batch).__name__}"
    )


def hooked_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
    """``(input, mask)`` of a batch-norm call, from a hook registered with ``with_kwargs=True``."""
    x = args[0] if args else kwargs.get("input")
    mask = args[1] if len(args) > 1 else kwargs.get("mask")
    if not isinstance(x, Tensor):
        raise TypeError(f"a batch norm was called with a {type(x).__name__}, not a tensor")
    return x, mask


def input_stats(module: nn.Module, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel ``(mean, biased var, count)`` of the part of ``x`` that ``module``'s own
    running statistics come from in training: all of it — but only the first part for a split
    layer (its other parts go to its auxiliary layers). :func:`batch_norm_stats`, on the
    layer's channel axis."""
    if isinstance(module, _SplitBatchNorm) and x.shape[0] % module.num_splits == 0:
        size = x.shape[0] // module.num_splits
        x = x[:size]
        mask = mask[:size] if mask is not None else None
    axis = bn_channel_axis(module) if x.dim() > 2 else 1
    return batch_norm_stats(x.detach(), channel_axis=axis, mask=mask)


class RunningState:
    """A batch norm's ``running_mean``, ``running_var`` and ``num_batches_tracked``, saved and
    put back in place.

    Written through ``.data``, as ATen's own running update is: the buffers' version counters
    do not move, so a backward pending through torch's ``BatchNorm`` (which saves the running
    buffers) stays valid.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.saved = {name: t.detach().clone() for name, t in self.tensors().items()}

    def tensors(self) -> dict[str, Tensor]:
        """The module's running buffers that exist (``.data`` views)."""
        names = ("running_mean", "running_var", "num_batches_tracked")
        return {n: t.data for n in names if isinstance(t := getattr(self.module, n, None), Tensor)}

    def restore(self) -> None:
        for name, t in self.tensors().items():
            t.copy_(self.saved[name])
