"""ATen's own batch-norm kernels behind normlab's kernel interface (``backend="native"``)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NativeKernel"]


class NativeKernel:
    """``aten::native_batch_norm`` / ``native_batch_norm_backward`` (no mask support).

    ``forward_train`` is itself differentiable (``differentiable = True``): ATen's
    autograd formula for ``native_batch_norm`` *is* the closed-form backward, in
    C++, so callers use it directly instead of wrapping it in a Python
    ``autograd.Function`` (which costs tens of microseconds a call).
    """

    name = "native"
    differentiable = True

    @staticmethod
    def forward_train(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns ``(y, mean, var, invstd)`` with the biased ``var``.

        ATen returns the mean and ``invstd`` only; ``1/invstd^2 - eps`` would lose
        the variance when it is small against ``eps``. So ATen is handed scratch
        running buffers with ``momentum=1``: they receive exactly the batch mean
        and the unbiased variance ATen computes, in its accumulation precision.
        """
        if mask is not None:
            raise ValueError("the 'native' backend does not support mask; use backend='reference'")
        channels = x.shape[1]
        n = x.numel() // channels
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        stat_dtype = weight.dtype if weight is not None else acc
        scratch_mean = torch.zeros(channels, dtype=stat_dtype, device=x.device)
        scratch_var = torch.zeros(channels, dtype=stat_dtype, device=x.device)
        y, mean, invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, scratch_mean, scratch_var, True, 1.0, eps
        )
        if scratch_var.dtype != acc:
            scratch_var = scratch_var.to(acc)
        # out of place: autograd saved the scratch buffers for native_batch_norm's backward
        var = scratch_var * ((n - 1) / n) if n > 1 else torch.zeros_like(scratch_var)
        if mean.dtype != acc:
            mean, invstd = mean.to(acc), invstd.to(acc)
        return y, mean, var, invstd

    @staticmethod
    def backward_train(
        dy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        needs: tuple[bool, bool, bool],
        mask: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``aten::native_batch_norm_backward`` — the same closed form, in C++."""
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            dy.contiguous(memory_format=_memory_format(x)),
            x,
            weight,
            None,
            None,
            mean,
            invstd,
            True,
            0.0,
            [needs[0], needs[1] and weight is not None, needs[2]],
        )
        return dx, dw, db

    @staticmethod
    def stats(x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, biased var)`` from ATen's ``batch_norm_update_stats`` (the statistics
        ATen's own training forward uses). ATen returns bf16/fp16 statistics for bf16/fp16
        input, so such input is reduced in float32, the accumulation dtype of every backend."""
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        return mean, var

    @staticmethod
    def forward_eval(
        x: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> Tensor:
        """Inference through ``torch.batch_norm`` (differentiable, exportable)."""
        return torch.nn.functional.batch_norm(
            x, running_mean, running_var, weight, bias, False, 0.0, eps
        )


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
