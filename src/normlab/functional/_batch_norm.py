"""``batch_norm``: torch's functional batch norm, with a closed-form backward and robust running stats."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ..kernels import FusedKernel
from ._backend import BatchNormKernel, resolve_kernel
from ._reference import reference_train_output
from ._stats import batch_norm_stats

__all__ = [
    "NonFinite",
    "all_finite_host",
    "batch_norm",
    "batch_norm_train",
    "check_batch_size",
    "update_running_stats_",
]

NonFinite = Literal["skip", "raise", "propagate"]


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode batch norm: statistics from the batch, closed-form backward.

    Outputs ``(y, mean, var, invstd)``; only ``y`` is differentiable. Written in the
    ``setup_context`` style with ``generate_vmap_rule`` so that ``torch.func.vmap``
    and ``torch.func.grad`` work (they run the pure-op reference kernel).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mask: Tensor | None,
        eps: float,
        kernel: BatchNormKernel,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return kernel.forward_train(x, weight, bias, eps, mask)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        x, weight, bias, mask, eps, kernel = inputs
        _, mean, var, invstd = output
        ctx.save_for_backward(x, weight, bias, mask, mean, invstd)
        ctx.mark_non_differentiable(mean, var, invstd)
        ctx.eps = eps
        ctx.kernel = kernel

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, mask, mean, invstd = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if torch.is_grad_enabled() and any(needs):
            # create_graph=True: differentiate the reference forward so that the
            # gradient is itself differentiable (double backward, Hessian-vector products).
            grads = _differentiable_backward(dy, x, weight, bias, mask, ctx.eps, needs)
            return (*grads, None, None, None)
        dx, dw, db = ctx.kernel.backward_train(dy, x, weight, mean, invstd, needs, mask)
        return dx, dw, db, None, None, None


Correction = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class _BatchNormCorrected(torch.autograd.Function):
    """``y = γ·(r·x̂ + d) + β`` with ``(r, d) = correction(mean, var)`` treated as constants.

    Costs what plain batch norm costs: one statistics pass, one normalize pass (the
    kernel's eval path with weight ``γ·r`` and bias ``β + γ·d``), and the kernel's
    closed-form backward with weight ``γ·r``:
    ``dγ = r·Σ dy·x̂ + d·Σ dy``, ``dβ = Σ dy``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        kernel: BatchNormKernel,
        correction: Correction,
    ) -> tuple[Tensor, Tensor, Tensor]:
        stats = getattr(kernel, "stats", None)  # kernels registered before `stats` existed lack it
        if stats is None or x.device.type not in ("cpu", "cuda"):  # ATen's stats: CPU/CUDA only
            mean, var, _ = batch_norm_stats(x)  # (C,) in the accumulation dtype
        else:
            mean, var = stats(x)
        r, d = correction(mean, var)
        w_eff = r if weight is None else weight.to(r.dtype) * r
        b_eff = (
            d
            if weight is None
            else weight.to(d.dtype) * d + (bias.to(d.dtype) if bias is not None else 0.0)
        )
        param_dtype = weight.dtype if weight is not None else mean.dtype
        y = kernel.forward_eval(x, mean, var, w_eff.to(param_dtype), b_eff.to(param_dtype), eps)
        ctx.save_for_backward(x, w_eff.to(param_dtype), mean, torch.rsqrt(var + eps), r, d)
        ctx.has_weight, ctx.kernel = weight is not None, kernel
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:
        x, w_eff, mean, invstd, r, d = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, dw_eff, db = ctx.kernel.backward_train(dy, x, w_eff, mean, invstd, (need_x, True, True))
        dweight = dbias = None
        if ctx.has_weight:
            dweight = (
                (r * dw_eff.to(r.dtype) + d * db.to(d.dtype)).to(w_eff.dtype) if need_w else None
            )
            dbias = db.to(w_eff.dtype) if need_b else None
        return dx, dweight, dbias, None, None, None


def _differentiable_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    eps: float,
    needs: tuple[bool, ...],
    chunks: list[int] | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients by autograd through the reference forward (per batch chunk when ``chunks``
    is given), so that they can be differentiated again."""
    inputs = [t for t, need in zip((x, weight, bias), needs) if need and t is not None]
    with torch.enable_grad():
        if chunks is None:
            y = reference_train_output(x, weight, bias, eps, mask)
        else:
            y = torch.cat(
                [reference_train_output(p, weight, bias, eps, None) for p in x.split(chunks)]
            )
        grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
    return tuple(  # type: ignore[return-value]
        next(grads) if need and t is not None else None for t, need in zip((x, weight, bias), needs)
    )


class _ChunkedBatchNormTrain(torch.autograd.Function):
    """Training batch norm with separate statistics per batch chunk, on the fused kernels
    (views of ``x``, one C++ call; see :meth:`FusedKernel.forward_train`)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        chunks: list[int],
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, var, invstd = FusedKernel.forward_train(x, weight, bias, eps, chunks=chunks)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.chunks, ctx.eps = chunks, eps
        mean, var = mean.view(len(chunks), -1), var.view(len(chunks), -1)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, mean, invstd = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if torch.is_grad_enabled() and any(needs):  # create_graph: double backward
            grads = _differentiable_backward(dy, x, weight, bias, None, ctx.eps, needs, ctx.chunks)
            return (*grads, None, None)
        dx, dw, db = FusedKernel.backward_train(
            dy, x, weight, mean, invstd, needs, chunks=ctx.chunks
        )
        return dx, dw, db, None, None


def chunked_batch_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, chunks: list[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch norm of consecutive batch chunks of sizes ``chunks``, each with its own statistics
    (Ghost BN's virtual batches): ``(y, mean, var_biased)`` with ``(len(chunks), C)`` statistics.

    One C++ call runs the fused kernels on each chunk's view of ``x`` — no fold into channels,
    no copies; the backward likewise, summing γ/β gradients over chunks. Needs the compiled
    kernels and an input they serve (:func:`normlab.kernels.fused_serves`).
    """
    y, mean, var = _ChunkedBatchNormTrain.apply(x, weight, bias, eps, chunks)
    return y, mean, var


def check_batch_size(input: Tensor, mask: Tensor | None = None, channel_axis: int = 1) -> int:
    """Values per channel in a training batch; raises torch's error when it is exactly 1.

    With a mask, the count is the number of valid positions, and 0 raises too
    (there would be nothing to normalize with).
    """
    if mask is None:
        n = input.numel() // input.shape[channel_axis] if input.shape[channel_axis] else 0
        if n == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {input.size()}"
            )
        return n
    expected = input.shape[:channel_axis] + input.shape[channel_axis + 1 :]
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(expected):
        raise ValueError(
            "mask must have the input's shape without its channel axis, "
            f"expected {tuple(expected)} (bool), got {tuple(mask.shape)} ({mask.dtype})"
        )
    n = int(mask.sum())
    if n <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {n} valid (unmasked) "
            f"value(s) per channel for input size {input.size()}"
        )
    return n


def batch_norm_train(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    mask: Tensor | None = None,
    backend: str = "auto",
    correction: Correction | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize ``input`` ``(N, C, *)`` with its own batch statistics.

    Returns ``(y, mean, var)`` — ``var`` biased, both in the accumulation dtype and
    without gradient. The building block every training-mode variant reuses.
    ``correction(mean, var) -> (r, d)`` (per channel, no gradient) turns the output
    into ``weight·(r·x̂ + d) + bias`` — Batch Renormalization — at plain batch-norm cost.
    """
    kernel = resolve_kernel(backend, input, mask)
    if correction is not None:
        if mask is not None:
            raise ValueError("batch_norm_train: correction does not support mask")
        return _BatchNormCorrected.apply(input, weight, bias, eps, kernel, correction)
    if getattr(kernel, "differentiable", False):  # ATen's own closed-form autograd (native)
        y, mean, var, _ = kernel.forward_train(input, weight, bias, eps, mask)
        return y, mean.detach(), var
    y, mean, var, _ = _BatchNormTrain.apply(input, weight, bias, mask, eps, kernel)
    return y, mean, var


def _finite(mean: Tensor, var: Tensor) -> Tensor:
    """One 0-d bool on the device: every channel's mean and variance is finite."""
    return torch.isfinite(torch.cat((mean, var))).all()


_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)


def all_finite_host(mean: Tensor, var: Tensor) -> bool:
    """The same test for CPU tensors, answered on the host.

    A zero-copy NumPy view skips torch's per-op dispatch: ~3 µs instead of ~8 µs,
    which matters because it runs once per BatchNorm layer per training step.
    """
    if (
        mean.dtype in _NUMPY_DTYPES
        and var.dtype in _NUMPY_DTYPES
        and not (mean.requires_grad or var.requires_grad)
    ):
        return bool(np.isfinite(mean.numpy()).all() and np.isfinite(var.numpy()).all())
    return bool(_finite(mean, var))


def update_running_stats_(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var_unbiased: Tensor,
    factor: float,
    *,
    nonfinite: NonFinite = "propagate",
    owner: str = "batch_norm",
) -> bool | None:
    r"""``running = (1 - factor) * running + factor * batch`` for mean and (unbiased) variance.

    ``nonfinite`` decides what a batch with a NaN/Inf statistic in any channel does:
    ``"propagate"`` updates anyway (torch's behaviour), ``"skip"`` leaves every
    channel unchanged, ``"raise"`` raises ``FloatingPointError`` naming ``owner``.

    Returns whether the update happened; ``None`` when that is only known on the
    device (``"skip"`` on an accelerator or while compiling: the choice is made by
    ``torch.where``, without a host synchronisation).
    """
    new_mean = _blend(running_mean, mean, factor)
    new_var = _blend(running_var, var_unbiased, factor)
    if nonfinite not in ("skip", "raise", "propagate"):
        raise ValueError(f"nonfinite must be 'skip', 'raise' or 'propagate', got {nonfinite!r}")
    if nonfinite == "propagate":
        updated: bool | None = True
    elif nonfinite == "skip" and (
        running_mean.device.type != "cpu" or torch.compiler.is_compiling()
    ):
        # decide on the device: no host synchronisation
        ok = _finite(new_mean, new_var)
        new_mean = torch.where(ok, new_mean, running_mean)
        new_var = torch.where(ok, new_var, running_var)
        updated = None
    else:
        updated = all_finite_host(new_mean, new_var)
        if not updated and nonfinite == "raise":
            raise FloatingPointError(
                f"{owner}: non-finite batch statistics (NaN/Inf) in training; "
                "the running statistics were left unchanged"
            )
    if updated is not False:
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
    return updated


def _blend(running: Tensor, batch: Tensor, factor: float) -> Tensor:
    """``(1 - factor) * running + factor * batch`` in the buffer's dtype (``factor == 1``: a copy)."""
    batch = batch.to(running.dtype)
    return batch if factor == 1.0 else running.lerp(batch, factor)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    mask: Tensor | None = None,
    backend: str = "auto",
    nonfinite: NonFinite = "propagate",
) -> Tensor:
    r"""Batch normalization with :func:`torch.nn.functional.batch_norm`'s arguments and results.

    .. math::
        y = \gamma\,\frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    In training, :math:`\mu, \sigma^2` are the batch mean and biased variance per
    channel (axis 1) over ``n = N * prod(spatial)`` values, and the running buffers,
    when given, are updated in place as torch does:
    ``running = (1 - momentum) * running + momentum * batch`` with the unbiased
    variance ``var * n / (n - 1)``. In eval, the running statistics are used.

    Args:
        mask: bool, shaped like ``input`` without the channel axis: statistics use
            only ``True`` positions; masked positions output ``bias`` (finite).
        backend: ``"auto"`` (fastest correct path), ``"reference"`` (plain torch
            ops, the oracle), ``"native"`` (ATen), ``"fused"`` (when installed).
        nonfinite: what a batch with non-finite statistics does to the running
            buffers: ``"propagate"`` (torch), ``"skip"`` (warns, leaves them
            unchanged) or ``"raise"``.

    The training path is an autograd Function whose backward is the closed form
    ``dx = γ/σ · (dy − mean(dy) − x̂·mean(dy·x̂))``; double backward is supported.
    """
    if input.dim() < 2:
        raise ValueError(
            f"batch_norm expects an input of at least 2 dimensions (N, C, ...), got {input.dim()}D"
        )
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(
                "batch_norm in eval mode (training=False) needs running_mean and running_var"
            )
        if mask is not None:
            raise ValueError(
                "mask only applies in training mode (eval uses the running statistics)"
            )
        return resolve_kernel(backend, input, None).forward_eval(
            input, running_mean, running_var, weight, bias, eps
        )
    n = check_batch_size(input, mask)
    if n == 0:  # empty batch: torch returns an empty output and leaves running stats alone
        return input.clone()
    y, mean, var = batch_norm_train(input, weight, bias, eps, mask=mask, backend=backend)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            updated = update_running_stats_(
                running_mean, running_var, mean, var * (n / (n - 1)), momentum, nonfinite=nonfinite
            )
        if updated is False:
            warnings.warn(
                "batch_norm: non-finite batch statistics; running statistics were not updated",
                RuntimeWarning,
                stacklevel=2,
            )
    return y
