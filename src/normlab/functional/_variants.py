r"""Where the variants' statistics come from: Batch Renorm's correction, Ghost BN's chunks."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ._train import Correction

__all__ = ["Limit", "Ramp", "ghost_chunks", "renorm_correction"]


class Ramp(NamedTuple):
    """A limit that moves linearly from ``start`` to ``end`` between two step counts
    (``num_batches_tracked``), constant outside — Ioffe 2017's ``r_max``/``d_max`` schedule.
    A plain tuple of numbers: it pickles, prints and traces."""

    start: float
    end: float
    start_step: int
    end_step: int

    def __call__(self, step: int) -> float:
        if step <= self.start_step:
            return float(self.start)
        t = min(1.0, (step - self.start_step) / max(1, self.end_step - self.start_step))
        return float(self.start + t * (self.end - self.start))


Limit = float | Ramp | Callable[[int], float]


def renorm_correction(
    running_mean: Tensor, running_var: Tensor, eps: float, r_max: float, d_max: float
) -> Correction:
    r"""Ioffe 2017's ``(mean_B, var_B) -> (r, d)`` against the given running statistics:

    .. math::
        r = \operatorname{clip}_{[1/r_{max},\, r_{max}]}\Big(\frac{\sigma_B}{\sigma}\Big),\quad
        d = \operatorname{clip}_{[-d_{max},\, d_{max}]}\Big(\frac{\mu_B - \mu}{\sigma}\Big)

    with :math:`\sigma_B = \sqrt{\sigma_B^2 + \epsilon}`, :math:`\sigma = \sqrt{\text{running\_var} + \epsilon}`;
    ``r`` and ``d`` carry no gradient (Alg. 1).
    """
    if not (math.isfinite(r_max) and r_max >= 1.0 and math.isfinite(d_max) and d_max >= 0.0):
        raise ValueError(f"need finite r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")

    def correction(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            sigma = torch.sqrt(running_var.to(mean.dtype) + eps)
            r = (torch.sqrt(var + eps) / sigma).clamp(1.0 / r_max, r_max)
            d = ((mean - running_mean.to(mean.dtype)) / sigma).clamp(-d_max, d_max)
        return r, d

    return correction


def _limit(value: Limit, step: int) -> float:
    return float(value(step)) if callable(value) else float(value)


def ghost_chunks(n: int, virtual_batch_size: int) -> list[int]:
    """Ghost BN's chunk sizes for a batch of ``n``: ``virtual_batch_size`` each, a last chunk of
    a single sample joining the previous one (it has no variance)."""
    if n <= virtual_batch_size:
        return [n]
    full, rest = divmod(n, virtual_batch_size)
    if rest == 1:
        return [virtual_batch_size] * (full - 1) + [virtual_batch_size + 1]
    return [virtual_batch_size] * full + ([rest] if rest else [])
