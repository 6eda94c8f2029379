r"""Precise BatchNorm: re-estimate running statistics as population averages (Wu & Johnson, 2021).

The EMA that training keeps (``momentum=0.1``) is dominated by the last few
batches of weights that kept changing. "Precise BN" (Wu & Johnson, *Rethinking
"Batch" in BatchNorm*, 2021) freezes the weights and re-estimates the statistics
over ``K`` batches, as torch's cumulative average (``momentum=None``) does:

.. math::
    \hat\mu = \frac1K \sum_{k=1}^K \mu_k, \qquad
    \hat\sigma^2 = \frac1K \sum_{k=1}^K \frac{n_k}{n_k - 1}\,\sigma_k^2

(the mean of the batch means and of the batch *unbiased* variances — Ioffe &
Szegedy's population estimate), not an exponential moving average.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..._norms import batchnorms_with_running_stats
from ._common import (
    RunningState,
    batch_input,
    hooked_input,
    input_stats,
    module_dtype_device,
)

__all__ = ["recalibrate_batchnorm"]


class _Accumulator:
    """Running sums of one BatchNorm's batch means and unbiased variances (fp64)."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module
        self.name = name
        self.sum_mean: Tensor | None = None
        self.sum_var: Tensor | None = None
        self.batches = 0
        self.skipped = 0

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x, mask = hooked_input(args, kwargs)
        mean, var, count = input_stats(module, x, mask)
        # (C,) each; unbiased variance as torch's running_var uses
        var_unbiased = var * count / (count - 1).clamp_min(1)
        if not (
            torch.isfinite(mean).all() and torch.isfinite(var_unbiased).all() and (count > 1).all()
        ):
            self.skipped += 1
            return
        mean, var_unbiased = mean.double(), var_unbiased.double()
        self.sum_mean = mean if self.sum_mean is None else self.sum_mean + mean
        self.sum_var = var_unbiased if self.sum_var is None else self.sum_var + var_unbiased
        self.batches += 1

    @torch.no_grad()
    def write(self) -> None:
        m = self.module
        assert isinstance(m.running_mean, Tensor) and isinstance(m.running_var, Tensor)
        if self.sum_mean is None or self.sum_var is None:
            return
        m.running_mean.copy_(self.sum_mean / self.batches)
        m.running_var.copy_(self.sum_var / self.batches)
        tracked = getattr(m, "num_batches_tracked", None)
        if isinstance(tracked, Tensor):
            tracked.fill_(self.batches)


def recalibrate_batchnorm(
    model: nn.Module,
    data: Iterable[Any],
    *,
    num_batches: int = 200,
    progress: bool = True,
    layers: Iterable[str] | None = None,
) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics over ``data`` ("precise BN"), in place.

    For each of the first ``num_batches`` batches the model runs forward under
    ``torch.no_grad()`` with its BatchNorm layers in training mode (they
    normalize with batch statistics, as in training) and every other module in
    eval mode (dropout off, no other state changes). A forward pre-hook records
    the mean and unbiased variance of each BatchNorm's input with
    :func:`normlab.functional.batch_norm_stats`; afterwards
    ``running_mean`` / ``running_var`` are set to their averages over the batches
    and ``num_batches_tracked`` to the number of batches — exactly what
    ``momentum=None`` accumulates from reset buffers. Only BatchNorm buffers
    change: every module's training flag and momentum are as before. A batch
    whose statistics are non-finite for a layer is left out of that layer's
    average (with a warning). ``FrozenBatchNorm*`` and layers without running
    statistics are skipped. A split layer's statistics are those of the first part of
    each batch (as in training).

    Parameters
    ----------
    model : nn.Module
        The model (on any device; batches are moved to the model's device).
    data : iterable
        A DataLoader or any iterable of input tensors or of tuples/lists whose first
        element is the input.
    num_batches : int
        At most this many batches are used.
    progress : bool
        Show a tqdm bar (only when stderr is a terminal).
    layers : iterable of str, optional
        Re-estimate only these layers (module paths, as ``model.named_modules()`` names
        them) — e.g. ``normlab.diagnostics.train_eval_gap(model, data).flagged``. Every
        BatchNorm still runs in training mode, so these layers get the statistics a full
        recalibration gives them; the others keep their buffers bit-exactly.

    Returns
    -------
    nn.Module
        ``model``.

    Raises
    ------
    ValueError
        ``num_batches < 1``, no batches, no BatchNorm with running statistics, or a path
        in ``layers`` that is not such a layer of ``model``.

    Examples
    --------
    >>> import torch
    >>> from normlab.nn.utils import recalibrate_batchnorm
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
    ...                             torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
    >>> data = [torch.randn(32, 4) for _ in range(5)]
    >>> _ = recalibrate_batchnorm(model, data, progress=False, layers=["3"])
    >>> int(model[1].num_batches_tracked), int(model[3].num_batches_tracked)
    (0, 5)
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}")
    eligible = batchnorms_with_running_stats(model)
    if not eligible:
        raise ValueError(
            "recalibrate_batchnorm: the model has no BatchNorm with running statistics"
        )
    targets = eligible
    if layers is not None:
        wanted = [layers] if isinstance(layers, str) else list(layers)
        unknown = [n for n in wanted if n not in eligible]
        if unknown:
            raise ValueError(
                f"recalibrate_batchnorm: {', '.join(map(repr, unknown))} is not a BatchNorm with "
                f"running statistics in the model (those are: {', '.join(map(repr, eligible))})"
            )
        targets = {n: eligible[n] for n in wanted}
    _, device = module_dtype_device(model)
    flags = {m: m.training for m in model.modules()}
    accumulators = {name: _Accumulator(m, name) for name, m in targets.items()}
    handles = [
        m.register_forward_pre_hook(accumulators[n], with_kwargs=True) for n, m in targets.items()
    ]
    saved = [RunningState(m) for m in eligible.values()]
    seen = 0
    try:
        model.eval()
        for m in eligible.values():
            m.train()
        bar = tqdm(
            total=num_batches, desc="recalibrate BN", disable=not (progress and sys.stderr.isatty())
        )
        with torch.no_grad(), bar:
            for batch in data:
                if seen >= num_batches:
                    break
                model(batch_input(batch, "recalibrate_batchnorm").to(device))
                seen += 1
                bar.update(1)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.training = flag
        for state in saved:  # undo the EMA updates of the forward passes
            state.restore()
    if seen == 0:
        raise ValueError("recalibrate_batchnorm: data yielded no batches")
    for acc in accumulators.values():
        acc.write()
        if acc.skipped:
            warnings.warn(
                f"recalibrate_batchnorm: {acc.name}: {acc.skipped} of {seen} batches had "
                "non-finite statistics (or one value per channel) and were left out",
                RuntimeWarning,
                stacklevel=2,
            )
    return model
