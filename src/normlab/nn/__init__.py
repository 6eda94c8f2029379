"""Normalization layers: drop-ins for ``torch.nn`` batch norm and its variants."""

from ._batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, NormBase

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "NormBase"]
