"""Freeze BatchNorm layers so that the freeze survives ``model.train()``.

The usual recipe — ``bn.eval()`` after ``model.train()`` — is undone by the next
``model.train()`` call (every epoch, in most training loops). Here each frozen
layer gets an instance-level ``train`` that records the requested mode but keeps
the layer in eval mode, so ``model.train()`` cannot unfreeze it.
:func:`unfreeze_batchnorm` removes it and restores the requested mode and the
original ``requires_grad`` flags exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from ._common import has_running_stats, is_batchnorm, is_frozen_batchnorm

__all__ = ["FreezeMode", "freeze_batchnorm", "is_frozen", "unfreeze_batchnorm"]

FreezeMode = Literal["stats", "affine", "all"]
_MODES = ("stats", "affine", "all")
_STATE = "_normlab_freeze"


@dataclass
class _FreezeState:
    mode: FreezeMode
    requested_training: bool
    requires_grad: dict[str, bool] = field(default_factory=dict)


class _FrozenTrain:
    """Instance-level ``train`` of a stats-frozen BatchNorm: remembers the mode, stays in eval.

    A module-level class (not a bound function) so that frozen models still
    pickle and deep-copy.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        getattr(self.module, _STATE).requested_training = mode
        nn.Module.train(self.module, False)
        return self.module


def is_frozen(module: nn.Module) -> bool:
    """Whether ``module`` was frozen by :func:`freeze_batchnorm`.

    Parameters
    ----------
    module : nn.Module
        Any module (a layer, not a model: freezing marks each BatchNorm).

    Returns
    -------
    bool

    Examples
    --------
    >>> import torch
    >>> from normlab.nn.utils import freeze_batchnorm, is_frozen
    >>> model = freeze_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(3)))
    >>> is_frozen(model[0]), is_frozen(model)
    (True, False)
    """
    return isinstance(getattr(module, _STATE, None), _FreezeState)


def freeze_batchnorm(model: nn.Module, mode: FreezeMode = "stats") -> nn.Module:
    """Freeze every BatchNorm of ``model`` in place; the freeze survives ``model.train()``.

    Modes:
        ``"stats"``: running statistics are fixed and used in training too (the
        layer stays in eval mode: no EMA update, normalization by the running
        statistics, gradients still flow to γ/β and the input).
        ``"affine"``: γ and β get ``requires_grad=False``; statistics behave as usual.
        ``"all"``: both.

    Freezing an already frozen layer replaces its mode. ``FrozenBatchNorm*``
    layers are already frozen and are left alone.

    Parameters
    ----------
    model : nn.Module
        Frozen in place.
    mode : {"stats", "affine", "all"}
        What to freeze (see above); default ``"stats"``.

    Returns
    -------
    nn.Module
        ``model``.

    Raises
    ------
    ValueError
        An unknown ``mode``.

    Examples
    --------
    >>> import torch
    >>> from normlab.nn.utils import freeze_batchnorm, unfreeze_batchnorm
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    >>> freeze_batchnorm(model, "all").train()[1].training     # stays in eval mode
    False
    >>> model[1].weight.requires_grad
    False
    >>> unfreeze_batchnorm(model)[1].training, model[1].weight.requires_grad
    (True, True)
    """
    if mode not in _MODES:
        raise ValueError(f"freeze_batchnorm mode must be one of {_MODES}, got {mode!r}")
    layers = [
        (n, m) for n, m in model.named_modules() if is_batchnorm(m) and not is_frozen_batchnorm(m)
    ]
    if mode in ("stats", "all"):
        for name, m in layers:
            if not has_running_stats(m):
                raise ValueError(
                    f"freeze_batchnorm: {name or type(m).__name__} has no running statistics "
                    "(track_running_stats=False), so its statistics cannot be frozen; use mode='affine'"
                )
    for _, m in layers:
        if is_frozen(m):
            _unfreeze(m)
        state = _FreezeState(mode, m.training)
        if mode in ("affine", "all"):
            for pname, p in m.named_parameters(recurse=False):
                state.requires_grad[pname] = p.requires_grad
                p.requires_grad_(False)
        setattr(m, _STATE, state)
        if mode in ("stats", "all"):
            m.train = _FrozenTrain(m)
            nn.Module.train(m, False)
    return model


def _unfreeze(m: nn.Module) -> None:
    state: _FreezeState = getattr(m, _STATE)
    if isinstance(m.__dict__.get("train"), _FrozenTrain):
        del m.__dict__["train"]
        nn.Module.train(m, state.requested_training)
    for pname, p in m.named_parameters(recurse=False):
        if pname in state.requires_grad:
            p.requires_grad_(state.requires_grad[pname])
    delattr(m, _STATE)


def unfreeze_batchnorm(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_batchnorm` in place: original ``requires_grad`` flags, and each layer's
    training flag as last requested (by ``model.train()``/``eval()`` while frozen, or as it
    was when frozen). Layers that were not frozen are untouched.

    Parameters
    ----------
    model : nn.Module
        Unfrozen in place.

    Returns
    -------
    nn.Module
        ``model``.

    Examples
    --------
    >>> import torch
    >>> from normlab.nn.utils import freeze_batchnorm, is_frozen, unfreeze_batchnorm
    >>> model = freeze_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))
    >>> is_frozen(unfreeze_batchnorm(model)[0])
    False
    """
    for m in model.modules():
        if is_frozen(m):
            _unfreeze(m)
    return model
