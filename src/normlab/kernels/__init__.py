"""Fast batch-norm kernels behind ``backend=``.

A kernel is any object with the static methods of
:class:`normlab.functional.BatchNormKernel` (``forward_train``, ``backward_train``,
``stats``, ``forward_eval``), channel axis 1. ``native`` wraps ATen; the performance work
adds ``fused`` (C++/OpenMP, JIT-compiled on first use) here. Kernels never import from the rest of normlab.
"""

from ._fused import (
    FusedKernel,
    batch_norm_act_train,
    fused_available,
    fused_forward_eval,
    fused_serves,
    invert_batch_norm_act,
)
from ._native import NativeKernel

__all__ = [
    "FusedKernel",
    "NativeKernel",
    "batch_norm_act_train",
    "fused_available",
    "fused_forward_eval",
    "fused_serves",
    "invert_batch_norm_act",
]
