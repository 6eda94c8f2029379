"""Swap every BatchNorm of a model for another BatchNorm class, keeping parameters, buffers and options."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from .._convert import build_like, replace_batchnorms, transfer_state

__all__ = ["convert_batchnorm"]

Target = type[nn.Module] | Mapping[type[nn.Module], type[nn.Module]]


def convert_batchnorm(model: nn.Module, target_cls: Target, **kwargs: Any) -> nn.Module:
    """Replace every BatchNorm of ``model`` by ``target_cls``, keeping parameters, buffers and options.

    Each layer becomes ``target_cls(num_features, <the source's settings>, **kwargs)`` on the
    source's device and dtype, and receives copies of its ``weight``, ``bias``,
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` (``requires_grad`` and the
    training flag kept). Works between torch's ``BatchNorm*``, normlab's and its variants
    (``BatchNormAct2d``, ``BatchRenorm2d``, ``GhostBatchNorm2d``, ``SyncBatchNorm``, …) and
    ``FrozenBatchNorm*``. Settings the target cannot take are dropped only where that
    changes nothing you did not ask for (the source kind's own options such as Renorm's
    limits, training-only options going into a frozen layer, default values); any other —
    an activation, ``nonfinite="raise"``, ``channel_axis=-1`` — raises.

    Parameters
    ----------
    model : nn.Module
        Converted in place (children replaced); a model that *is* a BatchNorm is returned
        converted.
    target_cls : type or mapping
        A class, or a mapping from source class to target class (for models mixing
        ``BatchNorm1d`` and ``BatchNorm2d``); layers whose exact class is not a key are left
        alone.
    **kwargs
        Settings for every new layer (override the source's).

    Returns
    -------
    nn.Module
        The converted model (``model`` itself unless ``model`` is a BatchNorm).

    Raises
    ------
    ValueError
        A source setting or tensor has no counterpart (or another shape) in the new layer.
    TypeError
        ``target_cls`` is not a class/mapping, or its constructor rejects the arguments.

    Examples
    --------
    >>> import torch, normlab
    >>> from normlab.nn.utils import convert_batchnorm
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> model = convert_batchnorm(model, normlab.nn.BatchNorm2d, nonfinite="raise")
    >>> model[1]
    BatchNorm2d(8, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True, nonfinite='raise')
    """
    if isinstance(target_cls, Mapping):
        mapping: Callable[[nn.Module], type[nn.Module] | None] = lambda m: target_cls.get(type(m))  # noqa: E731
    elif isinstance(target_cls, type) and issubclass(target_cls, nn.Module):
        mapping = lambda m: target_cls  # noqa: E731
    else:
        raise TypeError(
            "convert_batchnorm: target_cls must be an nn.Module class or a mapping of classes, "
            f"got {target_cls!r}"
        )

    def convert(bn: nn.Module, path: str) -> nn.Module | None:
        target = mapping(bn)
        if target is None:
            return None
        new = build_like(bn, target, path=path, overrides=kwargs)
        transfer_state(bn, new, path=path, share=False)
        return new

    return replace_batchnorms(model, convert)
