r"""``BatchNormAct1d/2d/3d``: batch norm fused with its activation, keeping only the output where it can.

For ``y = f(γ·x̂ + β)`` with an invertible ``f`` (``identity``, ``leaky_relu`` with a positive
slope, ``elu``) the backward needs neither ``x`` nor ``x̂`` (Rota Bulò et al. 2018,
InPlace-ABN):

.. math::
    z = f^{-1}(y),\quad \hat x = \frac{z - \beta}{\gamma},\quad
    g = \frac{\partial L}{\partial y}\, f'(z),\quad
    \frac{\partial L}{\partial x} = \frac{\gamma}{\sigma}\Big(g - \overline{g} - \hat x\,\overline{g\hat x}\Big)

so only ``y`` (plus per-channel statistics) is kept for backward: a stack of conv → BN →
activation saves one activation-sized tensor per layer instead of three. ``γ`` is kept at
``|γ| ≥ 1e-5`` (sign kept) in the inversion, as InPlace-ABN does. ``relu``, ``silu`` and
``gelu`` are not invertible: they keep the input and run forward in one fused pass where the
kernels fuse them (ReLU on CPU), composed otherwise. Outputs and gradients equal torch's
batch norm followed by the same activation.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ._base import ActivationOptions, NormBase

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d"]


class _BatchNormAct(ActivationOptions, NormBase):
    kind = "bnact"
    OPTIONS: ClassVar[dict[str, Any]] = {
        **NormBase.OPTIONS,
        "activation": "leaky_relu",
        "negative_slope": 0.01,
        "alpha": 1.0,
    }

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
        activation: str = "leaky_relu",
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        **options: Any,
    ) -> None:
        """Create the layer (the arguments are described in the class docstring)."""
        if activation is None:
            raise ValueError("BatchNormAct needs an activation; use 'identity' for none")
        self._set_activation(activation, negative_slope, alpha)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **options
        )

    def _variant_spec(self) -> dict[str, Any]:
        return {"act": self.act, "save_output": True}


class BatchNormAct1d(_BatchNormAct):
    """BatchNorm1d followed by ``activation``, keeping only the output where it is invertible.

    Takes ``(N, C)`` or ``(N, C, L)`` input (``(N, L, C)`` with ``channel_axis=-1``) and
    returns the same shape.

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
    activation : str
        ``"leaky_relu"``;
        one of ``"identity"``, ``"relu"``, ``"leaky_relu"``, ``"elu"``, ``"silu"``, ``"gelu"``.
    negative_slope : float
        ``leaky_relu``'s slope for negative inputs (default 0.01).
    alpha : float
        ``elu``'s scale for negative inputs (default 1.0).
    **options
        ``bias``, ``nonfinite``, ``single_sample``, ``backend`` and ``channel_axis``
        (``-1``: ``(N, L, C)`` input), as :class:`NormBase`.

    Examples
    --------
    >>> import torch, normlab
    >>> layer = normlab.nn.BatchNormAct1d(8, activation="silu")
    >>> layer(torch.randn(16, 8)).shape
    torch.Size([16, 8])
    """

    _NDIM = (2, 3)
    spatial = 1


class BatchNormAct2d(_BatchNormAct):
    """BatchNorm2d followed by ``activation`` (``"leaky_relu"`` by default; ``"identity"``,
    ``"relu"``, ``"elu"``, ``"silu"``, ``"gelu"``), keeping only the output where it is invertible.

    Takes ``(N, C, H, W)`` input and returns the same shape; for invertible activations the
    backward pass rebuilds what it needs from the output (see the module docstring).

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
    activation : str
        ``"leaky_relu"``;
        one of ``"identity"``, ``"relu"``, ``"leaky_relu"``, ``"elu"``, ``"silu"``, ``"gelu"``.
    negative_slope : float
        ``leaky_relu``'s slope for negative inputs (default 0.01).
    alpha : float
        ``elu``'s scale for negative inputs (default 1.0).
    **options
        ``bias``, ``nonfinite``, ``single_sample`` and ``backend``, as :class:`NormBase`.

    Examples
    --------
    >>> import torch, normlab
    >>> layer = normlab.nn.BatchNormAct2d(8, activation="relu")
    >>> ref = torch.nn.Sequential(torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    >>> x = torch.randn(4, 8, 5, 5)
    >>> torch.allclose(layer(x), ref(x), atol=1e-6)
    True
    """

    _NDIM = (4,)
    spatial = 2


class BatchNormAct3d(_BatchNormAct):
    """BatchNorm3d followed by ``activation`` over ``(N, C, D, H, W)``; see :class:`BatchNormAct2d`.

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
    activation : str
        ``"leaky_relu"``;
        one of ``"identity"``, ``"relu"``, ``"leaky_relu"``, ``"elu"``, ``"silu"``, ``"gelu"``.
    negative_slope : float
        ``leaky_relu``'s slope for negative inputs (default 0.01).
    alpha : float
        ``elu``'s scale for negative inputs (default 1.0).
    **options
        ``bias``, ``nonfinite``, ``single_sample`` and ``backend``, as :class:`NormBase`.

    Examples
    --------
    >>> import torch, normlab
    >>> layer = normlab.nn.BatchNormAct3d(2, activation="identity")
    >>> ref = torch.nn.BatchNorm3d(2)
    >>> x = torch.randn(2, 2, 3, 3, 3)
    >>> torch.allclose(layer(x), ref(x), atol=1e-6)
    True
    """

    _NDIM = (5,)
    spatial = 3
