"""Add BatchNorm to a plain ``nn.Sequential`` network, or remove it: plain-vs-BN comparisons."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from ...functional import Activation
from .._batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ._common import CONV_TYPES, is_batchnorm

__all__ = ["add_batchnorm", "remove_batchnorm"]

Position = Literal["before_activation", "after_activation"]
_POSITIONS = ("before_activation", "after_activation")
_NOT_ACTIVATIONS = (nn.MultiheadAttention, nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d)
# spatial dims of the layer's output -> BatchNorm class (0 = Linear, (N, features))
_DEFAULT_CLASSES: dict[int, Callable[..., nn.Module]] = {
    0: BatchNorm1d,
    1: BatchNorm1d,
    2: BatchNorm2d,
    3: BatchNorm3d,
}


def _is_activation(module: nn.Module) -> bool:
    return type(module).__module__ == "torch.nn.modules.activation" and not isinstance(
        module, _NOT_ACTIVATIONS
    )


def _layer_info(module: nn.Module) -> tuple[int, int] | None:
    """``(spatial dims, output channels)`` of a Conv*/ConvTranspose*/Linear, else ``None``."""
    for cls, (spatial, _) in CONV_TYPES.items():
        if isinstance(module, cls):
            return spatial, int(module.out_channels)  # type: ignore[arg-type]
    if isinstance(module, nn.Linear):
        return 0, module.out_features
    return None


def _sequentials(model: nn.Module) -> list[nn.Sequential]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward
    ]


def _rebuild(seq: nn.Sequential, items: list[tuple[str | None, nn.Module]]) -> None:
    """Replace ``seq``'s children by ``items`` (``None`` name = new module); renumber digit keys."""
    numbered = all(name is None or name.isdigit() for name, _ in items)
    new: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (name, module) in enumerate(items):
        if numbered:
            key = str(i)
        else:
            key = name if name is not None else f"{items[i - 1][0]}_bn"
            while key in new:
                key += "_"
        new[key] = module
    seq._modules = new


def add_batchnorm(
    model: nn.Sequential,
    position: Position = "before_activation",
    *,
    bn_classes: Mapping[int, Callable[..., nn.Module]] | None = None,
    **bn_kwargs: Any,
) -> nn.Sequential:
    """Insert a BatchNorm after every Conv*/ConvTranspose*/Linear of a Sequential model, in place.

    ``position="before_activation"``: ``layer → BN → act`` (Ioffe & Szegedy's
    placement); ``"after_activation"``: ``layer → act → BN``. A layer not followed
    by an activation gets its BN directly after it either way. When the BN
    directly follows the layer, the layer's bias is removed (``bias=None``): BN
    subtracts the batch mean, so a bias there is a wasted parameter. Nested
    ``nn.Sequential`` containers are handled at any depth; layers already followed
    by a BatchNorm are left as they are.

    Parameters
    ----------
    model : nn.Sequential
        Changed in place.
    position : {"before_activation", "after_activation"}
        Where the BN goes relative to the activation.
    bn_classes : mapping of int to class, optional
        BatchNorm class per output spatial rank (``0`` for Linear), default normlab's
        ``BatchNorm1d/1d/2d/3d``.
    **bn_kwargs
        Passed to every BN constructor (``eps``, ``momentum``, …).

    Returns
    -------
    nn.Sequential
        ``model``. Children with digit names are renumbered, so parameter names after the
        first insertion change.

    Examples
    --------
    >>> import torch
    >>> from normlab.nn.utils import add_batchnorm, remove_batchnorm
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> [type(m).__name__ for m in add_batchnorm(model)]
    ['Linear', 'BatchNorm1d', 'ReLU', 'Linear', 'BatchNorm1d']
    >>> model[0].bias is None                       # BN after it: the bias was redundant
    True
    >>> [type(m).__name__ for m in remove_batchnorm(model)], model[0].bias is None
    (['Linear', 'ReLU', 'Linear'], False)
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"add_batchnorm expects an nn.Sequential model, got {type(model).__name__}")
    if position not in _POSITIONS:
        raise ValueError(f"position must be one of {_POSITIONS}, got {position!r}")
    classes = {**_DEFAULT_CLASSES, **(bn_classes or {})}
    for seq in _sequentials(model):
        old: list[tuple[str | None, nn.Module]] = list(seq._modules.items())
        items: list[tuple[str | None, nn.Module]] = []
        i = 0
        while i < len(old):
            name, module = old[i]
            items.append((name, module))
            i += 1
            info = _layer_info(module)
            if info is None:
                continue
            nxt = old[i][1] if i < len(old) else None
            after_act = position == "after_activation" and nxt is not None and _is_activation(nxt)
            following = (old[i + 1][1] if i + 1 < len(old) else None) if after_act else nxt
            if following is not None and is_batchnorm(following):
                continue
            spatial, channels = info
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            bn = classes[spatial](channels, **bn_kwargs).to(
                device=weight.device, dtype=weight.dtype
            )
            if after_act:
                items.append(old[i])
                i += 1
            else:
                module.bias = None  # type: ignore[assignment]  # BN's beta takes over
            items.append((None, bn))
        _rebuild(seq, items)
    return model


def remove_batchnorm(model: nn.Module) -> nn.Module:
    """Remove every BatchNorm of ``model`` in place (the reverse of :func:`add_batchnorm`).

    Inside ``nn.Sequential`` containers (any depth) BatchNorm children are
    dropped, and a Conv*/Linear directly before one that has no bias gets a
    trainable zero bias back; a BatchNorm anywhere else becomes ``nn.Identity``.
    A batch norm with a fused activation (``BatchNormAct*``, or a Sync/Frozen layer with
    ``activation``) leaves its activation module in its place.

    Parameters
    ----------
    model : nn.Module
        Changed in place.

    Returns
    -------
    nn.Module
        ``model``, or what replaces ``model`` if it is itself a BatchNorm (``nn.Identity()``,
        or its activation module).

    Examples
    --------
    >>> import torch
    >>> from normlab.nn.utils import remove_batchnorm
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4))
    >>> remove_batchnorm(model)
    Sequential(
      (0): Conv2d(3, 4, kernel_size=(3, 3), stride=(1, 1))
    )
    """
    if is_batchnorm(model):
        return _leftover(model) or nn.Identity()
    for seq in _sequentials(model):
        items: list[tuple[str | None, nn.Module]] = []
        for name, module in seq._modules.items():
            if module is not None and is_batchnorm(module):
                prev = items[-1][1] if items else None
                if prev is not None and _layer_info(prev) is not None and prev.bias is None:
                    weight = prev.weight
                    assert isinstance(weight, torch.Tensor)
                    channels = _layer_info(prev)[1]
                    prev.bias = nn.Parameter(weight.new_zeros(channels))
                act = _leftover(module)
                if act is not None:
                    items.append((name, act))
                continue
            assert module is not None
            items.append((name, module))
        _rebuild(seq, items)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if is_batchnorm(child):
                setattr(parent, name, _leftover(child) or nn.Identity())
    return model


def _leftover(bn: nn.Module) -> nn.Module | None:
    """The activation module a batch norm with a fused activation leaves behind, else None."""
    act = getattr(bn, "act", None)
    return act.module() if isinstance(act, Activation) and act.name != "identity" else None
