r"""``train_eval_gap``: where a model's batch norms behave differently in eval than in training.

"Works in train mode, garbage in eval" is the most common batch-norm complaint. In training a
layer normalizes with the statistics of the batch; in eval with its running statistics. When
those are far from the statistics of the data — too few or too noisy updates, a momentum that
forgot too fast, weights that kept moving, a distribution shift, NaN — the eval output drifts
from the train output, and the drift compounds through later layers. This probe measures, per
layer, on the data the user gives:

* how far the running statistics are from the *population* statistics of the layer's input
  (every batch merged exactly, :func:`normlab.functional.merge_stats`). ``stats_gap`` is the
  RMS error that normalizing with the running statistics instead of the population ones makes
  on the population, in normalized units (RMS over channels):

  .. math::
      \text{stats\_gap}^2 = \frac1C\sum_c \Big(\frac{\mu_c - \hat\mu_c}{\hat s_c}\Big)^2
      + \sigma_c^2\Big(\frac1{\hat s_c} - \frac1{s_c}\Big)^2,\qquad
      \hat s_c = \sqrt{\hat\sigma_c^2 + \epsilon},\ s_c = \sqrt{\sigma_c^2 + \epsilon}

  (:math:`\hat\mu, \hat\sigma^2`: running; :math:`\mu, \sigma^2`: population), with the worst
  channel's ``mean_shift`` :math:`|\hat\mu_c - \mu_c| / s_c` and ``var_ratio``
  :math:`\max(\hat s_c^2 / s_c^2,\ s_c^2 / \hat s_c^2)` beside it. It is what a recalibration
  fixes: a layer is ``flagged`` when it exceeds the threshold;
* how much the layer's eval-mode output differs from its train-mode output on the same input,
  relative to the spread of the train-mode output (per channel centered, over every batch
  :math:`b`):

  .. math::
      \text{output\_gap} = \sqrt{\frac{\sum_b \sum_i (y^{\text{eval}}_{bi} - y^{\text{train}}_{bi})^2}
      {\sum_b \sum_i (y^{\text{train}}_{bi} - \bar y^{\text{train}}_{b,c(i)})^2}}

  — what a user sees, and the ranking. It includes the noise of the batch statistics
  themselves (about :math:`\sqrt{1.5/n}` for ``n`` values per channel and batch, Gaussian
  data), so a layer with a large ``output_gap`` but a small ``stats_gap`` is not helped by
  recalibrating: its *training* side is noisy (small batches) — freeze it
  (``freeze_batchnorm``), or use larger batches or Batch Renorm.

Inputs are those of training: batch norms run in training mode and every other module in eval
mode, as :func:`normlab.nn.utils.recalibrate_batchnorm` runs them, so the population statistics
here are what a recalibration over the same data would aim at, and ``flagged`` can be handed to
it (``layers=``). The model is left bit-exactly as it was: buffers, parameters, ``.grad``,
training flags and the RNG state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, overload

import torch
from torch import Tensor, nn

from .._norms import batchnorms_with_running_stats
from .._table import render_table
from ..functional import batch_norm_stats, merge_stats
from ..nn.utils._common import (
    RunningState,
    batch_input,
    bn_channel_axis,
    bn_eps,
    hooked_input,
    input_stats,
    module_dtype_device,
)

__all__ = ["LayerGap", "TrainEvalGap", "train_eval_gap"]


@dataclass(frozen=True)
class LayerGap:
    """One batch norm's train/eval disagreement (see :func:`train_eval_gap` for the formulas).

    Attributes
    ----------
    layer : str
        Module path (``""`` for a model that is itself a batch norm).
    type : str
        The layer's class name.
    output_gap : float
        RMS(eval output − train output) / spread of the train output.
    stats_gap : float
        RMS error of normalizing the population with the running statistics instead of its own.
    mean_shift : float
        Worst channel's ``|running_mean − μ| / σ`` (population μ, σ).
    var_ratio : float
        Worst channel's ratio of running to population variance (≥ 1, either way).
    batches : int
        Batches the layer saw.

    Examples
    --------
    >>> import torch
    >>> from normlab.diagnostics import train_eval_gap
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    >>> gap = train_eval_gap(model, [torch.randn(32, 4) + 3 for _ in range(4)])
    >>> worst = gap[0]
    >>> worst.layer, worst.type, worst.stats_gap > 0.5   # fresh running stats: far off
    ('1', 'BatchNorm1d', True)
    """

    layer: str
    type: str
    output_gap: float
    stats_gap: float
    mean_shift: float
    var_ratio: float
    batches: int

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict.

        Returns
        -------
        dict
        """
        return asdict(self)


@dataclass
class TrainEvalGap:
    """:func:`train_eval_gap`'s answer: a sequence of :class:`LayerGap`, worst first.

    ``flagged`` lists the layers whose ``stats_gap`` exceeds ``threshold`` (in rank order),
    ready for ``recalibrate_batchnorm(model, data, layers=gap.flagged)``.

    Parameters
    ----------
    layers : list of LayerGap
        One entry per batch norm, ranked by ``output_gap``, worst first.
    threshold : float
        ``stats_gap`` above which a layer is flagged for recalibration (default 0.1).

    Examples
    --------
    >>> import torch
    >>> from normlab.diagnostics import train_eval_gap
    >>> from normlab.nn.utils import recalibrate_batchnorm
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    >>> data = [torch.randn(32, 4) + 3 for _ in range(4)]
    >>> gap = train_eval_gap(model, data)
    >>> gap.flagged
    ['1']
    >>> _ = recalibrate_batchnorm(model, data, progress=False, layers=gap.flagged)
    >>> train_eval_gap(model, data).flagged
    []
    """

    layers: list[LayerGap] = field(default_factory=list)
    threshold: float = 0.1

    @property
    def flagged(self) -> list[str]:
        """The paths of the layers whose ``stats_gap`` exceeds ``threshold``, in rank order."""
        return [g.layer for g in self.layers if not g.stats_gap <= self.threshold]

    @overload
    def __getitem__(self, index: int) -> LayerGap: ...
    @overload
    def __getitem__(self, index: slice) -> list[LayerGap]: ...
    def __getitem__(self, index: int | slice) -> LayerGap | list[LayerGap]:
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerGap]:
        return iter(self.layers)

    def __str__(self) -> str:
        flagged = set(self.flagged)
        rows = [
            (
                g.layer or "<model>",
                g.type,
                f"{g.output_gap:.3g}",
                f"{g.stats_gap:.3g}",
                f"{g.mean_shift:.3g}",
                f"{g.var_ratio:.3g}",
                "recalibrate" if g.layer in flagged else "",
            )
            for g in self.layers
        ]
        title = (
            f"train/eval gap: {len(flagged)} of {len(self.layers)} batch norm(s) above "
            f"{self.threshold:g}"
        )
        columns = [
            "layer",
            "type",
            "output gap",
            "stats gap",
            "mean shift (σ)",
            "var ratio",
            "action",
        ]
        return render_table(title, columns, rows)


class _Probe:
    """Hooks of one layer: population statistics, eval-vs-train output sums."""

    def __init__(self, module: nn.Module, path: str, state: RunningState) -> None:
        self.module, self.path, self.state = module, path, state
        self.stats: tuple[Tensor, Tensor, Tensor] | None = None
        self.eval_output: Tensor | None = None
        self.diff = 0.0  # Σ (y_eval − y_train)²
        self.spread = 0.0  # Σ (y_train − its channel mean)²
        self.batches = 0

    def before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not module.training:  # kept in eval (freeze_batchnorm): no gap by construction
            return
        x, mask = hooked_input(args, kwargs)
        mean, var, count = input_stats(module, x, mask)
        new = (mean.double(), var.double(), count.double())
        self.stats = new if self.stats is None else merge_stats(*self.stats, *new)
        nn.Module.train(module, False)
        try:
            self.eval_output = module.forward(*args, **kwargs)  # no hooks: this layer only
        finally:
            nn.Module.train(module, True)

    def after(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if self.eval_output is None or not isinstance(output, Tensor):
            return
        _, mask = hooked_input(args, kwargs)
        y = output.detach().double()
        diff = self.eval_output.double() - y
        axis = bn_channel_axis(module) if y.dim() > 2 else 1
        if mask is not None:  # only valid positions (the others output β in both modes)
            keep = mask.unsqueeze(axis % y.dim())
            diff = torch.where(keep, diff, 0.0)
        _, var, count = batch_norm_stats(y, channel_axis=axis, mask=mask)
        self.diff += float(diff.square().sum())
        self.spread += float((var * count).sum())
        self.batches += 1
        self.eval_output = None
        self.state.restore()  # the next batch sees the same running statistics

    def result(self) -> LayerGap:
        m = self.module
        assert self.stats is not None
        mean, var, _ = self.stats
        eps = bn_eps(m)
        rm, rv = m.running_mean, m.running_var
        assert isinstance(rm, Tensor) and isinstance(rv, Tensor)
        rm, rv = rm.detach().double(), rv.detach().double()
        s_run, s_pop = (rv + eps).sqrt(), (var + eps).sqrt()  # (C,) each
        per_channel = ((mean - rm) / s_run).square() + var * (1 / s_run - 1 / s_pop).square()
        stats_gap = float(per_channel.mean().sqrt())
        shift = float(((rm - mean).abs() / s_pop).max())
        ratio = float((2 * (s_run / s_pop).log().abs()).max().exp())
        gap = math.sqrt(self.diff / self.spread) if self.spread > 0 else math.nan
        return LayerGap(self.path, type(m).__name__, gap, stats_gap, shift, ratio, self.batches)


def _rank(g: LayerGap) -> float:
    return math.inf if math.isnan(g.output_gap) else g.output_gap


def train_eval_gap(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    threshold: float = 0.1,
) -> TrainEvalGap:
    """Per batch norm: running vs population statistics, and eval vs train output, ranked.

    Runs the model over ``batches`` under ``torch.no_grad()`` with its batch norms in
    training mode and every other module in eval mode (as a recalibration does). At each
    batch norm, for every batch, a hook records the statistics of the layer's input (merged
    over batches: the population statistics) and the layer's own output in both modes on
    that input. See the module docstring for the three measures. The model is left
    bit-exactly as it was.

    Parameters
    ----------
    model : nn.Module
        A model with torch's or normlab's batch norms (``FrozenBatchNorm*``, layers without
        running statistics and layers frozen in eval mode by ``freeze_batchnorm`` have no
        gap and are not listed).
    batches : iterable
        Input tensors, or tuples/lists whose first element is the input (a DataLoader);
        moved to the model's device.
    num_batches : int, optional
        Use at most this many batches (default: all).
    threshold : float
        ``stats_gap`` above which a layer is ``flagged`` (for recalibration).

    Returns
    -------
    TrainEvalGap
        The layers, largest ``output_gap`` first (NaN — non-finite statistics — first of all).

    Raises
    ------
    ValueError
        No batch norm with running statistics, no batches, or ``num_batches < 1``.

    Examples
    --------
    >>> import torch
    >>> from normlab.diagnostics import train_eval_gap
    >>> from normlab.nn.utils import recalibrate_batchnorm
    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
    ...                             torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
    >>> data = [3 + 2 * torch.randn(64, 4) for _ in range(4)]   # running stats never saw it
    >>> gap = train_eval_gap(model, data)
    >>> gap.flagged
    ['1', '4']
    >>> _ = recalibrate_batchnorm(model, data, layers=gap.flagged, progress=False)
    >>> train_eval_gap(model, data).flagged
    []
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"train_eval_gap expects an nn.Module, got {type(model).__name__}")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}")
    if not (isinstance(threshold, float | int) and math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    layers = batchnorms_with_running_stats(model)
    if not layers:
        raise ValueError("train_eval_gap: the model has no batch norm with running statistics")
    _, device = module_dtype_device(model)
    flags = {m: m.training for m in model.modules()}
    states = {path: RunningState(m) for path, m in layers.items()}
    probes = {path: _Probe(m, path, states[path]) for path, m in layers.items()}
    handles = []
    for path, m in layers.items():
        handles.append(m.register_forward_pre_hook(probes[path].before, with_kwargs=True))
        handles.append(m.register_forward_hook(probes[path].after, with_kwargs=True))
    cuda = [device.index or 0] if device.type == "cuda" else []
    seen = 0
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            model.eval()
            for m in layers.values():
                m.train()
            for batch in batches:
                if num_batches is not None and seen >= num_batches:
                    break
                model(batch_input(batch, "train_eval_gap").to(device))
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.training = flag
        for state in states.values():
            state.restore()
    if seen == 0:
        raise ValueError("train_eval_gap: batches yielded no batch")
    results = [p.result() for p in probes.values() if p.batches]
    return TrainEvalGap(sorted(results, key=_rank, reverse=True), float(threshold))
