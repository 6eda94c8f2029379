"""The math of normalization: statistics, their merge, normalize, closed-form backward."""

from ._backend import BACKENDS, Backend, BatchNormKernel, register_kernel, resolve_kernel
from ._batch_norm import (
    NonFinite,
    all_finite_host,
    batch_norm,
    batch_norm_train,
    check_batch_size,
    update_running_stats_,
)
from ._reference import ReferenceKernel, channel_view, normalize
from ._stats import accumulation_dtype, batch_norm_stats, merge_stats, reduce_dims

__all__ = [
    "BACKENDS",
    "Backend",
    "BatchNormKernel",
    "NonFinite",
    "ReferenceKernel",
    "accumulation_dtype",
    "all_finite_host",
    "batch_norm",
    "batch_norm_stats",
    "batch_norm_train",
    "channel_view",
    "check_batch_size",
    "merge_stats",
    "normalize",
    "reduce_dims",
    "register_kernel",
    "resolve_kernel",
    "update_running_stats_",
]
