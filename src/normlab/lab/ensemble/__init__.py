"""Batched ensembles: K models of one architecture trained at once with stacked weights.

Each member has its own initialization, data order (its seed) and learning rate; the
K members run as one batched computation (:mod:`._stack`) trained with torch's own
optimizers (:mod:`._train`). On small MLPs this is several times faster than training
the members one after the other, with the same results up to rounding (tested).

Shapes: ``x`` ``(K, N, F)``; hidden ``(K, N, C)`` (images inside a ConvNet: ``(N, K·C, H, W)``);
logits ``(K, N, classes)``.
"""

from ._stack import (
    SHARED,
    Ensemble,
    StackedBatchNorm,
    StackedConv2d,
    StackedFlatten,
    StackedGroupNorm,
    StackedImages,
    StackedLayer,
    StackedLayerNorm,
    StackedLinear,
    channel_concat,
    member_major,
    register_stacker,
    stack_layers,
)
from ._train import (
    MemberResult,
    Probe,
    TrainConfig,
    evaluate,
    make_optimizer,
    member_batches,
    train_ensemble,
    train_step,
    training_device,
)

__all__ = [
    "SHARED",
    "Ensemble",
    "MemberResult",
    "Probe",
    "StackedBatchNorm",
    "StackedConv2d",
    "StackedFlatten",
    "StackedGroupNorm",
    "StackedImages",
    "StackedLayer",
    "StackedLayerNorm",
    "StackedLinear",
    "TrainConfig",
    "channel_concat",
    "evaluate",
    "make_optimizer",
    "member_batches",
    "member_major",
    "register_stacker",
    "stack_layers",
    "train_ensemble",
    "train_step",
    "training_device",
]
