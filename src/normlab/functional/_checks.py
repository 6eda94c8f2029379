"""Argument validation, in one place: every entry point checks here before any kernel runs.

Two kinds of checks:

* **arguments** (constructors and functional calls): a ``ValueError`` (or ``TypeError``)
  that names the argument, e.g. ``eps must be a non-negative finite number, got -1``;
* **tensors against each other**: torch's own messages and exception types, so code that
  matches torch's errors keeps working (``running_mean should contain 64 elements not 3``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_channels",
    "check_choice",
    "check_eps",
    "check_finite",
    "check_input",
    "check_mask",
    "check_momentum",
    "check_num_features",
    "check_positive",
]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_eps(eps: Any, name: str = "eps") -> float:
    """``eps`` as a float; ``ValueError`` unless it is a finite number ``>= 0`` (torch: ``>= 0``)."""
    if not _is_number(eps) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{name} must be a non-negative finite number, got {eps!r}")
    return float(eps)


def check_momentum(momentum: Any) -> float | None:
    """``None`` (cumulative average) or a float in ``[0, 1]``."""
    if momentum is None:
        return None
    if not _is_number(momentum) or not 0.0 <= momentum <= 1.0:
        raise ValueError(
            f"momentum must be a number in [0, 1] or None (cumulative average), got {momentum!r}"
        )
    return float(momentum)


def check_num_features(num_features: Any, name: str = "num_features") -> int:
    """A positive ``int`` (``bool`` and floats are refused)."""
    if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
        raise ValueError(f"{name} must be a positive integer, got {num_features!r}")
    return num_features


def check_positive(value: Any, name: str, *, integer: bool = False, minimum: float = 0.0) -> Any:
    """A finite number ``> minimum`` (``>= minimum`` for integers); ``integer`` refuses floats."""
    if integer:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {int(minimum)}, got {value!r}")
        return value
    if not _is_number(value) or not math.isfinite(value) or value <= minimum:
        raise ValueError(f"{name} must be a finite number > {minimum:g}, got {value!r}")
    return float(value)


def check_finite(value: Any, name: str, *, minimum: float | None = None) -> float:
    """A finite number, ``>= minimum`` when given."""
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value!r}")
    return float(value)


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``; ``ValueError`` listing them otherwise."""
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {listed}, got {value!r}")
    return value


def check_input(input: Any, *, what: str = "batch_norm", ndims: Sequence[int] = ()) -> None:
    """A floating-point tensor of at least 2 dimensions (``(N, C, *)``), or of ``ndims``."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{what} expects a torch.Tensor input, got {type(input).__name__}")
    if ndims and input.dim() not in ndims:
        allowed = " or ".join(f"{d}D" for d in ndims)
        raise ValueError(f"expected {allowed} input (got {input.dim()}D input)")
    if input.dim() < 2:
        raise ValueError(
            f"{what} expects an input of at least 2 dimensions (N, C, ...), got {input.dim()}D"
        )
    if not input.is_floating_point():
        raise TypeError(f"{what} expects a floating-point input, got {input.dtype}")


def check_channels(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> None:
    """Each given per-channel tensor holds one element per channel of ``input`` ``(N, C, *)``,
    in torch's order and words (``RuntimeError: running_mean should contain 64 elements not
    3``), is floating point and lives on the input's device.

    Examples
    --------
    >>> import torch
    >>> check_channels(torch.randn(2, 3), torch.zeros(3), torch.ones(3))
    >>> check_channels(torch.randn(2, 64), torch.zeros(3))
    Traceback (most recent call last):
    ...
    RuntimeError: running_mean should contain 64 elements not 3
    """
    channels, device = input.shape[1], input.device
    for name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        if t is None:
            continue
        if t.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != device:
            raise RuntimeError(
                f"{name} is on {t.device} but the input is on {device}; move the layer with "
                f".to({str(device)!r})"
            )


def check_mask(
    input: Tensor, mask: Any, channel_axis: int = 1, *, per_channel: bool = False
) -> Tensor:
    """A bool mask with the input's shape without its channel axis (or, with ``per_channel``,
    the input's own shape), on the input's device; returned with the input's number of
    dimensions (the channel axis of size 1 unless per-channel)."""
    ca = channel_axis % input.dim()
    expected = tuple(input.shape[:ca] + input.shape[ca + 1 :])
    shape = tuple(mask.shape) if isinstance(mask, Tensor) else None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor, got {got}")
    if shape != expected and not (per_channel and shape == tuple(input.shape)):
        raise ValueError(
            "mask must be a bool tensor with the input's shape without its channel axis, "
            f"expected {expected}, got {shape}"
        )
    if mask.device != input.device:
        raise RuntimeError(f"mask is on {mask.device} but the input is on {input.device}")
    return mask if shape == tuple(input.shape) else mask.unsqueeze(ca)
