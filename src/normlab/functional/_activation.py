r"""The activations a batch norm can be fused with, and what the fused backward needs of them.

``y = f(z)`` with ``z = γ·x̂ + β`` the batch-norm output. The training backward needs
``∂L/∂z = ∂L/∂y · f'(z)`` and ``x̂``. Two cases:

* **invertible** ``f`` (``identity``, ``leaky_relu`` with slope > 0, ``elu``): ``z = f⁻¹(y)``
  and ``f'(z)`` is a function of ``y``, so only the output is kept (InPlace-ABN,
  Rota Bulò et al. 2018):

  ============  ======================  ==========================
  f             z = f⁻¹(y)              f'(z) from y
  ============  ======================  ==========================
  identity      y                       1
  leaky_relu a  y if y ≥ 0 else y/a     1 if y ≥ 0 else a
  elu α         y if y ≥ 0 else         1 if y ≥ 0 else y + α
                log1p(y/α)
  ============  ======================  ==========================

* otherwise (``relu``, ``silu``, ``gelu``): the input ``x`` is kept and ``z`` recomputed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_choice, check_finite, check_positive

__all__ = ["ACTIVATIONS", "Activation", "make_activation"]

ACTIVATIONS = ("identity", "relu", "leaky_relu", "elu", "silu", "gelu")


class Activation(NamedTuple):
    """An activation after batch norm's affine map: a name and its parameter.

    Build one with :func:`make_activation` (which validates the arguments).

    Parameters
    ----------
    name : str
        One of :data:`ACTIVATIONS`.
    param : float
        ``negative_slope`` for leaky_relu, ``alpha`` for elu; unused otherwise.

    Examples
    --------
    >>> import torch
    >>> from normlab.functional import Activation
    >>> act = Activation("leaky_relu", 0.1)
    >>> z = torch.tensor([-2.0, 3.0])
    >>> act.forward(z), act.inverse(act.forward(z)), act.invertible
    (tensor([-0.2000,  3.0000]), tensor([-2.,  3.]), True)
    """

    name: str
    param: float = 0.0

    @property
    def invertible(self) -> bool:
        """Whether ``z`` can be rebuilt from ``y`` (then only the output is kept for backward).

        Examples
        --------
        >>> from normlab.functional import Activation
        >>> Activation("elu", 1.0).invertible, Activation("relu").invertible
        (True, False)
        """
        return self.name in ("identity", "elu") or (self.name == "leaky_relu" and self.param > 0)

    def module(self) -> torch.nn.Module:
        """The ``torch.nn`` module that computes ``f`` (what removing the batch norm leaves)."""
        name, p = self.name, self.param
        if name == "leaky_relu":
            return torch.nn.LeakyReLU(p)
        if name == "elu":
            return torch.nn.ELU(p)
        modules = {"relu": torch.nn.ReLU, "silu": torch.nn.SiLU, "gelu": torch.nn.GELU}
        return modules.get(name, torch.nn.Identity)()

    def forward(self, z: Tensor, *, inplace: bool = False) -> Tensor:
        """``f(z)``.

        Parameters
        ----------
        z : Tensor
            The pre-activation, any shape.
        inplace : bool
            Overwrite ``z`` where the activation allows it.

        Returns
        -------
        Tensor
            ``z``'s shape.

        Examples
        --------
        >>> import torch
        >>> from normlab.functional import Activation
        >>> Activation("relu").forward(torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
        """
        name, p = self.name, self.param
        if name == "identity":
            return z
        if name == "relu":
            return F.relu(z, inplace=inplace)
        if name == "leaky_relu":
            return F.leaky_relu(z, p, inplace=inplace)
        if name == "elu":
            return F.elu(z, p, inplace=inplace)
        if name == "silu":
            return F.silu(z, inplace=inplace)
        return F.gelu(z)

    def backward(self, dy: Tensor, z: Tensor) -> Tensor:
        """``dy · f'(z)`` from the pre-activation ``z``.

        Parameters
        ----------
        dy : Tensor
            The gradient with respect to the output.
        z : Tensor
            The pre-activation, ``dy``'s shape.

        Returns
        -------
        Tensor
            The gradient with respect to ``z``.

        Examples
        --------
        >>> import torch
        >>> from normlab.functional import Activation
        >>> Activation("relu").backward(torch.ones(2), torch.tensor([-1.0, 2.0]))
        tensor([0., 1.])
        """
        name, p = self.name, self.param
        if name == "identity":
            return dy
        if name == "relu":
            return torch.ops.aten.threshold_backward(dy, z, 0.0)
        if name == "leaky_relu":
            return torch.ops.aten.leaky_relu_backward(dy, z, p, False)
        if name == "elu":
            return torch.ops.aten.elu_backward(dy, p, 1.0, 1.0, False, z)
        if name == "silu":
            return torch.ops.aten.silu_backward(dy, z)
        return torch.ops.aten.gelu_backward(dy, z)

    def backward_from_output(self, dy: Tensor, y: Tensor) -> Tensor:
        """``dy · f'(z)`` from the output ``y`` (invertible activations and relu).

        Parameters
        ----------
        dy : Tensor
            The gradient with respect to the output.
        y : Tensor
            The output ``f(z)``, ``dy``'s shape.

        Returns
        -------
        Tensor
            The gradient with respect to ``z``.

        Raises
        ------
        ValueError
            The derivative cannot be taken from the output (silu, gelu).

        Examples
        --------
        >>> import torch
        >>> from normlab.functional import Activation
        >>> Activation("leaky_relu", 0.5).backward_from_output(torch.ones(2), torch.tensor([-1.0, 2.0]))
        tensor([0.5000, 1.0000])
        """
        name, p = self.name, self.param
        if name == "identity":
            return dy
        if name == "relu":
            return torch.ops.aten.threshold_backward(dy, y, 0.0)
        if name == "leaky_relu":
            return torch.ops.aten.leaky_relu_backward(dy, y, p, True)
        if name == "elu":
            return torch.ops.aten.elu_backward(dy, p, 1.0, 1.0, True, y)
        raise ValueError(f"{name} cannot take its derivative from its output")

    def inverse(self, y: Tensor) -> Tensor:
        """``z = f⁻¹(y)`` (invertible activations only).

        Parameters
        ----------
        y : Tensor
            The output ``f(z)``.

        Returns
        -------
        Tensor
            ``z``, ``y``'s shape.

        Raises
        ------
        ValueError
            The activation is not invertible.

        Examples
        --------
        >>> import torch
        >>> from normlab.functional import Activation
        >>> Activation("elu", 1.0).inverse(torch.tensor([-0.5, 2.0]))
        tensor([-0.6931,  2.0000])
        """
        name, p = self.name, self.param
        if name == "identity":
            return y
        if name == "leaky_relu" and p > 0:
            return torch.where(y >= 0, y, y / p)
        if name == "elu":
            return torch.where(y >= 0, y, torch.log1p(y / p))
        raise ValueError(f"{name} is not invertible; the input must be kept")


def make_activation(
    activation: str | None, negative_slope: float = 0.01, alpha: float = 1.0
) -> Activation | None:
    """Validate a layer's activation arguments.

    Parameters
    ----------
    activation : str or None
        ``None`` for none, or one of :data:`ACTIVATIONS`.
    negative_slope : float
        leaky_relu's slope, ``>= 0``.
    alpha : float
        elu's scale, ``> 0``.

    Returns
    -------
    Activation or None

    Raises
    ------
    ValueError
        An unknown activation or an invalid parameter.

    Examples
    --------
    >>> from normlab.functional import make_activation
    >>> make_activation("leaky_relu", 0.2), make_activation(None)
    (Activation(name='leaky_relu', param=0.2), None)
    """
    if activation is None:
        return None
    check_choice(activation, "activation", ACTIVATIONS)
    if activation == "leaky_relu":
        return Activation("leaky_relu", check_finite(negative_slope, "negative_slope", minimum=0.0))
    if activation == "elu":
        return Activation("elu", check_positive(alpha, "alpha"))
    return Activation(activation)
