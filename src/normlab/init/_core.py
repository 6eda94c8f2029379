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
    """``(fan_in, fan_out)`` by torch's rule (at least 2 dimensions)."""
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
    """Fill ``tensor`` in place with variance ``scale / fan``; returns it."""
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
    """Glorot & Bengio 2010: U(±gain·√(6/(fan_in+fan_out))) — as ``torch.nn.init.xavier_uniform_``."""
    return variance_scaling_(tensor, gain**2, "fan_avg", "uniform", generator=generator)


def xavier_normal_(
    tensor: Tensor, gain: float = 1.0, *, generator: torch.Generator | None = None
) -> Tensor:
    """N(0, gain²·2/(fan_in+fan_out)) — as ``torch.nn.init.xavier_normal_``."""
    return variance_scaling_(tensor, gain**2, "fan_avg", "normal", generator=generator)


def kaiming_uniform_(
    tensor: Tensor,
    a: float = 0.0,
    mode: Mode = "fan_in",
    nonlinearity: str = "leaky_relu",
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """He et al. 2015: U(±gain·√(3/fan)) — as ``torch.nn.init.kaiming_uniform_``."""
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
    """He et al. 2015: N(0, gain²/fan) — as ``torch.nn.init.kaiming_normal_``."""
    return variance_scaling_(
        tensor, calculate_gain(nonlinearity, a) ** 2, mode, "normal", generator=generator
    )


def lecun_uniform_(tensor: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """LeCun et al. 1998: U(±√(3/fan_in)) (Keras/JAX ``lecun_uniform``)."""
    return variance_scaling_(tensor, 1.0, "fan_in", "uniform", generator=generator)


def lecun_normal_(tensor: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Truncated normal with variance 1/fan_in (Keras/JAX ``lecun_normal``; SELU's init)."""
    return variance_scaling_(tensor, 1.0, "fan_in", "truncated_normal", generator=generator)


def normal_(
    tensor: Tensor, mean: float = 0.0, std: float = 1.0, *, generator: torch.Generator | None = None
) -> Tensor:
    """N(mean, std²) — as ``torch.nn.init.normal_``."""
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
    """N(mean, std²) truncated to the *absolute* bounds [a, b] — torch's semantics."""
    return torch.nn.init.trunc_normal_(tensor, mean, std, a, b, generator=generator)


def orthogonal_(
    tensor: Tensor, gain: float = 1.0, *, generator: torch.Generator | None = None
) -> Tensor:
    """Saxe et al. 2014: a (semi-)orthogonal matrix times ``gain`` — as ``torch.nn.init.orthogonal_``.

    float16/bfloat16 tensors get the float32 matrix rounded (torch's QR has no 16-bit CPU kernel).
    """
    if tensor.dtype in (torch.float16, torch.bfloat16):
        with torch.no_grad():
            full = torch.empty(tensor.shape, dtype=torch.float32, device=tensor.device)
            return tensor.copy_(torch.nn.init.orthogonal_(full, gain, generator=generator))
    return torch.nn.init.orthogonal_(tensor, gain, generator=generator)


def zeros_(tensor: Tensor) -> Tensor:
    return torch.nn.init.zeros_(tensor)


def ones_(tensor: Tensor) -> Tensor:
    return torch.nn.init.ones_(tensor)
