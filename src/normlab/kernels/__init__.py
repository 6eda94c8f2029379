"""Fast batch-norm kernels behind ``backend=``.

A kernel is any object with the three static methods of
:class:`normlab.functional.BatchNormKernel` (``forward_train``, ``backward_train``,
``forward_eval``), channel axis 1. ``native`` wraps ATen; the performance work
adds ``fused`` here. Kernels never import from the rest of normlab.
"""

from ._native import NativeKernel

__all__ = ["NativeKernel"]
