"""Normalization layers: drop-ins for ``torch.nn`` batch norm and its variants."""

from ._batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, NormBase
from ._bnact import BatchNormAct1d, BatchNormAct2d
from ._frozen import FrozenBatchNorm2d
from ._ghost import GhostBatchNorm1d, GhostBatchNorm2d
from ._renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from ._sync import SyncBatchNorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNorm2d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "NormBase",
    "SyncBatchNorm",
]
