"""``backend="fused"``: normlab's own C++/OpenMP batch-norm kernels (built by :mod:`._build`).

What is fused (see the .cpp header for the math):

* train forward: one read of ``x`` from memory for shifted per-channel sums, one more (from
  cache on NCHW) to write ``y = f((x - mean) * gamma * invstd + beta)``;
* train backward: one pass for ``sum(g)`` and ``sum(g * (x - mean))``, one to write
  ``dx = k1 * g + k2 * (x - mean) + k3`` with ``g = dy * f'(z)`` recomputed from ``x``;
* eval forward: one pass; the inverse of BN + leaky ReLU (InPlace-ABN's backward): one pass;
* batch ``chunks`` (Ghost BN's virtual batches) run on views of ``x`` in one C++ call;
* ``f`` is the identity, ReLU, leaky ReLU (``negative_slope``) or SiLU, applied in the same
  pass (the backward recomputes its derivative from ``x``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._build import load_fused, require_fused

__all__ = ["FusedKernel", "fused_available"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def fused_available() -> bool:
    """Whether the fused kernels are usable (compiling them now if needed).

    The first call in a process may compile them (15–60 s, once per machine and torch
    version; ``normlab kernels build`` does it ahead of time); without a C++ compiler it is
    ``False`` and ``backend="auto"`` uses ATen.

    Returns
    -------
    bool

    Examples
    --------
    >>> from normlab.kernels import fused_available
    >>> isinstance(fused_available(), bool)
    True
    """
    return load_fused() is not None


_NONE, _LEAKY, _SILU = 0, 1, 2  # the C++ activation codes


def _entry(name: str) -> Any:
    """The C++ entry point ``name``: the pybind function in eager code (a ``torch.ops`` call
    costs ~15 µs of boxing), the registered op inside ``torch.compile``."""
    fused = require_fused()
    return getattr(fused.ops if torch.compiler.is_compiling() else fused.module, name)


def _act(act: Any) -> tuple[int, float]:
    """The C++ kernels' ``(act, slope)`` arguments (ReLU is leaky ReLU with slope 0)."""
    if act is None or act.name == "identity":
        return _NONE, 0.0
    if act.name == "relu":
        return _LEAKY, 0.0
    if act.name == "silu":
        return _SILU, 0.0
    assert act.name == "leaky_relu", f"the fused kernels do not fuse {act.name}"
    return _LEAKY, float(act.param)


class FusedKernel:
    """normlab's C++/OpenMP batch norm behind the kernel protocol (``backend="fused"``).

    ``(N, C, *)`` input in any layout (NCHW and channels_last run natively, anything else is
    made contiguous); statistics in float32 for fp16/bf16 input (else the input dtype),
    biased ``var``. No mask. :func:`~normlab.functional.resolve_kernel` hands it only inputs
    it serves; the C++ entry points check their arguments again. Its static methods implement
    :class:`~normlab.functional.BatchNormKernel`.

    Examples
    --------
    >>> import torch
    >>> from normlab.kernels import FusedKernel
    >>> FusedKernel.serves_input(torch.randn(4, 3, 8)), FusedKernel.serves_input(torch.zeros(4, dtype=torch.long))
    (True, False)
    """

    name = "fused"
    activations = frozenset({"identity", "relu", "leaky_relu", "silu"})
    chunked = True
    differentiable = False

    @staticmethod
    def serves_input(x: Tensor) -> bool:
        """CPU, a floating dtype, non-empty, at least 2-D (whether the kernels are built aside).

        Parameters
        ----------
        x : Tensor
            The input.

        Returns
        -------
        bool
        """
        return x.device.type == "cpu" and x.dtype in _DTYPES and x.numel() > 0 and x.dim() >= 2

    @staticmethod
    def serves(x: Tensor) -> bool:
        """:meth:`serves_input` and the kernels are built and usable."""
        return FusedKernel.serves_input(x) and fused_available()

    @staticmethod
    def stats(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(mean, biased var)`` in one pass of shifted sums (the forward's reduction alone)."""
        assert mask is None, "the fused kernels take no mask"
        mean, var = _entry("stats")(x)
        return mean, var

    @staticmethod
    def forward_train(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        act: Any = None,
        chunks: list[int] | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(y, mean, var_biased, invstd)``; with ``chunks`` the statistics are ``(G·C,)``."""
        assert mask is None, "the fused kernels take no mask"
        y, mean, var, invstd = _entry("forward_train")(x, weight, bias, eps, *_act(act), chunks)
        return y, mean, var, invstd

    @staticmethod
    def backward_train(
        dy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        needs: tuple[bool, bool, bool],
        act: Any = None,
        chunks: list[int] | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Closed-form ``(dx, dweight, dbias)`` in two passes (γ/β gradients summed over chunks)."""
        assert mask is None, "the fused kernels take no mask"
        want_w = needs[1] and weight is not None
        dx, dw, db = _entry("backward_train")(
            dy, x, weight, bias, mean, invstd, *_act(act), [needs[0], want_w, needs[2]], chunks
        )
        if weight is not None:  # grads in the parameters' dtype (fp32 stats for bf16 input)
            dw = dw.to(weight.dtype) if want_w else None
            db = db.to(weight.dtype) if needs[2] else None
        return (dx if needs[0] else None, dw if want_w else None, db if needs[2] else None)

    @staticmethod
    def forward_eval(
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        act: Any = None,
    ) -> Tensor:
        """``f((x - mean) * weight / sqrt(var + eps) + bias)`` in one pass (not differentiable)."""
        out: Tensor = _entry("forward_eval")(x, mean, var, weight, bias, eps, *_act(act))
        return out

    @staticmethod
    def invert(
        y: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        act: Any,
    ) -> Tensor | None:
        """``x`` rebuilt from ``y = f(BN(x))`` in one pass for the identity and leaky ReLU
        (slope > 0); ``None`` for other activations. ``gamma`` must be kept away from 0."""
        leaky = act is not None and act.name == "leaky_relu" and act.param > 0
        if act is not None and act.name != "identity" and not leaky:
            return None
        slope = 1.0 if act is None or act.name == "identity" else float(act.param)
        x: Tensor = _entry("invert_act")(y, mean, invstd, weight, bias, slope)
        return x
