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
    A plain tuple of numbers: it pickles, prints and traces.

    Parameters
    ----------
    start : float
        The value up to ``start_step``.
    end : float
        The value from ``end_step`` on.
    start_step : int
        Where the ramp starts.
    end_step : int
        Where it ends.

    Examples
    --------
    >>> from normlab.functional import Ramp
    >>> ramp = Ramp(1.0, 3.0, 100, 200)
    >>> ramp(0), ramp(150), ramp(10_000)
    (1.0, 2.0, 3.0)
    """

    start: float
    end: float
    start_step: int
    end_step: int

    def __call__(self, step: int) -> float:
        """The limit at ``step`` (a ``num_batches_tracked`` count), as a float."""
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

    Parameters
    ----------
    running_mean : Tensor, shape (C,)
        μ, taken before this step's update.
    running_var : Tensor, shape (C,)
        The running variance.
    eps : float
        The layer's ``eps``.
    r_max : float
        ``>= 1``.
    d_max : float
        ``>= 0``.

    Returns
    -------
    callable
        ``correction(mean_B, var_B) -> (r, d)``, each ``(C,)``; pass it to
        :func:`batch_norm_train`.

    Raises
    ------
    ValueError
        ``r_max < 1``, ``d_max < 0`` or either not finite.

    Examples
    --------
    >>> import torch
    >>> from normlab.functional import renorm_correction
    >>> correction = renorm_correction(torch.zeros(2), torch.ones(2), 0.0, 3.0, 5.0)
    >>> correction(torch.tensor([0.5, 0.0]), torch.tensor([16.0, 1.0]))   # r clipped at 3
    (tensor([3., 1.]), tensor([0.5000, 0.0000]))
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
    """Ghost BN's chunk sizes for a batch of ``n``.

    ``virtual_batch_size`` each; a last chunk of a single sample joins the previous one (it
    has no variance).

    Parameters
    ----------
    n : int
        The batch size.
    virtual_batch_size : int
        Samples per chunk.

    Returns
    -------
    list of int
        Sizes that add up to ``n``.

    Examples
    --------
    >>> from normlab.functional import ghost_chunks
    >>> ghost_chunks(10, 4), ghost_chunks(9, 4), ghost_chunks(3, 4)
    ([4, 4, 2], [4, 5], [3])
    """
    if n <= virtual_batch_size:
        return [n]
    full, rest = divmod(n, virtual_batch_size)
    if rest == 1:
        return [virtual_batch_size] * (full - 1) + [virtual_batch_size + 1]
    return [virtual_batch_size] * full + ([rest] if rest else [])
