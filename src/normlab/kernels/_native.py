"""ATen's own batch-norm kernels behind normlab's kernel protocol (``backend="native"``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._build import host_function

__all__ = ["NativeKernel"]

_LOW = (torch.float16, torch.bfloat16)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW else dtype


class NativeKernel:
    """``aten::native_batch_norm`` / ``native_batch_norm_backward``.

    ``forward_train`` is itself differentiable (``differentiable = True``): ATen's autograd
    formula for ``native_batch_norm`` *is* the closed-form backward, in C++, so plain batch
    norm uses it directly instead of a Python ``autograd.Function`` (tens of microseconds a
    call). It fuses no activation and takes no chunks; :mod:`normlab.functional` composes them.
    Its static methods implement :class:`~normlab.functional.BatchNormKernel`.

    Examples
    --------
    >>> import torch
    >>> from normlab.kernels import NativeKernel
    >>> x = torch.randn(8, 3, 5)
    >>> y, mean, var, invstd = NativeKernel.forward_train(x, None, None, 1e-5)
    >>> y.shape, torch.allclose(var, x.var((0, 2), unbiased=False))
    (torch.Size([8, 3, 5]), True)
    """

    name = "native"
    activations: frozenset[str] = frozenset()
    chunked = False
    differentiable = True

    @staticmethod
    def serves(x: Tensor) -> bool:
        """Every input ATen takes."""
        return True

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
        """Returns ``(y, mean, var, invstd)`` with the biased ``var``.

        ATen returns the mean and ``invstd`` only; ``1/invstd^2 - eps`` would lose the
        variance when it is small against ``eps``. So ATen is handed scratch running buffers
        with ``momentum=1``: they receive exactly the batch mean and the unbiased variance
        ATen computes, in its accumulation precision.
        """
        assert act is None and chunks is None and mask is None, "composed by normlab.functional"
        channels = x.shape[1]
        n = x.numel() // channels
        acc = _acc(x.dtype)
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
    def checks_channels() -> bool:
        """Whether :meth:`train_and_update` on CPU checks every per-channel tensor against the
        input's channels itself (the compiled call does; ATen's own ``native_batch_norm`` does
        not, and would read out of bounds)."""
        return host_function("aten_train") is not None

    @staticmethod
    def train_and_update(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        num_batches_tracked: Tensor | None,
        momentum: float | None,
        eps: float,
        *,
        skip: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        """One ATen call normalizes ``x`` and moves the given running buffers in place (torch's
        update, ``momentum=None``: the cumulative average), counting the batch in
        ``num_batches_tracked``: ``(y, mean, invstd, restored)``. The hot path of plain batch norm.

        ``skip``: channels whose batch statistics are not finite get their previous running
        statistics back (``restored`` of them; the batch counts when any channel moved). On CPU
        with the compiled kernels all of it is one C++ call (``aten_train``: no extra tensor
        op); elsewhere the buffers are backed up and restored here.
        """
        aten_train = (  # dynamo cannot trace the compiled call: ATen's own op in graphs
            None if torch.compiler.is_compiling() else host_function("aten_train")
        )
        if aten_train is not None and x.device.type == "cpu" and running_mean.device.type == "cpu":
            result: tuple[Tensor, Tensor, Tensor, int] = aten_train(
                x, weight, bias, running_mean, running_var, num_batches_tracked,
                -1.0 if momentum is None else momentum, eps, skip,
            )  # fmt: skip
            return result
        if momentum is None:
            assert num_batches_tracked is not None, "momentum=None needs num_batches_tracked"
            momentum = 1.0 / float(num_batches_tracked + 1)
        if skip:
            old_mean, old_var = running_mean.clone(), running_var.clone()
        y, mean, invstd = torch.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        restored = 0
        if skip:
            ok = torch.isfinite(mean) & torch.isfinite(invstd) & (invstd > 0)
            restored = int((~ok).sum())
            if restored:  # .data: a raw write, as in C++ (the training backward never reads it)
                running_mean.data.copy_(torch.where(ok, running_mean, old_mean))
                running_var.data.copy_(torch.where(ok, running_var, old_var))
        if num_batches_tracked is not None and restored < x.shape[1]:
            num_batches_tracked.add_(1)
        return y, mean, invstd, restored

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
        """``aten::native_batch_norm_backward`` — the same closed form, in C++."""
        assert act is None and chunks is None and mask is None, "composed by normlab.functional"
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
        if weight is None and needs[2] and db is not None:
            db = db.to(mean.dtype)
        return (
            dx if needs[0] else None,
            dw if needs[1] and weight is not None else None,
            db if needs[2] else None,
        )

    @staticmethod
    def stats(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(mean, biased var)`` from ATen's ``batch_norm_update_stats`` (the statistics ATen's
        own training forward uses), reduced in float32 for fp16/bf16 input."""
        assert mask is None, "composed by normlab.functional"
        if x.dtype in _LOW:
            x = x.float()
        if x.device.type not in ("cpu", "cuda"):  # ATen's update_stats: CPU/CUDA only
            var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
            return mean, var
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        return mean, var

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
        """Normalize with given statistics through ``torch.batch_norm`` (differentiable, exportable)."""
        assert act is None, "composed by normlab.functional"
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, True)

    @staticmethod
    def invert(
        y: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        act: Any,
    ) -> Tensor | None:
        """ATen has no inverse: the reference's serves."""
        return None


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
