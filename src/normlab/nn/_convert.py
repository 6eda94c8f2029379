"""The one conversion core: rebuild a batch-norm layer as another class, keeping what it means.

Every converter — ``SyncBatchNorm.convert_sync_batchnorm`` / ``revert_sync_batchnorm``,
``FrozenBatchNorm*.convert_frozen_batchnorm``, :func:`normlab.nn.utils.convert_batchnorm` —
reads the source with :func:`~normlab.nn._base.describe` and builds the target with
:func:`rebuild`. An option the target cannot take is dropped only when that changes nothing
the conversion did not ask for:

* the backend (every backend computes the same);
* the source kind's own options when the kind changes (Renorm's limits, Ghost's virtual
  batch, Sync's process group, Split's number of splits) — that is what converting to
  another kind means;
* training-only options when the target is a frozen (inference) layer;
* a default value, or an activation that is the identity.

Anything else — an activation, ``nonfinite="raise"``, ``channel_axis=-1``, a momentum of
0.01 going into a class without it — is refused with an error naming the layer and option.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .._norms import is_batchnorm
from ._base import describe

__all__ = ["build_like", "replace_batchnorms", "transfer_state"]

_KIND_OWN = {
    "renorm": {"r_max", "d_max"},
    "ghost": {"virtual_batch_size"},
    "sync": {"process_group"},
    "split": {"num_splits"},
}
_TRAINING_ONLY = {
    "momentum",
    "track_running_stats",
    "nonfinite",
    "single_sample",
    "backend",
    "affine",
    "bias",
    "r_max",
    "d_max",
    "virtual_batch_size",
    "process_group",
}
_DEFAULTS: dict[str, Any] = {
    "eps": 1e-5,
    "momentum": 0.1,
    "affine": True,
    "track_running_stats": True,
    "bias": True,
    "nonfinite": "skip",
    "single_sample": "raise",
    "backend": "auto",
    "channel_axis": 1,
    "negative_slope": 0.01,
    "alpha": 1.0,
    "process_group": None,
}
_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


_ACCEPTED: dict[type[nn.Module], frozenset[str]] = {}


def _accepted(cls: type[nn.Module]) -> frozenset[str]:
    """The keyword arguments ``cls``'s constructor takes (through ``**options`` too)."""
    if cls not in _ACCEPTED:
        _ACCEPTED[cls] = _signature_names(cls)
    return _ACCEPTED[cls]


def _signature_names(cls: type[nn.Module]) -> frozenset[str]:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return frozenset()
    names = {p for p in params if p != "self"}
    for base in cls.__mro__[1:]:  # **options forwarded to a base's keyword arguments
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            init = base.__dict__.get("__init__")
            if init is not None:
                params = inspect.signature(init).parameters
                names |= {p for p in params if p != "self"}
    return frozenset(names - {"options", "kwargs", "device", "dtype"})


def _droppable(name: str, value: Any, config: dict[str, Any], source: str, target: str) -> bool:
    if name == "backend":  # a choice of speed: every backend computes the same
        return True
    if name in _KIND_OWN.get(source, ()) and source != target:
        return True
    if target == "frozen" and name in _TRAINING_ONLY:
        return True
    activation = config.get("activation")
    if name == "activation":
        return value in (None, "identity")
    if name == "negative_slope" and activation != "leaky_relu":
        return True
    if name == "alpha" and activation != "elu":
        return True
    return name in _DEFAULTS and _same(value, _DEFAULTS[name])


def _same(a: Any, b: Any) -> bool:
    return (
        a is b
        or (type(a) is type(b) and a == b)
        or (
            isinstance(a, float | int)
            and isinstance(b, float | int)
            and not isinstance(a, bool)
            and a == b
        )
    )


def build_like(
    source: nn.Module,
    target_cls: type[nn.Module],
    *,
    path: str = "<model>",
    overrides: dict[str, Any] | None = None,
) -> nn.Module:
    """A new ``target_cls`` with ``source``'s settings (see the module doc for what may be
    dropped), on its device and dtype, in its training mode — without its state (see
    :func:`transfer_state`). ``overrides`` replace settings (and are always kept)."""
    description = describe(source)
    config = {**description.config, **(overrides or {})}
    accepted = _accepted(target_cls)
    target_kind = getattr(target_cls, "kind", "batchnorm")
    kwargs = {}
    for name, value in config.items():
        if name in accepted or (overrides and name in overrides):
            kwargs[name] = value  # an override the target rejects fails in its constructor
        elif not _droppable(name, value, config, description.kind, target_kind):
            raise ValueError(
                f"cannot convert {path} ({type(source).__name__}) to {target_cls.__name__}: "
                f"it has {name}={value!r}, which {target_cls.__name__} cannot represent"
                + (
                    "; use a normlab layer that takes it"
                    if not getattr(target_cls, "__module__", "").startswith("normlab")
                    else ""
                )
            )
    num_features = kwargs.pop("num_features")
    try:
        new = target_cls(num_features, **kwargs)
    except TypeError as error:
        raise TypeError(
            f"cannot build {target_cls.__name__}({num_features}, "
            f"{', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) for {path}: {error}"
        ) from error
    sample = next(
        (t for t in (*source.parameters(), *source.buffers()) if t.is_floating_point()), None
    )
    if sample is not None:
        new = new.to(device=sample.device, dtype=sample.dtype)
    new.train(source.training)
    return new


def transfer_state(source: nn.Module, target: nn.Module, *, path: str, share: bool) -> None:
    """Give ``target`` the ``weight``, ``bias``, running buffers and counter of ``source``:
    the same tensors (``share``, as torch's ``convert_sync_batchnorm``, so an optimizer built
    before keeps working) or copies. A source tensor the target has no place for is an error."""
    with torch.no_grad():
        for name in _STATE:
            src = getattr(source, name, None)
            if not isinstance(src, Tensor):
                continue
            dst = getattr(target, name, None)
            if not isinstance(dst, Tensor):
                if name == "num_batches_tracked":  # e.g. a frozen layer keeps no counter
                    continue
                raise ValueError(
                    f"{path} has a {name!r} tensor but the new {type(target).__name__} has none; "
                    "it would be lost (check affine / bias / track_running_stats)"
                )
            if dst.shape != src.shape:
                raise ValueError(
                    f"{path}.{name} has shape {tuple(src.shape)}, the new "
                    f"{type(target).__name__} expects {tuple(dst.shape)}"
                )
            same_kind = isinstance(src, nn.Parameter) == isinstance(dst, nn.Parameter)
            if share and same_kind:
                setattr(target, name, src)
            else:
                dst.copy_(src)
                if isinstance(src, nn.Parameter) and isinstance(dst, nn.Parameter):
                    dst.requires_grad_(src.requires_grad)
    for attr in ("qconfig",):
        if hasattr(source, attr):
            setattr(target, attr, getattr(source, attr))


def replace_batchnorms(
    model: nn.Module, convert: Callable[[nn.Module, str], nn.Module | None]
) -> nn.Module:
    """Replace every batch norm ``m`` at ``path`` in ``model`` by ``convert(m, path)`` (``None``
    keeps it); returns the model (the converted layer when ``model`` is a batch norm)."""

    def walk(module: nn.Module, path: str) -> nn.Module:
        if is_batchnorm(module):
            new = convert(module, path or "<model>")
            if new is not None:
                return new
        for name, child in list(module.named_children()):
            new_child = walk(child, f"{path}.{name}" if path else name)
            if new_child is not child:
                setattr(module, name, new_child)
        return module

    return walk(model, "")
