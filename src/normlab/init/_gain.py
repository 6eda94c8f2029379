r"""Gains: torch's table for torch's names; the second-moment rule for the others.

The rule: :math:`\text{gain} = 1 / \sqrt{\mathrm{E}[f(z)^2]}` with :math:`z \sim N(0, 1)`,
the factor that keeps the second moment of a layer's pre-activations constant
through ``f`` (He et al. 2015's argument). It gives √2 for ReLU, torch's value.
Computed once by Gauss–Hermite quadrature (200 nodes):

============ ========= =========================================
activation   gain      note
============ ========= =========================================
gelu         1.5335    (exact erf form)
silu / swish 1.6765
mish         1.4868
elu          1.2452    alpha = 1 (``param`` sets alpha)
softplus     1.0419    beta = 1 (``param`` sets beta)
============ ========= =========================================
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

__all__ = ["KNOWN_NONLINEARITIES", "calculate_gain", "second_moment_gain"]

_TORCH_NAMES = (
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "selu",
)
_RULE_NAMES = ("gelu", "silu", "swish", "mish", "elu", "softplus")
KNOWN_NONLINEARITIES = _TORCH_NAMES + _RULE_NAMES


def _activation(name: str, param: float | None) -> torch.nn.Module:
    if name == "gelu":
        return torch.nn.GELU()
    if name in ("silu", "swish"):
        return torch.nn.SiLU()
    if name == "mish":
        return torch.nn.Mish()
    if name == "elu":
        return torch.nn.ELU(alpha=1.0 if param is None else float(param))
    return torch.nn.Softplus(beta=1.0 if param is None else float(param))


@functools.cache
def second_moment_gain(name: str, param: float | None = None, nodes: int = 200) -> float:
    """``1 / sqrt(E[f(z)^2])``, ``z ~ N(0, 1)``, by Gauss–Hermite quadrature.

    The gain that keeps the second moment of activations at 1 through a layer followed by
    ``f`` (the rule behind He's √2 for ReLU), for activations torch's table lacks.

    Parameters
    ----------
    name : str
        ``"gelu"``, ``"silu"``/``"swish"``, ``"mish"``, ``"elu"`` or ``"softplus"``.
    param : float, optional
        elu's alpha or softplus's beta.
    nodes : int
        Quadrature nodes.

    Returns
    -------
    float

    Examples
    --------
    >>> from normlab.init import second_moment_gain
    >>> round(second_moment_gain("gelu"), 2), round(second_moment_gain("silu"), 2)
    (1.53, 1.68)
    """
    z, w = np.polynomial.hermite_e.hermegauss(nodes)  # weight exp(-z²/2)
    fz = _activation(name, param)(torch.from_numpy(z)).double().numpy()
    moment = float(np.sum(w * fz**2) / math.sqrt(2 * math.pi))
    return 1.0 / math.sqrt(moment)


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """The recommended gain for ``nonlinearity`` (torch's table, extended by the second-moment rule).

    torch's names (``"relu"``, ``"tanh"``, ``"leaky_relu"``, ``"selu"``, ``"conv2d"``, …) get
    torch's values; ``"gelu"``, ``"silu"``, ``"swish"``, ``"mish"``, ``"elu"`` and
    ``"softplus"`` get :func:`second_moment_gain`.

    Parameters
    ----------
    nonlinearity : str
        One of :data:`KNOWN_NONLINEARITIES`.
    param : float, optional
        leaky_relu's negative slope, elu's alpha, softplus's beta.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        An unknown nonlinearity (the message lists the known ones).

    Examples
    --------
    >>> from normlab.init import calculate_gain
    >>> round(calculate_gain("relu"), 4), round(calculate_gain("gelu"), 2), calculate_gain("linear")
    (1.4142, 1.53, 1.0)
    """
    if nonlinearity in _TORCH_NAMES:
        return float(torch.nn.init.calculate_gain(nonlinearity, param))  # type: ignore[arg-type]
    if nonlinearity in _RULE_NAMES:
        return second_moment_gain(nonlinearity, param)
    raise ValueError(
        f"unsupported nonlinearity {nonlinearity!r}; known: {', '.join(KNOWN_NONLINEARITIES)}"
    )
