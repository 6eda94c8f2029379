"""Model tools: fold, recalibrate, freeze, convert, add/remove and audit BatchNorm layers.

Every function works on models built with torch's ``BatchNorm*`` as well as
normlab's (and ``FrozenBatchNorm*``): users bring their existing models.
"""

from ._accumulate import accumulate_batchnorm
from ._audit import AuditReport, Finding, audit_batchnorm
from ._common import is_batchnorm
from ._convert import convert_batchnorm
from ._fold import (
    FoldReport,
    NormLeafTracer,
    fold_batchnorm,
    fold_bn_conv_weights,
    fold_conv_bn_weights,
)
from ._freeze import FreezeMode, freeze_batchnorm, is_frozen, unfreeze_batchnorm
from ._func import replace_all_batch_norm_modules_
from ._momentum import KerasBatchNorm, batchnorm_from_keras, convert_momentum
from ._recalibrate import recalibrate_batchnorm
from ._surgery import add_batchnorm, remove_batchnorm

__all__ = [
    "AuditReport",
    "Finding",
    "FoldReport",
    "FreezeMode",
    "KerasBatchNorm",
    "NormLeafTracer",
    "accumulate_batchnorm",
    "add_batchnorm",
    "audit_batchnorm",
    "batchnorm_from_keras",
    "convert_batchnorm",
    "convert_momentum",
    "fold_batchnorm",
    "fold_bn_conv_weights",
    "fold_conv_bn_weights",
    "freeze_batchnorm",
    "is_batchnorm",
    "is_frozen",
    "recalibrate_batchnorm",
    "remove_batchnorm",
    "replace_all_batch_norm_modules_",
    "unfreeze_batchnorm",
]
