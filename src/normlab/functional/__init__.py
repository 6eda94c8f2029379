"""The math of normalization: statistics, their merge, normalize, closed-form backward.

The one training path (:mod:`._train`), the one backend decision (:func:`resolve_kernel`),
argument validation (:mod:`._checks`) and a layer's whole forward as a function of its
state (:func:`batch_norm_layer`) live here; :mod:`normlab.nn` holds parameters and buffers.
"""

from ._activation import ACTIVATIONS, Activation, make_activation
from ._backend import BACKENDS, Backend, BatchNormKernel, register_kernel, resolve_kernel
from ._batch_norm import batch_norm, batch_norm_train
from ._layer import SINGLE_SAMPLE, LayerSpec, batch_norm_layer, check_batch_size
from ._reference import ReferenceKernel, channel_view, normalize
from ._running import NONFINITE, NonFinite, nonfinite_channels, update_running_stats_
from ._stats import accumulation_dtype, batch_norm_stats, merge_stats, reduce_dims
from ._train import Correction, Plan, Reducer
from ._variants import Ramp, ghost_chunks, renorm_correction

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "NONFINITE",
    "SINGLE_SAMPLE",
    "Activation",
    "Backend",
    "BatchNormKernel",
    "Correction",
    "LayerSpec",
    "NonFinite",
    "Plan",
    "Ramp",
    "Reducer",
    "ReferenceKernel",
    "accumulation_dtype",
    "batch_norm",
    "batch_norm_layer",
    "batch_norm_stats",
    "batch_norm_train",
    "channel_view",
    "check_batch_size",
    "ghost_chunks",
    "make_activation",
    "merge_stats",
    "nonfinite_channels",
    "normalize",
    "reduce_dims",
    "register_kernel",
    "renorm_correction",
    "resolve_kernel",
    "update_running_stats_",
]
