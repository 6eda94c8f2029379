r"""``BatchNormAct1d/2d``: BatchNorm fused with an invertible activation, saving only the output (InPlace-ABN).

Rota Bulò et al. 2018: for ``y = f(γ·x̂ + β)`` with an invertible ``f``, the backward
needs neither ``x`` nor ``x̂``:

.. math::
    z = f^{-1}(y),\quad \hat x = \frac{z - \beta}{\gamma},\quad
    \frac{\partial L}{\partial z} = \frac{\partial L}{\partial y}\, f'(z),\quad
    \frac{\partial L}{\partial x} = \frac{\gamma}{\sigma}\Big(g - \overline{g} - \hat x\,\overline{g\hat x}\Big)

with :math:`g = \partial L/\partial z` and bars the per-channel means. So only ``y`` (plus
per-channel statistics) is kept for backward instead of the BN input *and* the
activation input: a stack of conv → BN → activation saves one activation-sized tensor
per layer instead of three. ``γ`` is clamped to ``|γ| ≥ 1e-5`` (sign kept) in the
inversion, as InPlace-ABN does. ``relu`` is not invertible (every negative input maps to
0): use ``leaky_relu`` with a small slope.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ..functional import NonFinite, channel_view, reduce_dims, resolve_kernel
from ..functional._backend import fused_for_layer
from ..kernels import FusedKernel, invert_batch_norm_act
from ._batchnorm import NormBase, SingleSample

__all__ = ["Activation", "BatchNormAct1d", "BatchNormAct2d"]

Activation = Literal["identity", "leaky_relu", "elu"]
_GAMMA_EPS = 1e-5


def _activate(z: Tensor, activation: str, param: float) -> Tensor:
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu_(z, param)
    if activation == "elu":
        return torch.nn.functional.elu_(z, param)
    return z


def _invert(y: Tensor, activation: str, param: float) -> tuple[Tensor, Tensor | float]:
    """``(z, f'(z))`` from the output ``y`` alone."""
    if activation == "leaky_relu":
        positive = y >= 0
        return torch.where(positive, y, y / param), torch.where(positive, 1.0, param).to(y.dtype)
    if activation == "elu":  # y = α(e^z − 1) for z < 0  ⇒  z = log1p(y/α), f'(z) = y + α
        positive = y >= 0
        return torch.where(positive, y, torch.log1p(y / param)), torch.where(
            positive, torch.ones_like(y), y + param
        )
    return y, 1.0


def _safe_gamma(weight: Tensor) -> Tensor:
    sign = torch.where(weight >= 0, 1.0, -1.0).to(weight.dtype)
    return sign * weight.abs().clamp_min(_GAMMA_EPS)


class _BatchNormActTrain(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        activation: str,
        param: float,
        backend: str,
    ) -> tuple[Tensor, Tensor, Tensor]:
        kernel = resolve_kernel(backend, x, None)
        # fused: BN and leaky ReLU in one pass, and a backward that rebuilds x from y in one pass
        # (the other route is a torch-ops backward, several times slower)
        ctx.fused = activation in ("leaky_relu", "identity") and fused_for_layer(backend, x)
        if ctx.fused:
            slope = param if activation == "leaky_relu" else None
            y, mean, var, invstd = FusedKernel.forward_train(
                x, weight, bias, eps, negative_slope=slope
            )
        else:
            y, mean, var, invstd = kernel.forward_train(x, weight, bias, eps)
            y = _activate(y, activation, param)  # in place: the BN output is not kept
        ctx.activation, ctx.param = activation, param
        ctx.save_for_backward(y, weight, bias, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:
        y, weight, bias, mean, invstd = ctx.saved_tensors
        if ctx.fused:
            return _fused_backward(ctx, dy, y, weight, bias, mean, invstd)
        ndim, acc = y.dim(), invstd.dtype
        dims = reduce_dims(ndim, 1)
        n = y.numel() // y.shape[1]
        z, slope = _invert(y.to(acc), ctx.activation, ctx.param)
        g = dy.to(acc) * slope  # ∂L/∂z, (N, C, *)
        gamma = _safe_gamma(weight.to(acc)) if weight is not None else None
        beta = bias.to(acc) if bias is not None else None
        xhat = z if beta is None else z - channel_view(beta, ndim)
        if gamma is not None:
            xhat = xhat / channel_view(gamma, ndim)
        sum_g = g.sum(dims)
        sum_gx = (g * xhat).sum(dims)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            scale = invstd if gamma is None else gamma * invstd
            dx = channel_view(scale, ndim) * (
                g - channel_view(sum_g / n, ndim) - xhat * channel_view(sum_gx / n, ndim)
            )
            dx = dx.to(dy.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = sum_gx.to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            dbias = sum_g.to(bias.dtype)
        return dx, dweight, dbias, None, None, None, None


def _fused_backward(
    ctx: Any,
    dy: Tensor,
    y: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
) -> tuple[Tensor | None, ...]:
    """x rebuilt from y (one pass), then the fused kernel's BN + leaky-ReLU backward."""
    gamma = _safe_gamma(weight) if weight is not None else None
    leaky = ctx.activation == "leaky_relu"
    x = invert_batch_norm_act(y, mean, invstd, gamma, bias, ctx.param if leaky else 1.0)
    assert x is not None  # the forward checked that the kernels serve this input
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
    slope = ctx.param if leaky else None
    if leaky and y.dtype in (torch.float16, torch.bfloat16):
        # x rebuilt in 16 bits can flip the sign of pre-activations near 0, and the kernel
        # takes the leaky-ReLU mask from x: take it from y's sign here instead (one more pass)
        dy = torch.ops.aten.leaky_relu_backward(dy, y, ctx.param, True)
        slope = None
    dx, dweight, dbias = FusedKernel.backward_train(
        dy, x, gamma, mean, invstd, needs, bias=bias, negative_slope=slope
    )
    return dx, dweight, dbias, None, None, None, None


class _BatchNormAct(NormBase):
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
        nonfinite: NonFinite = "skip",
        single_sample: SingleSample = "raise",
        backend: str = "auto",
    ) -> None:
        if activation == "relu" or (activation == "leaky_relu" and negative_slope <= 0):
            raise ValueError(
                "BatchNormAct needs an invertible activation to rebuild its input from its output: relu (or "
                "leaky_relu with negative_slope <= 0) maps every negative value to 0. Use "
                "activation='leaky_relu' with a small positive negative_slope, e.g. 0.01."
            )
        if activation not in ("identity", "leaky_relu", "elu"):
            raise ValueError(
                f"activation must be 'identity', 'leaky_relu' or 'elu', got {activation!r}"
            )
        if activation == "elu" and alpha <= 0:
            raise ValueError(f"elu needs alpha > 0, got {alpha}")
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            nonfinite=nonfinite,
            single_sample=single_sample,
            backend=backend,
        )
        self.activation, self.negative_slope, self.alpha = activation, negative_slope, alpha

    @property
    def _param(self) -> float:
        return self.negative_slope if self.activation == "leaky_relu" else self.alpha

    def extra_repr(self) -> str:
        detail = {
            "leaky_relu": f", negative_slope={self.negative_slope}",
            "elu": f", alpha={self.alpha}",
        }
        return (
            super().extra_repr()
            + f", activation={self.activation!r}"
            + detail.get(self.activation, "")
        )

    def _train_forward(
        self, x: Tensor, mask: Tensor | None, n: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        if mask is not None:
            raise ValueError("BatchNormAct does not support mask")
        y, mean, var = _BatchNormActTrain.apply(
            x, self.weight, self.bias, self.eps, self.activation, self._param, self.backend
        )
        return y, mean, var * (n / (n - 1))

    def _eval_forward(self, x: Tensor) -> Tensor:
        y = super()._eval_forward(x)
        if self.activation == "leaky_relu":
            return torch.nn.functional.leaky_relu(y, self.negative_slope)
        if self.activation == "elu":
            return torch.nn.functional.elu(y, self.alpha)
        return y


class BatchNormAct1d(_BatchNormAct):
    """BatchNorm1d followed by ``activation`` (``"leaky_relu"``, ``"elu"``, ``"identity"``), saving only the output."""

    _NDIM = (2, 3)
    _NDIM_TEXT = "2D or 3D"


class BatchNormAct2d(_BatchNormAct):
    """BatchNorm2d followed by ``activation`` (``"leaky_relu"``, ``"elu"``, ``"identity"``), saving only the output."""

    _NDIM = (4,)
    _NDIM_TEXT = "4D"
