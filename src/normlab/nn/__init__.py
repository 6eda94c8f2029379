"""Normalization layers: drop-ins for ``torch.nn`` batch norm and its variants.

Every layer is a ``torch.nn.modules.batchnorm._BatchNorm`` (frozen layers excepted) whose
forward is :func:`normlab.functional.batch_norm_layer`; the variants differ only in what
they add to the one training path. Each layer kind is registered (:func:`describe`,
:func:`layer_class`) so that converters keep variants and options.
"""

import importlib
from typing import Any

from ._base import (
    ActivationOptions,
    LayerDescription,
    NormBase,
    describe,
    layer_class,
    registered_kinds,
)
from ._batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ._bnact import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from ._frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from ._ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from ._renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from ._split import SplitBatchNorm1d, SplitBatchNorm2d, SplitBatchNorm3d
from ._sync import SyncBatchNorm

__all__ = [
    "ActivationOptions",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "LayerDescription",
    "NormBase",
    "SplitBatchNorm1d",
    "SplitBatchNorm2d",
    "SplitBatchNorm3d",
    "SyncBatchNorm",
    "describe",
    "layer_class",
    "registered_kinds",
]


def __getattr__(name: str) -> Any:
    if name == "utils":  # loaded on first use: ``normlab.nn.utils.fold_batchnorm`` works
        module = importlib.import_module(".utils", __name__)
        globals()["utils"] = module
        return module
    raise AttributeError(f"module 'normlab.nn' has no attribute {name!r}")
