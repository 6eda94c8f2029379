"""Swap every BatchNorm of a model for another BatchNorm class, keeping parameters and buffers."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._common import bn_eps, is_batchnorm

__all__ = ["convert_batchnorm"]

Target = type[nn.Module] | Mapping[type[nn.Module], type[nn.Module]]
_STATE_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _hyperparameters(bn: nn.Module, target_cls: type[nn.Module]) -> dict[str, Any]:
    """The source layer's settings that ``target_cls``'s constructor accepts."""
    weight = getattr(bn, "weight", None)
    settings: dict[str, Any] = {
        "eps": bn_eps(bn),
        "momentum": getattr(bn, "momentum", 0.1),
        "affine": isinstance(weight, Tensor),
        "track_running_stats": isinstance(getattr(bn, "running_mean", None), Tensor),
    }
    try:
        params = inspect.signature(target_cls).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return settings
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return settings
    return {k: v for k, v in settings.items() if k in params}


def _convert_one(
    bn: nn.Module, target_cls: type[nn.Module], path: str, kwargs: dict[str, Any]
) -> nn.Module:
    num_features = getattr(bn, "num_features", None)
    if num_features is None:
        assert isinstance(bn.running_mean, Tensor)
        num_features = bn.running_mean.numel()
    settings = {**_hyperparameters(bn, target_cls), **kwargs}
    try:
        new = target_cls(num_features, **settings)
    except TypeError as error:
        raise TypeError(
            f"convert_batchnorm: cannot build {target_cls.__name__}({num_features}, "
            f"{', '.join(f'{k}={v!r}' for k, v in settings.items())}) for {path}: {error}"
        ) from error
    sample = next((t for t in (*bn.parameters(), *bn.buffers()) if t.is_floating_point()), None)
    if sample is not None:
        new = new.to(device=sample.device, dtype=sample.dtype)
    with torch.no_grad():
        for name in _STATE_NAMES:
            src = getattr(bn, name, None)
            dst = getattr(new, name, None)
            if not isinstance(src, Tensor):
                continue
            if not isinstance(dst, Tensor):
                if name == "num_batches_tracked":  # e.g. FrozenBatchNorm keeps no counter
                    continue
                raise ValueError(
                    f"convert_batchnorm: {path} has a {name!r} tensor but the new "
                    f"{target_cls.__name__} has none; it would be lost (check affine / "
                    "track_running_stats)"
                )
            if dst.shape != src.shape:
                raise ValueError(
                    f"convert_batchnorm: {path}.{name} has shape {tuple(src.shape)}, the new "
                    f"{target_cls.__name__} expects {tuple(dst.shape)}"
                )
            dst.copy_(src)
            if isinstance(src, nn.Parameter) and isinstance(dst, nn.Parameter):
                dst.requires_grad_(src.requires_grad)
    new.train(bn.training)
    return new


def convert_batchnorm(model: nn.Module, target_cls: Target, **kwargs: Any) -> nn.Module:
    """Replace every BatchNorm of ``model`` by ``target_cls``, keeping parameters and buffers.

    Each layer becomes ``target_cls(num_features, eps=…, momentum=…, affine=…,
    track_running_stats=…, **kwargs)`` — the source's settings, where the target's
    constructor takes them, overridden by ``kwargs`` — on the source's device and
    dtype, and receives the source's ``weight``, ``bias``, ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` (``requires_grad`` and the training
    flag kept). Works between torch's ``BatchNorm*``, normlab's and its variants
    (``BatchRenorm2d``, ``GhostBatchNorm2d``, …) and ``FrozenBatchNorm*``.

    Args:
        model: converted in place (children replaced); a model that *is* a
            BatchNorm is returned converted.
        target_cls: a class, or a mapping from source class to target class (for
            models mixing ``BatchNorm1d`` and ``BatchNorm2d``); layers whose exact
            class is not a key are left alone.
        **kwargs: extra constructor arguments for every new layer.

    Returns:
        The converted model (``model`` itself unless ``model`` is a BatchNorm).

    Raises:
        ValueError: a source tensor has no counterpart (or another shape) in the new layer.
        TypeError: ``target_cls`` is not a class/mapping, or its constructor rejects the arguments.
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

    def convert(module: nn.Module, path: str) -> nn.Module:
        target = mapping(module) if is_batchnorm(module) else None
        if target is not None:
            return _convert_one(module, target, path or "<model>", kwargs)
        for name, child in list(module.named_children()):
            new = convert(child, f"{path}.{name}" if path else name)
            if new is not child:
                setattr(module, name, new)
        return module

    return convert(model, "")
