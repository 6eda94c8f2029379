"""What counts as a normalization layer, and the ``torch.fx`` leaf rule — defined once, here.

Models arrive with torch's ``BatchNorm*``, normlab's layers (subclasses of
``torch.nn.modules.batchnorm._BatchNorm``), or a ``FrozenBatchNorm*`` in the style of
detectron2/torchvision (buffers ``weight``, ``bias``, ``running_mean``, ``running_var``
and a float ``eps``; not a ``_BatchNorm``). Every part of normlab that asks "is this a
batch norm?" — model tools, initialization, diagnostics, the lab — asks this module.
"""

from __future__ import annotations

from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = [
    "NormLeafTracer",
    "batchnorms_with_running_stats",
    "has_running_stats",
    "is_batchnorm",
    "is_frozen_batchnorm",
    "is_norm_layer",
]


def has_running_stats(module: nn.Module) -> bool:
    """Whether the module holds tensor ``running_mean`` and ``running_var`` buffers."""
    return isinstance(getattr(module, "running_mean", None), Tensor) and isinstance(
        getattr(module, "running_var", None), Tensor
    )


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """A ``FrozenBatchNorm*`` (detectron2/torchvision/normlab style): an affine map from buffers."""
    return type(module).__name__.startswith("FrozenBatchNorm") and has_running_stats(module)


def is_batchnorm(module: nn.Module) -> bool:
    """True for every batch-norm layer: torch's, normlab's (every variant) and ``FrozenBatchNorm*``.

    Instance norm is excluded even though it may carry running statistics: it normalizes
    per sample, not per batch. Other modules are recognised by duck typing: a class name
    containing ``BatchNorm`` with tensor ``running_mean`` and ``running_var`` and an ``eps``.

    Parameters
    ----------
    module : nn.Module
        Any module.

    Returns
    -------
    bool

    Examples
    --------
    >>> import torch, normlab
    >>> is_batchnorm(torch.nn.BatchNorm2d(4)), is_batchnorm(normlab.nn.GhostBatchNorm1d(4))
    (True, True)
    >>> is_batchnorm(torch.nn.InstanceNorm2d(4, track_running_stats=True))
    False
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


def batchnorms_with_running_stats(model: nn.Module) -> dict[str, nn.Module]:
    """``{path: layer}`` for every batch norm of ``model`` that keeps running statistics it can
    move (frozen layers excluded), in ``named_modules`` order — what recalibration, the
    train/eval gap and gradient accumulation work on.

    Examples
    --------
    >>> import torch, normlab
    >>> model = torch.nn.Sequential(torch.nn.BatchNorm1d(3), normlab.nn.FrozenBatchNorm1d(3))
    >>> list(batchnorms_with_running_stats(model))
    ['0']
    """
    return {
        path: m
        for path, m in model.named_modules()
        if is_batchnorm(m) and has_running_stats(m) and not is_frozen_batchnorm(m)
    }


def is_norm_layer(module: nn.Module) -> bool:
    """A batch norm (see :func:`is_batchnorm`), ``LayerNorm``, ``GroupNorm`` or instance norm."""
    return is_batchnorm(module) or isinstance(
        module, nn.LayerNorm | nn.GroupNorm | _InstanceNorm | nn.RMSNorm
    )


class NormLeafTracer(fx.Tracer):
    """A ``torch.fx`` tracer that records every normalization layer as one ``call_module`` node.

    torch's own tracer does this for ``torch.nn`` layers only; normlab's layers trace by
    themselves too (as one ``call_function``), but model tools need to see the module.
    Constructed as :class:`torch.fx.Tracer`; :meth:`is_leaf_module` is the only change.

    Parameters
    ----------
    autowrap_modules : tuple of modules
        As :class:`torch.fx.Tracer`.
    autowrap_functions : tuple of callables
        As :class:`torch.fx.Tracer`.
    param_shapes_constant : bool
        As :class:`torch.fx.Tracer`.

    Examples
    --------
    >>> import torch, normlab
    >>> from normlab.nn.utils import NormLeafTracer
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), normlab.nn.BatchNorm1d(3))
    >>> graph = NormLeafTracer().trace(model)
    >>> [n.op for n in graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Whether ``m`` is recorded as one node: every normalization layer, and torch's leaves.

        Parameters
        ----------
        m : nn.Module
            The module met while tracing.
        module_qualified_name : str
            Its path in the model.

        Returns
        -------
        bool

        Examples
        --------
        >>> import torch
        >>> from normlab.nn.utils import NormLeafTracer
        >>> NormLeafTracer().is_leaf_module(torch.nn.GroupNorm(2, 4), "norm")
        True
        """
        return is_norm_layer(m) or super().is_leaf_module(m, module_qualified_name)
