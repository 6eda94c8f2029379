r"""One variance-scaling core; every named initializer is a one-line specialization of it.

.. math::
    \mathrm{Var}[w] = \frac{\text{scale}}{\text{fan}},\qquad
    \text{fan} = \begin{cases}\text{fan\_in} & \text{mode="fan\_in"}\\
    \text{fan\_out} & \text{mode="fan\_out"}\\ (\text{fan\_in}+\text{fan\_out})/2 & \text{mode="fan\_avg"}\end{cases}

Fans follow torch: ``fan_in = size(1) · receptive field``, ``fan_out = size(0) ·
receptive field``. Distributions (Keras/JAX semantics): ``"normal"`` N(0, Var);
``"uniform"`` U(−√(3·Var), √(3·Var)); ``"truncated_normal"`` N(0, σ²) cut at ±2σ
with σ = √Var / 0.8796…, so that the *truncated* variance is exactly Var.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ._gain import calculate_gain

__all__ = [
    "Distribution",
    "Mode",
    "fans",
    "kaiming_normal_",
    "kaiming_uniform_",
    "lecun_normal_",
    "lecun_uniform_",
    "normal_",
    "ones_",
    "orthogonal_",
    "trunc_normal_",
    "variance_scaling_",
    "xavier_normal_",
    "xavier_uniform_",
    "zeros_",
]

Mode = Literal["fan_in", "fan_out", "fan_avg"]
Distribution = Literal["truncated_normal", "normal", "uniform"]

# std of N(0, 1) truncated to [-2, 2]: dividing by it restores the intended variance
_TRUNC_STD = 0.87962566103423978


def fans(tensor: Tensor) -> tuple[int, int]:
    """``(fan_in, fan_out)`` by torch's rule.

    Parameters
    ----------
    tensor : Tensor
        At least 2-D, ``(out, in, *kernel)``: fans are ``in·∏kernel`` and ``out·∏kernel``.

    Returns
    -------
    (int, int)

    Raises
    ------
    ValueError
        Fewer than 2 dimensions.

    Examples
    --------
    >>> import torch
    >>> from normlab.init import fans
    >>> fans(torch.empty(64, 3, 7, 7)), fans(torch.empty(10, 128))
    ((147, 3136), (128, 10))
    """
    if tensor.dim() < 2:
        raise ValueError(
            f"fan in and fan out need a tensor with at least 2 dimensions, got shape {tuple(tensor.shape)}"
        )
    receptive = math.prod(tensor.shape[2:]) if tensor.dim() > 2 else 1
    return tensor.shape[1] * receptive, tensor.shape[0] * receptive


def variance_scaling_(
    tensor: Tensor,
    scale: float = 1.0,
    mode: Mode = "fan_in",
    distribution: Distribution = "truncated_normal",
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Fill ``tensor`` in place with variance ``scale / fan`` — the one initializer core.

    Keras/JAX semantics: Glorot, He and LeCun are ``scale``/``mode``/``distribution``
    choices of it. ``"truncated_normal"`` cuts at ±2 standard deviations and rescales so the
    variance is still ``scale / fan``.

    Parameters
    ----------
    tensor : Tensor
        At least 2-D: ``(fan_out, fan_in, *kernel)`` as torch's Conv/Linear weights; filled in
        place.
    scale : float
        The variance times the fan, ``> 0`` (a gain squared).
    mode : {"fan_in", "fan_out", "fan_avg"}
        Which fan (:func:`fans`).
    distribution : {"truncated_normal", "normal", "uniform"}
        The distribution drawn from.
    generator : torch.Generator, optional
        The random source (default: torch's global one).

    Returns
    -------
    Tensor
        ``tensor``.

    Raises
    ------
    ValueError
        ``scale <= 0``, an unknown ``mode`` or ``distribution``, or a 1-D tensor.

    Examples
    --------
    >>> import torch
    >>> from normlab import init
    >>> w = torch.empty(400, 300)
    >>> _ = init.variance_scaling_(w, 2.0, "fan_in", "uniform", generator=torch.Generator().manual_seed(0))
    >>> round(w.var().item() * 300, 1)                 # scale / fan_in -> 2.0
    2.0
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    fan_in, fan_out = fans(tensor)
    fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}.get(mode)
    if fan is None:
        raise ValueError(f"mode must be 'fan_in', 'fan_out' or 'fan_avg', got {mode!r}")
    variance = scale / max(1.0, fan)
    with torch.no_grad():
        if distribution == "truncated_normal":
            std = math.sqrt(variance) / _TRUNC_STD
            return torch.nn.init.trunc_normal_(
                tensor, 0.0, std, -2 * std, 2 * std, generator=generator
            )
        if distribution == "normal":
            return tensor.normal_(0.0, math.sqrt(variance), generator=generator)
        if distribution == "uniform":
            limit = math.sqrt(3.0 * variance)
            return tensor.uniform_(-limit, limit, generator=generator)
    raise ValueError(
        f"distribution must be 'truncated_normal', 'normal' or 'uniform', got {distribution!r}"
    )


# --- torch-compatible names: one line each over the core -----------------------------------


def xavier_uniform_(
    tensor: Tensor, gain: float = 1.0, *, generator: torch.Generator | None = None
) -> Tensor:
    """Glorot & Bengio 2010: U(±gain·√(6/(fan_in+fan_out))) — as ``torch.nn.init.xavier_uniform_``.

    Parameters
    ----------
    tensor : Tensor
        At least 2-D: ``(fan_out, fan_in, *kernel)`` as torch's Conv/Linear weights; filled in
        place.
    gain : float
        Multiplies the standard deviation.
    generator : torch.Generator, optional
        The random source (default: torch's global one).

    Returns
    -------
    Tensor
        ``tensor``.

    Examples
    --------
    >>> import torch
    >>> from normlab import init
    >>> w = torch.empty(400, 300)
    >>> _ = init.xavier_uniform_(w, generator=torch.Generator().manual_seed(0))
    >>> round(w.abs().max().item(), 2)                 # sqrt(6 / 700)
    0.09
    """
    return variance_scaling_(tensor, gain**2, "fan_avg", "uniform", generator=generator)


def xavier_normal_(
    tensor: Tensor, gain: float = 1.0, *, generator: torch.Generator | None = None
) -> Tensor:
    """Glorot & Bengio 2010: N(0, gain²·2/(fan_in+fan_out)) — as ``torch.nn.init.xavier_normal_``.

    Parameters
    ----------
    tensor : Tensor
        At least 2-D: ``(fan_out, fan_in, *kernel)`` as torch's Conv/Linear weights; filled in
        place.
    gain : float
        Multiplies the standard deviation.
    generator : torch.Generator, optional
        The random source (default: torch's global one).

    Returns
    -------
    Tensor
        ``tensor``.

    Examples
    --------
    >>> import torch
    >>> from normlab import init
    >>> w = torch.empty(400, 300)
    >>> _ = init.xavier_normal_(w, generator=torch.Generator().manual_seed(0))
    >>> round(w.std().item(), 2)                       # sqrt(2 / 700)
    0.05
    """
    return variance_scaling_(tensor, gain**2, "fan_avg", "normal", generator=generator)


def kaiming_uniform_(
    tensor: Tensor,
    a: float = 0.0,
    mode: Mode = "fan_in",
    nonlinearity: str = "leaky_relu",
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """He et al. 2015: U(±gain·√(3/fan)) — as ``torch.nn.init.kaiming_uniform_``.

    Parameters
    ----------
    tensor : Tensor
        At least 2-D: ``(fan_out, fan_in, *kernel)`` as torch's Conv/Linear weights; filled in
        place.
    a : float
        The negative slope of the rectifier after the layer (leaky_relu).
    mode : {"fan_in", "fan_out", "fan_avg"}
        ``"fan_in"`` keeps the forward variance, ``"fan_out"`` the backward one.
    nonlinearity : str
        The activation after the layer (:func:`calculate_gain`'s names).
    generator : torch.Generator, optional
        The random source (default: torch's global one).

    Returns
    -------
    Tensor
        ``tensor``.

    Examples
    --------
    >>> import torch
    >>> from normlab import init
    >>> w = torch.empty(400, 300)
    >>> _ = init.kaiming_uniform_(w, nonlinearity="relu", generator=torch.Generator().manual_seed(0))
    >>> round(w.abs().max().item(), 2)                 # sqrt(2) * sqrt(3 / 300)
    0.14
    """
    return variance_scaling_(
        tensor, calculate_gain(nonlinearity, a) ** 2, mode, "uniform", generator=generator
    )


def kaiming_normal_(
    tensor: Tensor,
    a: float = 0.0,
    mode: Mode = "fan_in",
    nonlinearity: str = "leaky_relu",
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """He et al. 2015: N(0, gain²/fan) — as ``torch.nn.init.kaiming_normal_``.

    Parameters
    ----------
    tensor : Tensor
        At least 2-D: ``(fan_out, fan_in, *kernel)`` as torch's Conv/Linear weights; filled in
        place.
    a : float
        The negative slope of the rectifier after the layer (leaky_relu).
    mode : {"fan_in", "fan_out", "fan_avg"}
        ``"fan_in"`` keeps the forward variance, ``"fan_out"`` the backward one.
    nonlinearity : str
        The activation after the layer (:func:`calculate_gain`'s names).
    generator : torch.Generator, optional
        The random source (default: torch's global one).

    Returns
    -------
    Tensor
        ``tensor``.

    Examples
    --------
    >>> import torch
    >>> from normlab import init
    >>> w = torch.empty(400, 300)
    >>> _ = init.kaiming_normal_(w, nonlinearity="relu", generator=torch.Generator().manual_seed(0))
    >>> round(w.std().item(), 2)                       # sqrt(2 / 300)
    0.08
    """
    return variance_scaling_(
        tensor, calculate_gain(nonlinearity, a) ** 2, mode, "normal", generator=generator
    )


def lecun_uniform_(tensor: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """LeCun et al. 1998: U(±√(3/fan_in)) (Keras/JAX ``lecun_uniform``).

    Parameters
    ----------
    tensor : Tensor
        At least 2-D: ``(fan_out, fan_in, *kernel)`` as torch's Conv/Linear weights; filled in
        place.
    generator : torch.Generator, optional
        The random source (default: torch's global one).

    Returns
    -------
    Tensor
        ``tensor``.

    Examples
    --------
    >>> import torch
    >>> from normlab import init
    >>> w = torch.empty(400, 300)
    >>> _ = init.lecun_uniform_(w, generator=torch.Generator().manual_seed(0))
    >>> round(w.std().item(), 2)                       # sqrt(1 / 300)
    0.06
    """
    return variance_scaling_(tensor, 1.0, "fan_in", "uniform", generator=generator)


def lecun_normal_(tensor: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Truncated normal with variance 1/fan_in (Keras/JAX ``lecun_normal``; SELU's init).

    Parameters
    ----------
    tensor : Tensor
        At least 2-D: ``(fan_out, fan_in, *kernel)`` as torch's Conv/Linear weights; filled in
        place.
    generator : torch.Generator, optional
        The random source (default: torch's global one).

    Returns
    -------
    Tensor
        ``tensor``.

    Examples
    --------
    >>> import torch
    >>> from normlab import init
    >>> w = torch.empty(400, 300)
    >>> _ = init.lecun_normal_(w, generator=torch.Generator().manual_seed(0))
    >>> round(w.std().item(), 2)                       # sqrt(1 / 300)
    0.06
    """
    return variance_scaling_(tensor, 1.0, "fan_in", "truncated_normal", generator=generator)


def normal_(
    tensor: Tensor, mean: float = 0.0, std: float = 1.0, *, generator: torch.Generator | None = None
) -> Tensor:
    """N(mean, std²) — as ``torch.nn.init.normal_``.

    Parameters
    ----------
    tensor : Tensor
        Any shape; filled in place.
    mean : float
        The mean.
    std : float
        The standard deviation.
    generator : torch.Generator, optional
        The random source (default: torch's global one).

    Returns
    -------
    Tensor
        ``tensor``.

    Examples
    --------
    >>> import torch
    >>> from normlab import init
    >>> w = torch.empty(400, 300)
    >>> _ = init.normal_(w, 1.0, 0.01, generator=torch.Generator().manual_seed(0))
    >>> round(w.mean().item(), 2), round(w.std().item(), 2)
    (1.0, 0.01)
    """
    return torch.nn.init.normal_(tensor, mean, std, generator=generator)


def trunc_normal_(
    tensor: Tensor,
    mean: float = 0.0,
    std: float = 1.0,
    a: float = -2.0,
    b: float = 2.0,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """N(mean, std²) truncated to the *absolute* bounds [a, b] — torch's semantics.

    Parameters
    ----------
    tensor : Tensor
        Any shape; filled in place.
    mean : float
        The mean before truncation.
    std : float
        The standard deviation before truncation.
    a : float
        The lower bound (absolute, not in standard deviations).
    b : float
        The upper bound.
    generator : torch.Generator, optional
        The random source (default: torch's global one).

    Returns
    -------
    Tensor
        ``tensor``.

    Examples
    --------
    >>> import torch
    >>> from normlab import init
    >>> w = torch.empty(400, 300)
    >>> _ = init.trunc_normal_(w, std=1.0, a=-0.5, b=0.5, generator=torch.Generator().manual_seed(0))
    >>> w.min().item() >= -0.5 and w.max().item() <= 0.5
    True
    """
    return torch.nn.init.trunc_normal_(tensor, mean, std, a, b, generator=generator)


def orthogonal_(
    tensor: Tensor, gain: float = 1.0, *, generator: torch.Generator | None = None
) -> Tensor:
    """Saxe et al. 2014: a (semi-)orthogonal matrix times ``gain`` — as ``torch.nn.init.orthogonal_``.

    float16/bfloat16 tensors get the float32 matrix rounded (torch's QR has no 16-bit CPU kernel).

    Parameters
    ----------
    tensor : Tensor
        At least 2-D; flattened to ``(rows, cols)`` and filled in place.
    gain : float
        Multiplies the matrix.
    generator : torch.Generator, optional
        The random source (default: torch's global one).

    Returns
    -------
    Tensor
        ``tensor``.

    Examples
    --------
    >>> import torch
    >>> from normlab import init
    >>> w = torch.empty(400, 300)
    >>> _ = init.orthogonal_(w, generator=torch.Generator().manual_seed(0))
    >>> torch.allclose(w.T @ w, torch.eye(300), atol=1e-4)     # orthonormal columns
    True
    """
    if tensor.dtype in (torch.float16, torch.bfloat16):
        with torch.no_grad():
            full = torch.empty(tensor.shape, dtype=torch.float32, device=tensor.device)
            return tensor.copy_(torch.nn.init.orthogonal_(full, gain, generator=generator))
    return torch.nn.init.orthogonal_(tensor, gain, generator=generator)


def zeros_(tensor: Tensor) -> Tensor:
    """Fill ``tensor`` with zeros — as ``torch.nn.init.zeros_``.

    Parameters
    ----------
    tensor : Tensor
        Any shape; filled in place.

    Returns
    -------
    Tensor
        ``tensor``.

    Examples
    --------
    >>> import torch
    >>> from normlab.init import zeros_
    >>> zeros_(torch.empty(2, 3)).sum().item()
    0.0
    """
    return torch.nn.init.zeros_(tensor)


def ones_(tensor: Tensor) -> Tensor:
    """Fill ``tensor`` with ones — as ``torch.nn.init.ones_``.

    Parameters
    ----------
    tensor : Tensor
        Any shape; filled in place.

    Returns
    -------
    Tensor
        ``tensor``.

    Examples
    --------
    >>> import torch
    >>> from normlab.init import ones_
    >>> ones_(torch.empty(2, 3)).sum().item()
    6.0
    """
    return torch.nn.init.ones_(tensor)
