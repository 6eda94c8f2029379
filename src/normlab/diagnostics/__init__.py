"""Training diagnostics: per-layer monitors and probes of the optimization landscape.

* :class:`LayerMonitor` — hooks recording activation/gradient statistics per step and layer.
* :func:`train_eval_gap` — per batch norm, running vs population statistics and eval vs
  train output, ranked (which layer to recalibrate or freeze).
* :func:`internal_covariate_shift`, :func:`landscape_probe` (Santurkar et al. 2018) and
  :func:`gradient_report` (Bjorck et al. 2018) — measurements at one point that leave the
  model's parameters and buffers bit-exactly as they were.
"""

from ._gap import LayerGap, TrainEvalGap, train_eval_gap
from ._monitor import LayerMonitor
from ._probes import (
    GradientReport,
    LandscapeProbe,
    LayerShift,
    gradient_report,
    internal_covariate_shift,
    landscape_probe,
)

__all__ = [
    "GradientReport",
    "LandscapeProbe",
    "LayerGap",
    "LayerMonitor",
    "LayerShift",
    "TrainEvalGap",
    "gradient_report",
    "internal_covariate_shift",
    "landscape_probe",
    "train_eval_gap",
]
