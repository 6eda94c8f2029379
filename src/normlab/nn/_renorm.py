r"""Batch Renormalization (Ioffe 2017): batch statistics corrected toward the running ones.

.. math::
    \hat x = \frac{x - \mu_B}{\sigma_B},\quad
    r = \operatorname{clip}_{[1/r_{max},\, r_{max}]}\!\Big(\frac{\sigma_B}{\sigma}\Big),\quad
    d = \operatorname{clip}_{[-d_{max},\, d_{max}]}\!\Big(\frac{\mu_B - \mu}{\sigma}\Big),\quad
    y = \gamma\,(r\,\hat x + d) + \beta

with :math:`\sigma_B = \sqrt{\sigma_B^2 + \epsilon}`, :math:`\sigma = \sqrt{\text{running\_var} + \epsilon}`,
the running :math:`\mu, \sigma` taken *before* this step's update, and :math:`r, d` treated as
constants (no gradient). With ``r_max = 1, d_max = 0`` it is BatchNorm; in eval it is BatchNorm
with running statistics. Only where the affine map's constants come from differs: the training
path is batch norm's, with ``γ·r`` and ``β + γ·d`` (:func:`normlab.functional.renorm_correction`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ..functional import Ramp
from ..functional._checks import check_finite
from ._base import NormBase

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "Limit"]

Limit = float | Ramp | Callable[[int], float]


def _check_limit(value: Any, name: str, minimum: float) -> Limit:
    if isinstance(value, Ramp):
        for field in ("start", "end"):
            check_finite(getattr(value, field), f"{name}.{field}", minimum=minimum)
        return value
    if callable(value):
        return value  # checked when evaluated, at each step
    return check_finite(value, name, minimum=minimum)


class _BatchRenorm(NormBase):
    kind = "renorm"
    OPTIONS: ClassVar[dict[str, Any]] = {**NormBase.OPTIONS, "r_max": 3.0, "d_max": 5.0}

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        r_max: Limit = 3.0,
        d_max: Limit = 5.0,
        **options: Any,
    ) -> None:
        """Create the layer (the arguments are described in the class docstring)."""
        if track_running_stats is not True:
            raise ValueError(
                "Batch Renormalization corrects toward running statistics: track_running_stats must be True"
            )
        self.r_max = _check_limit(r_max, "r_max", 1.0)
        self.d_max = _check_limit(d_max, "d_max", 0.0)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **options
        )

    @staticmethod
    def paper_schedule() -> tuple[Ramp, Ramp]:
        """Ioffe 2017's schedule as ``(r_max, d_max)`` of ``num_batches_tracked``.

        Plain BN (1, 0) for the first 5k steps, then linear to ``r_max = 3`` at 40k and
        ``d_max = 5`` at 25k steps. :class:`~normlab.functional.Ramp` values: they pickle and
        trace.

        Returns
        -------
        (Ramp, Ramp)
            ``r_max`` and ``d_max`` schedules, to pass to the constructor.

        Examples
        --------
        >>> import normlab
        >>> r_max, d_max = normlab.nn.BatchRenorm2d.paper_schedule()
        >>> r_max(0), r_max(22_500), d_max(25_000)
        (1.0, 2.0, 5.0)
        """
        return Ramp(1.0, 3.0, 5000, 40_000), Ramp(0.0, 5.0, 5000, 25_000)

    def limits(self) -> tuple[float, float]:
        """The current clipping limits.

        Returns
        -------
        (float, float)
            ``(r_max, d_max)``, schedules evaluated at ``num_batches_tracked``.

        Examples
        --------
        >>> import normlab
        >>> normlab.nn.BatchRenorm1d(4, r_max=2.0, d_max=1.0).limits()
        (2.0, 1.0)
        """
        step = int(self.num_batches_tracked) if self.num_batches_tracked is not None else 0
        r_max = float(self.r_max(step)) if callable(self.r_max) else float(self.r_max)
        d_max = float(self.d_max(step)) if callable(self.d_max) else float(self.d_max)
        return r_max, d_max

    def _variant_spec(self) -> dict[str, Any]:
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            for name, value in (("r_max", self.r_max), ("d_max", self.d_max)):
                if callable(value) and not isinstance(value, Ramp):
                    raise TypeError(
                        f"{type(self).__name__}: a callable {name} cannot be traced by torch.fx; "
                        "use normlab.functional.Ramp (or a number)"
                    )
        return {"renorm": (self.r_max, self.d_max)}


class BatchRenorm1d(_BatchRenorm):
    """Batch Renormalization over ``(N, C)`` or ``(N, C, L)`` (``forward(x, mask)`` for padded sequences).

    ``r_max``/``d_max``: numbers, :class:`~normlab.functional.Ramp` schedules of
    ``num_batches_tracked`` (:meth:`paper_schedule`) or callables of it. Other arguments as
    :class:`normlab.nn.BatchNorm1d`. The output has the input's shape.

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels.
    eps : float
        Added to the variance for stability (default 1e-5).
    momentum : float or None
        Running-statistics factor in ``[0, 1]`` (default 0.1); ``None``: cumulative average.
    affine : bool
        Learnable per-channel γ (``weight``) and β (``bias``), default True.
    track_running_stats : bool
        Must be True: Renorm corrects toward the running statistics.
    device : torch.device or str, optional
        Where parameters and buffers are created.
    dtype : torch.dtype, optional
        Their dtype.
    r_max : float, Ramp or callable
        Clip for ``r = σ_B/σ`` to ``[1/r_max, r_max]``, ``>= 1`` (default 3); a
        :class:`~normlab.functional.Ramp` or a callable of ``num_batches_tracked`` schedules it.
    d_max : float, Ramp or callable
        Clip for ``d = (μ_B − μ)/σ`` to ``[−d_max, d_max]``, ``>= 0`` (default 5).
    **options
        ``bias``, ``nonfinite``, ``single_sample``, ``backend`` and ``channel_axis``
        (``-1``: ``(N, L, C)`` input), as :class:`NormBase`.

    Examples
    --------
    >>> import torch, normlab
    >>> r_max, d_max = normlab.nn.BatchRenorm1d.paper_schedule()
    >>> layer = normlab.nn.BatchRenorm1d(4, r_max=r_max, d_max=d_max)
    >>> layer(torch.randn(8, 4)).shape, layer.limits()
    (torch.Size([8, 4]), (1.0, 0.0))
    """

    _NDIM = (2, 3)
    spatial = 1


class BatchRenorm2d(_BatchRenorm):
    """Batch Renormalization over ``(N, C, H, W)``; see :class:`BatchRenorm1d`.

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels.
    eps : float
        Added to the variance for stability (default 1e-5).
    momentum : float or None
        Running-statistics factor in ``[0, 1]`` (default 0.1); ``None``: cumulative average.
    affine : bool
        Learnable per-channel γ (``weight``) and β (``bias``), default True.
    track_running_stats : bool
        Must be True: Renorm corrects toward the running statistics.
    device : torch.device or str, optional
        Where parameters and buffers are created.
    dtype : torch.dtype, optional
        Their dtype.
    r_max : float, Ramp or callable
        Clip for ``r = σ_B/σ`` to ``[1/r_max, r_max]``, ``>= 1`` (default 3); a
        :class:`~normlab.functional.Ramp` or a callable of ``num_batches_tracked`` schedules it.
    d_max : float, Ramp or callable
        Clip for ``d = (μ_B − μ)/σ`` to ``[−d_max, d_max]``, ``>= 0`` (default 5).
    **options
        ``bias``, ``nonfinite``, ``single_sample`` and ``backend``, as :class:`NormBase`.

    Examples
    --------
    >>> import torch, normlab
    >>> layer = normlab.nn.BatchRenorm2d(3, r_max=1.0, d_max=0.0)   # plain BN
    >>> x = torch.randn(4, 3, 5, 5)
    >>> torch.allclose(layer(x), torch.nn.BatchNorm2d(3)(x), atol=1e-5)
    True
    """

    _NDIM = (4,)
    spatial = 2


class BatchRenorm3d(_BatchRenorm):
    """Batch Renormalization over ``(N, C, D, H, W)``; see :class:`BatchRenorm1d`.

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels.
    eps : float
        Added to the variance for stability (default 1e-5).
    momentum : float or None
        Running-statistics factor in ``[0, 1]`` (default 0.1); ``None``: cumulative average.
    affine : bool
        Learnable per-channel γ (``weight``) and β (``bias``), default True.
    track_running_stats : bool
        Must be True: Renorm corrects toward the running statistics.
    device : torch.device or str, optional
        Where parameters and buffers are created.
    dtype : torch.dtype, optional
        Their dtype.
    r_max : float, Ramp or callable
        Clip for ``r = σ_B/σ`` to ``[1/r_max, r_max]``, ``>= 1`` (default 3); a
        :class:`~normlab.functional.Ramp` or a callable of ``num_batches_tracked`` schedules it.
    d_max : float, Ramp or callable
        Clip for ``d = (μ_B − μ)/σ`` to ``[−d_max, d_max]``, ``>= 0`` (default 5).
    **options
        ``bias``, ``nonfinite``, ``single_sample`` and ``backend``, as :class:`NormBase`.

    Examples
    --------
    >>> import torch, normlab
    >>> normlab.nn.BatchRenorm3d(2)(torch.randn(2, 2, 3, 3, 3)).shape
    torch.Size([2, 2, 3, 3, 3])
    """

    _NDIM = (5,)
    spatial = 3
