"""The reference batch-norm kernel: plain, readable torch ops — the oracle for every fast path.

Forward and backward of one op side by side. Channel axis is 1; shapes in comments use
``(N, C, *)`` for "batch, channels, any spatial axes".

Training forward::

    mu     = mean(x)                       # (C,)  over N and spatial (valid positions)
    var    = mean((x - mu)^2)              # (C,)  biased
    invstd = 1 / sqrt(var + eps)           # (C,)
    xhat   = (x - mu) * invstd             # (N, C, *)
    z      = gamma * xhat + beta           # (N, C, *)
    y      = f(z)                          # optional activation

Closed-form backward (``n`` values per channel, ``g = dy * f'(z)``)::

    dbeta  = sum(g)
    dgamma = sum(g * xhat)
    dx     = gamma * invstd * (g - sum(g)/n - xhat * sum(g * xhat)/n)

With ``chunks`` (Ghost BN's virtual batches) each consecutive batch chunk is its own batch:
statistics are ``(G·C,)``, chunk-major, and ``dgamma``/``dbeta`` sum over the chunks. With a
mask, statistics and the sums inside ``dx`` run over valid positions only; a masked
position's ``xhat`` is 0, so it outputs ``f(beta)`` (finite whatever the padding holds) and
passes no gradient to ``x``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._activation import ACTIVATIONS, Activation
from ._stats import accumulation_dtype, batch_norm_stats, reduce_dims

__all__ = ["ReferenceKernel", "channel_view", "grad_input", "grad_sums", "normalize"]


def channel_view(t: Tensor, ndim: int) -> Tensor:
    """``(C,) -> (1, C, 1, ...)`` for broadcasting against an ``ndim``-D input.

    Parameters
    ----------
    t : Tensor, shape (C,)
        A per-channel tensor.
    ndim : int
        The input's number of dimensions (``>= 2``).

    Returns
    -------
    Tensor
        A view of shape ``(1, C, 1, ...)`` with ``ndim`` dimensions.

    Examples
    --------
    >>> import torch
    >>> from normlab.functional import channel_view
    >>> channel_view(torch.zeros(3), 4).shape
    torch.Size([1, 3, 1, 1])
    """
    return t.view([1, -1] + [1] * (ndim - 2))


def normalize(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None = None,
    act: Activation | None = None,
) -> Tensor:
    """``f(weight * (x - mean) * invstd + bias)`` per channel.

    Computed in ``mean``'s dtype and returned in ``x``'s dtype.

    Parameters
    ----------
    x : Tensor, shape (N, C, *)
        The input.
    mean : Tensor, shape (C,)
        Per-channel mean.
    invstd : Tensor, shape (C,)
        Per-channel ``1 / sqrt(var + eps)``.
    weight : Tensor of shape (C,) or None
        γ.
    bias : Tensor of shape (C,) or None
        β.
    mask : Tensor of bool, optional
        ``x``'s shape without the channel axis; masked-out positions give ``f(bias)``
        (``f(0)`` without bias).
    act : Activation, optional
        ``f``; identity when ``None``.

    Returns
    -------
    Tensor
        ``x``'s shape and dtype.

    Examples
    --------
    >>> import torch
    >>> from normlab.functional import normalize
    >>> x = torch.tensor([[1.0], [3.0]])                  # (N=2, C=1)
    >>> normalize(x, torch.tensor([2.0]), torch.tensor([1.0]), None, None)
    tensor([[-1.],
            [ 1.]])
    """
    ndim = x.dim()
    xhat = (x.to(mean.dtype) - channel_view(mean, ndim)) * channel_view(invstd, ndim)  # (N, C, *)
    if mask is not None:
        xhat = torch.where(mask.unsqueeze(1), xhat, xhat.new_zeros(()))
    if weight is not None:
        xhat = xhat * channel_view(weight.to(xhat.dtype), ndim)
    if bias is not None:
        xhat = xhat + channel_view(bias.to(xhat.dtype), ndim)
    return (xhat if act is None else act.forward(xhat)).to(x.dtype)


def grad_sums(
    g: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, mask: Tensor | None = None
) -> Tensor:
    """``(2, C)``: ``sum(g)`` and ``sum(g * xhat)`` per channel over valid positions."""
    ndim, dims, acc = x.dim(), reduce_dims(x.dim(), 1), mean.dtype
    xhat = (x.to(acc) - channel_view(mean, ndim)) * channel_view(invstd, ndim)  # (N, C, *)
    g = g.to(acc)
    if mask is not None:
        m = mask.unsqueeze(1)
        xhat, g = torch.where(m, xhat, xhat.new_zeros(())), torch.where(m, g, g.new_zeros(()))
    return torch.stack([g.sum(dims), (g * xhat).sum(dims)])


def grad_input(
    g: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    sums: Tensor,
    count: Tensor | float,
    mask: Tensor | None = None,
) -> Tensor:
    """``dx = gamma * invstd * (g - sum(g)/n - xhat * sum(g * xhat)/n)`` from given ``sums``
    (``(2, C)``, possibly reduced across processes) and ``count`` values per channel."""
    ndim, acc = x.dim(), mean.dtype
    xhat = (x.to(acc) - channel_view(mean, ndim)) * channel_view(invstd, ndim)  # (N, C, *)
    scale = invstd if weight is None else invstd * weight.to(acc)
    inner = (
        g.to(acc) - channel_view(sums[0] / count, ndim) - xhat * channel_view(sums[1] / count, ndim)
    )
    if mask is not None:  # masked positions output f(beta): no gradient reaches x there
        inner = torch.where(mask.unsqueeze(1), inner, inner.new_zeros(()))
    return (channel_view(scale, ndim) * inner).to(x.dtype)


def _split(x: Tensor, chunks: list[int] | None) -> list[Tensor]:
    return [x] if chunks is None else list(x.split(chunks))


class ReferenceKernel:
    """Batch norm as plain torch ops; every other backend is tested against this one.

    Serves every input and every feature: masks, batch chunks, every activation. Its static
    methods implement :class:`~normlab.functional.BatchNormKernel`; ``backend="reference"``
    selects it.

    Examples
    --------
    >>> import torch
    >>> from normlab.functional import ReferenceKernel
    >>> x = torch.randn(8, 3, 4)
    >>> mean, var = ReferenceKernel.stats(x)
    >>> torch.allclose(mean, x.mean((0, 2))), torch.allclose(var, x.var((0, 2), unbiased=False))
    (True, True)
    """

    name = "reference"
    activations = frozenset(ACTIVATIONS)
    chunked = True
    differentiable = False

    @staticmethod
    def serves(x: Tensor) -> bool:
        """Every input (see :meth:`BatchNormKernel.serves`)."""
        return True

    @staticmethod
    def stats(
        x: Tensor, chunks: list[int] | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per-channel ``(mean, biased var)`` in the accumulation dtype, ``(G·C,)`` with chunks."""
        if chunks is None:
            mean, var, _ = batch_norm_stats(x, mask=mask)
            return mean, var
        parts = [batch_norm_stats(p)[:2] for p in x.split(chunks)]
        return torch.cat([m for m, _ in parts]), torch.cat([v for _, v in parts])

    @staticmethod
    def forward_train(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        act: Activation | None = None,
        chunks: list[int] | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(y, mean, var, invstd)``; ``var`` biased, statistics in the accumulation dtype."""
        mean, var = ReferenceKernel.stats(x, chunks, mask)  # (G·C,)
        invstd = torch.rsqrt(var + eps)
        c = x.shape[1]
        ys = [
            normalize(
                p, mean[i * c : (i + 1) * c], invstd[i * c : (i + 1) * c], weight, bias, mask, act
            )
            for i, p in enumerate(_split(x, chunks))
        ]
        return (ys[0] if len(ys) == 1 else torch.cat(ys)), mean, var, invstd

    @staticmethod
    def forward_eval(
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        act: Activation | None = None,
    ) -> Tensor:
        """Normalize with given statistics (the running ones in eval); differentiable by autograd."""
        acc = accumulation_dtype(x.dtype)
        invstd = torch.rsqrt(var.to(acc) + eps)
        return normalize(x, mean.to(acc), invstd, weight, bias, None, act)

    @staticmethod
    def backward_train(
        dy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        needs: tuple[bool, bool, bool],
        act: Activation | None = None,
        chunks: list[int] | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Closed-form gradients ``(dx, dweight, dbias)``; ``None`` where ``needs`` is False."""
        c = x.shape[1]
        dxs, dw, db = [], None, None
        for i, (xp, dyp) in enumerate(zip(_split(x, chunks), _split(dy, chunks))):
            m, s = mean[i * c : (i + 1) * c], invstd[i * c : (i + 1) * c]
            if act is not None:  # g = dy * f'(z), z recomputed in the accumulation dtype
                z = normalize(xp.to(m.dtype), m, s, weight, bias, mask)
                g = act.backward(dyp.to(m.dtype), z)
            else:
                g = dyp
            sums = grad_sums(g, xp, m, s, mask)  # (2, C)
            dw = sums[1] if dw is None else dw + sums[1]
            total = g.to(m.dtype).sum(reduce_dims(x.dim(), 1))  # masked positions output f(beta)
            db = total if db is None else db + total
            if needs[0]:
                n = xp.numel() // c if mask is None else mask.sum()
                dxs.append(grad_input(g, xp, weight, m, s, sums, n, mask).to(x.dtype))
        dx = (dxs[0] if len(dxs) == 1 else torch.cat(dxs)) if needs[0] else None
        dtype = weight.dtype if weight is not None else mean.dtype
        dweight = dw.to(dtype) if weight is not None and needs[1] and dw is not None else None
        dbias = db.to(dtype) if needs[2] and db is not None else None
        return dx, dweight, dbias

    @staticmethod
    def invert(
        y: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        act: Activation | None,
    ) -> Tensor:
        """``x`` rebuilt from ``y = f(gamma * xhat + beta)`` (invertible ``f``, ``gamma != 0``)."""
        ndim, acc = y.dim(), mean.dtype
        z = y.to(acc) if act is None else act.inverse(y.to(acc))
        if bias is not None:
            z = z - channel_view(bias.to(acc), ndim)
        scale = invstd if weight is None else invstd * weight.to(acc)
        return (z / channel_view(scale, ndim) + channel_view(mean, ndim)).to(y.dtype)


def reference_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    act: Activation | None = None,
    chunks: list[int] | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """The training output from differentiable torch ops only (for double backward)."""
    return ReferenceKernel.forward_train(x, weight, bias, eps, act, chunks, mask)[0]
