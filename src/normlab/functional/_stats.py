"""Per-channel batch statistics and their exact merge: the one place statistics are computed.

Everything in torch that needs a mean and a variance — BatchNorm's reference kernel,
SyncBN, masked batches, the Standardizer on accelerators — goes through
:func:`batch_norm_stats` and :func:`merge_stats`. (The Standardizer's CPU path keeps its
statistics in single-threaded numpy, for a measured reason written in its module.)

Conventions (the numerics contract of ``DESIGN.md``):

* statistics reduce over every axis except the channel axis, so a channel sees
  ``n = N * prod(spatial)`` values (only the ``True`` ones when masked);
* the variance is the *biased* one, ``var = sum((x - mean)^2) / n``;
* fp16/bf16 inputs accumulate in float32; float32/float64 in their own dtype;
  never ``E[x^2] - E[x]^2`` (catastrophic cancellation), always a two-pass or
  Welford/Chan computation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_mask

__all__ = ["accumulation_dtype", "batch_norm_stats", "merge_stats", "reduce_dims"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics of ``dtype`` data are accumulated in.

    Parameters
    ----------
    dtype : torch.dtype
        A floating-point dtype.

    Returns
    -------
    torch.dtype
        float32 for fp16/bf16, ``dtype`` itself otherwise.

    Raises
    ------
    TypeError
        ``dtype`` is not floating point.

    Examples
    --------
    >>> import torch
    >>> from normlab.functional import accumulation_dtype
    >>> accumulation_dtype(torch.bfloat16), accumulation_dtype(torch.float64)
    (torch.float32, torch.float64)
    """
    if dtype in _LOW_PRECISION:
        return torch.float32
    if not dtype.is_floating_point:
        raise TypeError(f"batch statistics need a floating-point input, got {dtype}")
    return dtype


def reduce_dims(ndim: int, channel_axis: int) -> list[int]:
    """Every axis of an ``ndim``-dimensional tensor except ``channel_axis``.

    Parameters
    ----------
    ndim : int
        The tensor's number of dimensions.
    channel_axis : int
        The axis kept (negative counts from the end).

    Returns
    -------
    list of int

    Raises
    ------
    ValueError
        ``channel_axis`` is out of range.

    Examples
    --------
    >>> from normlab.functional import reduce_dims
    >>> reduce_dims(4, 1), reduce_dims(3, -1)
    ([0, 2, 3], [0, 1])
    """
    if not -ndim <= channel_axis < ndim:
        raise ValueError(f"channel_axis={channel_axis} is out of range for a {ndim}D input")
    ca = channel_axis % ndim
    return [d for d in range(ndim) if d != ca]


def batch_norm_stats(
    input: Tensor,
    *,
    channel_axis: int = 1,
    mask: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Per-channel mean, biased variance and count of ``input``.

    .. math::
        n_c = \#\{\text{valid positions}\},\quad
        \mu_c = \frac{1}{n_c}\sum_i x_{ic},\quad
        \sigma^2_c = \frac{1}{n_c}\sum_i (x_{ic}-\mu_c)^2

    Parameters
    ----------
    input : Tensor, shape (N, C, *)
        Or any layout with ``channel_axis``.
    channel_axis : int
        The axis that is *not* reduced.
    mask : Tensor of bool, optional
        Shaped like ``input`` without the channel axis (shared by all channels), or like
        ``input`` itself (per-channel counts); only ``True`` positions count. Values at
        ``False`` positions may be anything (NaN included): they are never read into the
        statistics.
    dtype : torch.dtype, optional
        Accumulation dtype; default float32 for fp16/bf16 input and the input's dtype
        otherwise.

    Returns
    -------
    (Tensor, Tensor, Tensor)
        ``(mean, var, count)``, each of shape ``(C,)`` in the accumulation dtype. A channel
        with ``count == 0`` gets ``mean = var = 0``.

    Examples
    --------
    >>> import torch
    >>> from normlab.functional import batch_norm_stats
    >>> x = torch.tensor([[1.0, 10.0], [3.0, 10.0], [100.0, 10.0]])     # (N=3, C=2)
    >>> mean, var, count = batch_norm_stats(x, mask=torch.tensor([True, True, False]))
    >>> mean, var, count
    (tensor([ 2., 10.]), tensor([1., 0.]), tensor([2., 2.]))
    """
    acc = dtype if dtype is not None else accumulation_dtype(input.dtype)
    dims = reduce_dims(input.dim(), channel_axis)
    channels = input.shape[channel_axis]
    x = input.to(acc)
    if mask is None:
        n = input.numel() // channels if channels else 0
        count = torch.full((channels,), float(n), dtype=acc, device=input.device)
        if n == 0:
            zeros = torch.zeros(channels, dtype=acc, device=input.device)
            return zeros, zeros.clone(), count
        # Two passes: the mean, then the mean of squared deviations. (ATen's var_mean is a
        # Welford reduction, but over strided axes such as NCHW's (0, 2, 3) it runs ~5x
        # slower on CPU than two pairwise-summed reductions, for no accuracy gain here.)
        mean = x.mean(dim=dims, keepdim=True)  # (1, C, 1, ...)
        centered = x - mean
        # in place saves a buffer; torch.func has no batching rule for square_ (a slow loop)
        wrapped = torch._C._functorch.is_functorch_wrapped_tensor(centered)
        var = (centered.square() if wrapped else centered.square_()).mean(dim=dims)
        return mean.flatten(), var, count
    m = check_mask(input, mask, channel_axis, per_channel=True)
    count = m.sum(dim=dims, dtype=acc).expand(channels).clone()  # (C,)
    safe = count.clamp(min=1)
    shape = [1] * input.dim()
    shape[channel_axis] = channels
    zero = x.new_zeros(())
    mean = torch.where(m, x, zero).sum(dim=dims) / safe
    centered = torch.where(m, x - mean.view(shape), zero)
    var = centered.square().sum(dim=dims) / safe
    return mean, var, count


def merge_stats(
    mean_a: Tensor,
    var_a: Tensor,
    count_a: Tensor,
    mean_b: Tensor,
    var_b: Tensor,
    count_b: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Merge two sets of (mean, biased variance, count) exactly (Chan et al. 1979).

    .. math::
        n = n_a + n_b,\quad \delta = \mu_b - \mu_a,\quad
        \mu = \mu_a + \delta\,\frac{n_b}{n},\quad
        \sigma^2 = \frac{n_a\sigma_a^2 + n_b\sigma_b^2 + \delta^2\,n_a n_b / n}{n}

    Works elementwise on broadcastable tensors. An empty side (count 0) is the
    identity; two empty sides give ``mean = var = 0, count = 0``.

    Parameters
    ----------
    mean_a : Tensor
        Mean of the first part, e.g. shape ``(C,)``.
    var_a : Tensor
        Its biased variance.
    count_a : Tensor
        Its number of values.
    mean_b : Tensor
        Mean of the second part.
    var_b : Tensor
        Its biased variance.
    count_b : Tensor
        Its number of values.

    Returns
    -------
    (Tensor, Tensor, Tensor)
        ``(mean, var, count)`` of the union, broadcast shape.

    Examples
    --------
    >>> import torch
    >>> from normlab.functional import batch_norm_stats, merge_stats
    >>> x = torch.randn(10, 3)
    >>> merged = merge_stats(*batch_norm_stats(x[:4]), *batch_norm_stats(x[4:]))
    >>> all(torch.allclose(a, b) for a, b in zip(merged, batch_norm_stats(x)))
    True
    """
    count = count_a + count_b
    safe = torch.where(count > 0, count, torch.ones_like(count))
    delta = mean_b - mean_a
    frac_b = count_b / safe
    mean = mean_a + delta * frac_b
    m2 = var_a * count_a + var_b * count_b + delta.square() * count_a * frac_b
    var = m2 / safe
    # an empty side must not leak NaN/garbage from its (meaningless) mean/var
    mean = torch.where(count_b > 0, mean, mean_a)
    var = torch.where(count_b > 0, var, var_a)
    mean = torch.where(count_a > 0, mean, mean_b)
    var = torch.where(count_a > 0, var, var_b)
    return mean, var, count
