"""What counts as "a BatchNorm" and "a foldable layer", and small module-tree helpers.

Models arrive with torch's ``BatchNorm*``, normlab's (``NormBase`` subclasses
``torch.nn.modules.batchnorm._BatchNorm``) or a ``FrozenBatchNorm*`` in the style
of detectron2/torchvision (plain buffers ``weight``, ``bias``, ``running_mean``,
``running_var`` and a float ``eps``; not a ``_BatchNorm``). All of them are
recognised here, by type or by duck typing, in one place.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = [
    "CONV_TYPES",
    "LINEAR_TYPES",
    "bn_affine",
    "bn_channel_axis",
    "has_running_stats",
    "is_batchnorm",
    "is_frozen_batchnorm",
    "set_submodule",
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
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,)


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """A ``FrozenBatchNorm*`` (detectron2/torchvision/normlab style): affine map from buffers only."""
    return type(module).__name__.startswith("FrozenBatchNorm") and has_running_stats(module)


def is_batchnorm(module: nn.Module) -> bool:
    """True for every batch-norm layer: torch's, normlab's (incl. variants) and ``FrozenBatchNorm*``.

    Instance norm is excluded even though it may carry running statistics: it
    normalizes per sample, not per batch. Other modules are recognised by duck
    typing: a class name containing ``BatchNorm`` with tensor ``running_mean``
    and ``running_var`` and an ``eps``.
    """
    if isinstance(module, _InstanceNorm):
        return False
    if isinstance(module, _BatchNorm):
        return True
    return (
        "BatchNorm" in type(module).__name__
        and has_running_stats(module)
        and hasattr(module, "eps")
    )


def has_running_stats(module: nn.Module) -> bool:
    """Whether the module holds tensor ``running_mean`` and ``running_var`` buffers."""
    return isinstance(getattr(module, "running_mean", None), Tensor) and isinstance(
        getattr(module, "running_var", None), Tensor
    )


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


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` of ``root`` by ``new``."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def module_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """dtype and device of the first floating-point parameter or buffer (float32/CPU if none)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.float32, torch.device("cpu")
