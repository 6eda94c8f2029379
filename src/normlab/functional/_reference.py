"""The reference batch-norm kernels: plain, readable torch ops — the oracle for every fast path.

Forward and backward of one op side by side. Channel axis is 1; shapes in comments
use ``(N, C, *)`` for "batch, channels, any spatial axes".

Training forward::

    mu     = mean(x)                       # (C,)  over N and spatial (valid positions)
    var    = mean((x - mu)^2)              # (C,)  biased
    invstd = 1 / sqrt(var + eps)           # (C,)
    xhat   = (x - mu) * invstd             # (N, C, *)
    y      = gamma * xhat + beta           # (N, C, *)

Closed-form backward (``n`` values per channel)::

    dbeta  = sum(dy)
    dgamma = sum(dy * xhat)
    dx     = gamma * invstd * (dy - sum(dy)/n - xhat * sum(dy * xhat)/n)

With a mask, statistics and the two sums inside ``dx`` run over valid positions
only; a masked position outputs ``beta`` (``xhat := 0``), so it is finite whatever
the padding holds and passes no gradient to ``x``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._stats import accumulation_dtype, batch_norm_stats, reduce_dims

__all__ = ["ReferenceKernel", "channel_view", "normalize"]


def channel_view(t: Tensor, ndim: int) -> Tensor:
    """(C,) -> (1, C, 1, ...) for broadcasting against an ``ndim``-D input."""
    return t.view([1, -1] + [1] * (ndim - 2))


def _affine(xhat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    ndim = xhat.dim()
    if weight is not None:
        xhat = xhat * channel_view(weight.to(xhat.dtype), ndim)
    if bias is not None:
        xhat = xhat + channel_view(bias.to(xhat.dtype), ndim)
    return xhat


def normalize(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None = None,
) -> Tensor:
    """``y = weight * (x - mean) * invstd + bias`` per channel, computed in ``mean``'s dtype,
    returned in ``x``'s dtype. Masked-out positions give ``bias`` (0 without bias)."""
    ndim = x.dim()
    xhat = (x.to(mean.dtype) - channel_view(mean, ndim)) * channel_view(invstd, ndim)  # (N, C, *)
    if mask is not None:
        xhat = torch.where(mask.unsqueeze(1), xhat, xhat.new_zeros(()))
    return _affine(xhat, weight, bias).to(x.dtype)


class ReferenceKernel:
    """Batch norm as plain torch ops; every other backend is tested against this one."""

    name = "reference"

    @staticmethod
    def forward_train(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns ``(y, mean, var, invstd)``; ``var`` is biased, stats in the accumulation dtype."""
        mean, var, _ = batch_norm_stats(x, mask=mask)  # (C,) each
        invstd = torch.rsqrt(var + eps)
        return normalize(x, mean, invstd, weight, bias, mask), mean, var, invstd

    @staticmethod
    def stats(x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel ``(mean, biased var)`` in the accumulation dtype (two passes)."""
        mean, var, _ = batch_norm_stats(x)
        return mean, var

    @staticmethod
    def backward_train(
        dy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        needs: tuple[bool, bool, bool],
        mask: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Closed-form gradients ``(dx, dweight, dbias)``; ``None`` where ``needs`` is False."""
        ndim = x.dim()
        dims = reduce_dims(ndim, 1)
        acc = mean.dtype
        dy_a = dy.to(acc)  # (N, C, *)
        xhat = (x.to(acc) - channel_view(mean, ndim)) * channel_view(invstd, ndim)
        if mask is None:
            n = x.numel() // x.shape[1]
            dy_v = dy_a
        else:
            m = mask.unsqueeze(1)
            n = int(mask.sum())
            zero = xhat.new_zeros(())
            xhat = torch.where(m, xhat, zero)
            dy_v = torch.where(m, dy_a, zero)
        sum_dy = dy_v.sum(dims)  # (C,)
        sum_dy_xhat = (dy_v * xhat).sum(dims)  # (C,)
        dx = dweight = dbias = None
        if needs[0]:
            scale = invstd if weight is None else invstd * weight.to(acc)
            inner = (
                dy_v - channel_view(sum_dy / n, ndim) - xhat * channel_view(sum_dy_xhat / n, ndim)
            )
            if mask is not None:  # masked positions output beta: no gradient reaches x there
                inner = torch.where(mask.unsqueeze(1), inner, inner.new_zeros(()))
            dx = (channel_view(scale, ndim) * inner).to(x.dtype)
        if weight is not None and needs[1]:
            dweight = sum_dy_xhat.to(weight.dtype)
        if needs[2]:
            total = dy_a.sum(dims)
            dbias = total if weight is None else total.to(weight.dtype)
        return dx, dweight, dbias

    @staticmethod
    def forward_eval(
        x: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> Tensor:
        """Inference: normalize with the running statistics (differentiable by autograd)."""
        acc = accumulation_dtype(x.dtype)
        mean = running_mean.to(acc)
        invstd = torch.rsqrt(running_var.to(acc) + eps)
        return normalize(x, mean, invstd, weight, bias)


def reference_train_output(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, mask: Tensor | None
) -> Tensor:
    """The training output built from differentiable ops only (used for double backward)."""
    mean, var, _ = batch_norm_stats(x, mask=mask)
    return normalize(x, mean, torch.rsqrt(var + eps), weight, bias, mask)
