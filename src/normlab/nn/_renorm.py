r"""Batch Renormalization (Ioffe 2017): batch statistics corrected toward the running ones.

.. math::
    \hat x = \frac{x - \mu_B}{\sigma_B},\quad
    r = \operatorname{clip}_{[1/r_{max},\, r_{max}]}\!\Big(\frac{\sigma_B}{\sigma}\Big),\quad
    d = \operatorname{clip}_{[-d_{max},\, d_{max}]}\!\Big(\frac{\mu_B - \mu}{\sigma}\Big),\quad
    y = \gamma\,(r\,\hat x + d) + \beta

with :math:`\sigma_B = \sqrt{\sigma_B^2 + \epsilon}`, :math:`\sigma = \sqrt{\text{running\_var} + \epsilon}`,
the running :math:`\mu, \sigma` taken *before* this step's update, and :math:`r, d` treated as
constants (no gradient). With ``r_max = 1, d_max = 0`` it is BatchNorm; in eval it is BatchNorm
with running statistics. Only where the statistics come from differs: the normalization itself is
:func:`normlab.functional.batch_norm_train` with its closed-form backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..functional import NonFinite, batch_norm_train, channel_view
from ..functional._backend import fused_for_layer
from ._batchnorm import NormBase, SingleSample

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "Limit"]

Limit = float | Callable[[int], float]


class _BatchRenorm(NormBase):
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
        nonfinite: NonFinite = "skip",
        single_sample: SingleSample = "raise",
        backend: str = "auto",
    ) -> None:
        if not track_running_stats:
            raise ValueError(
                "Batch Renormalization corrects toward running statistics: track_running_stats must be True"
            )
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            nonfinite=nonfinite,
            single_sample=single_sample,
            backend=backend,
        )
        self.r_max, self.d_max = r_max, d_max

    @staticmethod
    def paper_schedule() -> tuple[Callable[[int], float], Callable[[int], float]]:
        """Ioffe 2017's schedule as ``(r_max, d_max)`` callables of ``num_batches_tracked``:
        plain BN (1, 0) for the first 5k steps, then linear to ``r_max = 3`` at 40k and
        ``d_max = 5`` at 25k steps."""

        def ramp(end_value: float, end_step: int, start_value: float) -> Callable[[int], float]:
            def value(step: int) -> float:
                if step < 5000:
                    return start_value
                t = min(1.0, (step - 5000) / (end_step - 5000))
                return start_value + t * (end_value - start_value)

            return value

        return ramp(3.0, 40_000, 1.0), ramp(5.0, 25_000, 0.0)

    def limits(self) -> tuple[float, float]:
        """The current ``(r_max, d_max)`` (schedules evaluated at ``num_batches_tracked``)."""
        step = int(self.num_batches_tracked) if self.num_batches_tracked is not None else 0
        r_max = self.r_max(step) if callable(self.r_max) else float(self.r_max)
        d_max = self.d_max(step) if callable(self.d_max) else float(self.d_max)
        if r_max < 1.0 or d_max < 0.0:
            raise ValueError(f"need r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")
        return r_max, d_max

    def extra_repr(self) -> str:
        r = "schedule" if callable(self.r_max) else self.r_max
        d = "schedule" if callable(self.d_max) else self.d_max
        return super().extra_repr() + f", r_max={r}, d_max={d}"

    def _correction(self) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``(mean_B, var_B) -> (r, d)`` from the running statistics *before* this step's update."""
        assert self.running_mean is not None and self.running_var is not None
        r_max, d_max = self.limits()
        running_mean, running_var = self.running_mean.clone(), self.running_var.clone()

        def correction(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
            with torch.no_grad():  # r and d carry no gradient (Ioffe 2017, Alg. 1)
                sigma = torch.sqrt(running_var.to(mean.dtype) + self.eps)
                r = (torch.sqrt(var + self.eps) / sigma).clamp(1.0 / r_max, r_max)
                d = ((mean - running_mean.to(mean.dtype)) / sigma).clamp(-d_max, d_max)
            return r, d

        return correction

    def _train_forward(
        self, x: Tensor, mask: Tensor | None, n: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        correction = self._correction()
        if mask is None:  # one autograd node, plain batch-norm cost
            backend = "fused" if fused_for_layer(self.backend, x) else self.backend
            y, mean, var = batch_norm_train(
                x, self.weight, self.bias, self.eps, backend=backend, correction=correction
            )
            return y, mean, var * (n / (n - 1))
        # masked: x̂ from the masked kernel, then the corrected affine by autograd
        xhat, mean, var = batch_norm_train(x, None, None, self.eps, mask=mask, backend=self.backend)
        r, d = correction(mean, var)
        scale, shift = (
            (r, d) if self.weight is None else (self.weight * r, self.weight * d + self.bias)
        )
        y = xhat * channel_view(scale.to(xhat.dtype), x.dim()) + channel_view(
            shift.to(xhat.dtype), x.dim()
        )
        return y, mean, var * (n / (n - 1))


class BatchRenorm1d(_BatchRenorm):
    """Batch Renormalization over ``(N, C)`` or ``(N, C, L)`` (``forward(x, mask)`` for padded sequences).

    ``r_max``/``d_max``: floats or callables of ``num_batches_tracked``
    (:meth:`paper_schedule`). Other arguments as :class:`normlab.nn.BatchNorm1d`.
    """

    _NDIM = (2, 3)
    _NDIM_TEXT = "2D or 3D"


class BatchRenorm2d(_BatchRenorm):
    """Batch Renormalization over ``(N, C, H, W)``; see :class:`BatchRenorm1d`."""

    _NDIM = (4,)
    _NDIM_TEXT = "4D"


class BatchRenorm3d(_BatchRenorm):
    """Batch Renormalization over ``(N, C, D, H, W)``; see :class:`BatchRenorm1d`."""

    _NDIM = (5,)
    _NDIM_TEXT = "5D"
