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

    Examples
    --------
    >>> import torch, normlab
    >>> normlab.nn.BatchNorm3d(4)(torch.randn(2, 4, 3, 3, 3)).shape
    torch.Size([2, 4, 3, 3, 3])
    """

    _NDIM = (5,)
    spatial = 3
