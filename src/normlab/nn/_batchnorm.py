"""``BatchNorm1d/2d/3d``: drop-ins for ``torch.nn.BatchNorm*``, exact on finite input, robust beyond it."""

from __future__ import annotations

from ._base import NormBase

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class BatchNorm1d(NormBase):
    r"""Drop-in for :class:`torch.nn.BatchNorm1d` over ``(N, C)`` or ``(N, C, L)`` input.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Same constructor, buffers, ``state_dict`` keys, error messages and results as torch's;
    beyond it: ``channel_axis=-1`` takes ``(N, L, C)`` sequences (the output keeps the
    input's layout), ``forward(input, mask)`` normalizes padded sequences with statistics
    over the valid (``True``) positions only, and the options of :class:`NormBase`
    (``nonfinite``, ``single_sample``, ``backend``).

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
        Keep running mean and variance for eval (default True).
    device : torch.device or str, optional
        Where parameters and buffers are created.
    dtype : torch.dtype, optional
        Their dtype.
    bias : bool
        With ``affine``, a learnable β (torch 2.13's ``bias=``, default True).
    nonfinite : {"skip", "raise", "propagate"}
        A training batch with NaN/Inf statistics: see :class:`NormBase`.
    single_sample : {"raise", "running"}
        A training batch with one value per channel: see :class:`NormBase`.
    backend : {"auto", "reference", "native", "fused"}
        The kernel; see :func:`normlab.functional.batch_norm`.
    channel_axis : {1, -1}
        ``-1`` takes ``(N, L, C)`` sequences.

    Examples
    --------
    >>> import torch, normlab
    >>> bn = normlab.nn.BatchNorm1d(3, channel_axis=-1)
    >>> x = torch.randn(4, 10, 3)                   # (N, L, C)
    >>> mask = torch.arange(10) < torch.tensor([[10], [7], [3], [9]])
    >>> bn(x, mask).shape
    torch.Size([4, 10, 3])
    """

    _NDIM = (2, 3)
    spatial = 1


class BatchNorm2d(NormBase):
    r"""Drop-in for :class:`torch.nn.BatchNorm2d` over ``(N, C, H, W)`` input (channels_last kept).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Same constructor (torch 2.13's ``bias=`` included), buffers, ``state_dict`` keys, error
    messages and results as torch's; see :class:`NormBase` for normlab's options.

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
        Keep running mean and variance for eval (default True).
    device : torch.device or str, optional
        Where parameters and buffers are created.
    dtype : torch.dtype, optional
        Their dtype.
    bias : bool
        With ``affine``, a learnable β (torch 2.13's ``bias=``, default True).
    nonfinite : {"skip", "raise", "propagate"}
        A training batch with NaN/Inf statistics: see :class:`NormBase`.
    single_sample : {"raise", "running"}
        A training batch with one value per channel: see :class:`NormBase`.
    backend : {"auto", "reference", "native", "fused"}
        The kernel; see :func:`normlab.functional.batch_norm`.
    channel_axis : {1}
        Must be 1 here (``-1``, channels last, is for ``BatchNorm1d``'s sequences).

    Examples
    --------
    >>> import torch, normlab
    >>> torch.manual_seed(0) and None
    >>> ours, ref = normlab.nn.BatchNorm2d(16), torch.nn.BatchNorm2d(16)
    >>> x = torch.randn(8, 16, 5, 5)
    >>> torch.allclose(ours(x), ref(x), atol=1e-6), torch.allclose(ours.running_var, ref.running_var)
    (True, True)
    """

    _NDIM = (4,)
    spatial = 2


class BatchNorm3d(NormBase):
    r"""Drop-in for :class:`torch.nn.BatchNorm3d` over ``(N, C, D, H, W)`` input.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    See :class:`NormBase` for normlab's options.

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
        Keep running mean and variance for eval (default True).
    device : torch.device or str, optional
        Where parameters and buffers are created.
    dtype : torch.dtype, optional
        Their dtype.
    bias : bool
        With ``affine``, a learnable β (torch 2.13's ``bias=``, default True).
    nonfinite : {"skip", "raise", "propagate"}
        A training batch with NaN/Inf statistics: see :class:`NormBase`.
    single_sample : {"raise", "running"}
        A training batch with one value per channel: see :class:`NormBase`.
    backend : {"auto", "reference", "native", "fused"}
        The kernel; see :func:`normlab.functional.batch_norm`.
    channel_axis : {1}
        Must be 1 here (``-1``, channels last, is for ``BatchNorm1d``'s sequences).

    Examples
    --------
    >>> import torch, normlab
    >>> normlab.nn.BatchNorm3d(4)(torch.randn(2, 4, 3, 3, 3)).shape
    torch.Size([2, 4, 3, 3, 3])
    """

    _NDIM = (5,)
    spatial = 3
