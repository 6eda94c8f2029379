"""Fast batch-norm kernels behind ``backend=``.

A kernel implements :class:`normlab.functional.BatchNormKernel` (channel axis 1): ``native``
wraps ATen; ``fused`` is normlab's C++/OpenMP code, compiled once per machine into a private
cache (:mod:`._build`: ``normlab kernels build``, ``normlab kernels status``). Kernels never
import from the rest of normlab.
"""

from ._build import (
    KernelError,
    KernelStatus,
    build_kernels,
    host_function,
    kernel_status,
    require_fused,
)
from ._fused import FusedKernel, fused_available
from ._native import NativeKernel

__all__ = [
    "FusedKernel",
    "KernelError",
    "KernelStatus",
    "NativeKernel",
    "build_kernels",
    "fused_available",
    "host_function",
    "kernel_status",
    "require_fused",
]
