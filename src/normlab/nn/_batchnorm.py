"""``BatchNorm1d/2d/3d``: drop-ins for ``torch.nn.BatchNorm*``, exact on finite input, robust beyond it."""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ..functional import (
    BACKENDS,
    NonFinite,
    all_finite_host,
    batch_norm_train,
    check_batch_size,
    resolve_kernel,
    update_running_stats_,
)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "NormBase", "SingleSample"]

SingleSample = Literal["raise", "running"]
_NONFINITE = ("skip", "raise", "propagate")
_SINGLE = ("raise", "running")


class NormBase(_BatchNorm):
    """Shared machinery of normlab's batch-norm layers (a ``torch.nn.modules.batchnorm._BatchNorm``).

    Subclasses differ only in *where the training statistics come from*: they
    override :meth:`_train_forward`, which returns the normalized output together
    with the batch mean and unbiased variance that the running buffers should
    move toward. Everything else — input checks, the eval path, ``momentum=None``,
    the non-finite policy, single-sample batches, empty batches, ``mask`` — lives
    here once.

    Extra keyword-only arguments (defaults keep torch's results on finite input):

    * ``nonfinite``: ``"skip"`` (default) — a training batch whose statistics are
      NaN/Inf in any channel leaves every running buffer and
      ``num_batches_tracked`` unchanged and warns once per module; ``"raise"`` —
      ``FloatingPointError`` naming the module; ``"propagate"`` — torch's
      behaviour (running statistics poisoned).
    * ``single_sample``: ``"raise"`` (default, torch's error) or ``"running"`` — a
      training batch with one value per channel is normalized with the running
      statistics and leaves them unchanged.
    * ``backend``: ``"auto"`` | ``"reference"`` | ``"native"`` | ``"fused"``, see
      :func:`normlab.functional.batch_norm`.
    """

    _NDIM: tuple[int, ...] = ()
    _NDIM_TEXT = ""

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
        nonfinite: NonFinite = "skip",
        single_sample: SingleSample = "raise",
        backend: str = "auto",
    ) -> None:
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        if single_sample not in _SINGLE:
            raise ValueError(f"single_sample must be one of {_SINGLE}, got {single_sample!r}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.nonfinite: NonFinite = nonfinite
        self.single_sample: SingleSample = single_sample
        self.backend = backend
        self._warned_nonfinite = False

    # --- torch-compatible surface -------------------------------------------------
    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._NDIM:
            raise ValueError(f"expected {self._NDIM_TEXT} input (got {input.dim()}D input)")

    def extra_repr(self) -> str:
        text = super().extra_repr()
        for name, default in (
            ("nonfinite", "skip"),
            ("single_sample", "raise"),
            ("backend", "auto"),
        ):
            value = getattr(self, name)
            if value != default:
                text += f", {name}={value!r}"
        return text

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # Checkpoints written before the counter existed, or by tools that drop it
        # (ONNX round trips, hand-made dicts), still load: the counter restarts at 0.
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # --- layout -----------------------------------------------------------------
    def _to_channels_first(self, input: Tensor) -> tuple[Tensor, bool]:
        """``(N, C, *)`` view of the input, and whether the channel axis was moved."""
        return input, False

    # --- the part variants override ---------------------------------------------
    def _train_forward(
        self, x: Tensor, mask: Tensor | None, n: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Normalize ``x`` ``(N, C, *)`` with batch statistics.

        Returns ``(y, mean, var_unbiased)``: the output and the statistics the
        running buffers move toward (``n`` valid values per channel, ``n >= 2``).
        """
        y, mean, var = batch_norm_train(
            x, self.weight, self.bias, self.eps, mask=mask, backend=self.backend
        )
        return y, mean, var * (n / (n - 1))

    def _eval_forward(self, x: Tensor) -> Tensor:
        assert self.running_mean is not None and self.running_var is not None
        return resolve_kernel(self.backend, x, None).forward_eval(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.eps
        )

    # --- forward ----------------------------------------------------------------
    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input``; ``mask`` (bool, input shape without the channel axis) marks valid positions."""
        self._check_input_dim(input)
        x, moved = self._to_channels_first(input)
        y = self._forward_channels_first(x, mask)
        return y.movedim(1, -1) if moved else y

    def _forward_channels_first(self, x: Tensor, mask: Tensor | None) -> Tensor:
        if not self.training and self.running_mean is not None:
            return self._eval_forward(x)
        tracking = self.training and self.track_running_stats
        try:
            n = check_batch_size(x, mask)
        except ValueError:
            if self.single_sample == "running" and self.running_mean is not None:
                return self._eval_forward(x)
            raise
        if n == 0:  # torch 2.13: empty output, counter incremented, running stats unchanged
            if tracking and self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
            return x.clone()
        if tracking and mask is None and self._aten_fast_path(x):
            return self._aten_train_forward(x)
        y, mean, var_unbiased = self._train_forward(x, mask, n)
        if tracking:
            self._update_running_stats(mean, var_unbiased)
        return y

    def _momentum_factor(self) -> float:
        assert self.num_batches_tracked is not None
        if self.momentum is None:  # cumulative moving average
            return 1.0 / float(self.num_batches_tracked + 1)
        return self.momentum

    def _aten_fast_path(self, x: Tensor) -> bool:
        """Plain batch norm on ATen's kernel: no variant statistics, no mask, CPU/CUDA eager."""
        return (
            type(self)._train_forward is NormBase._train_forward
            and x.device.type in ("cpu", "cuda")
            and resolve_kernel(self.backend, x, None).name == "native"
        )

    def _aten_train_forward(self, x: Tensor) -> Tensor:
        """One ATen pass normalizes and updates *copies* of the running buffers (torch-exact).

        The hot path of every plain BatchNorm step, kept lean: the copies are
        committed unless ``nonfinite`` rejects them (checked on the host for CPU
        buffers, on the device otherwise).
        """
        running_mean, running_var = self.running_mean, self.running_var
        assert running_mean is not None and running_var is not None
        assert self.num_batches_tracked is not None
        new_mean, new_var = running_mean.clone(), running_var.clone()
        y = torch.native_batch_norm(
            x, self.weight, self.bias, new_mean, new_var, True, self._momentum_factor(), self.eps
        )[0]
        if self.nonfinite == "propagate" or (
            running_mean.device.type == "cpu"
            and not torch.compiler.is_compiling()  # compiled: decide on the device, no graph break
            and all_finite_host(new_mean, new_var)
        ):
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
            self.num_batches_tracked.add_(1)
        else:  # rejected, or to be decided on the device
            self._commit_running_stats(new_mean, new_var)
        return y

    def _commit_running_stats(self, new_mean: Tensor, new_var: Tensor) -> None:
        """Copy already-updated statistics into the buffers, subject to ``nonfinite``."""
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self._apply_update(
            update_running_stats_(
                self.running_mean,
                self.running_var,
                new_mean,
                new_var,
                1.0,
                nonfinite=self.nonfinite,
                owner=self._owner(),
            ),
            new_mean,
            new_var,
        )

    def _owner(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var_unbiased: Tensor) -> None:
        assert self.running_mean is not None and self.running_var is not None
        self._apply_update(
            update_running_stats_(
                self.running_mean,
                self.running_var,
                mean,
                var_unbiased,
                self._momentum_factor(),
                nonfinite=self.nonfinite,
                owner=self._owner(),
            ),
            mean,
            var_unbiased,
        )

    def _apply_update(self, updated: bool | None, mean: Tensor, var_unbiased: Tensor) -> None:
        """Count the batch and warn (once) after :func:`update_running_stats_` decided."""
        assert self.num_batches_tracked is not None
        if updated is None:  # decided on the device, without a host sync
            self.num_batches_tracked.add_(_finite_flag(mean, var_unbiased))
        elif updated:
            self.num_batches_tracked.add_(1)
        elif not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"{type(self).__name__}({self.num_features}): non-finite batch statistics "
                "(NaN/Inf) in training; the running statistics and num_batches_tracked were "
                "left unchanged for this batch (nonfinite='skip'; this warning is shown once)",
                RuntimeWarning,
                stacklevel=4,
            )


def _finite_flag(mean: Tensor, var: Tensor) -> Tensor:
    return torch.isfinite(torch.cat((mean, var))).all().long()


class BatchNorm1d(NormBase):
    r"""Drop-in for :class:`torch.nn.BatchNorm1d` over ``(N, C)`` or ``(N, C, L)`` input.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Beyond torch: ``channel_axis=-1`` accepts ``(N, L, C)`` sequence layouts (the
    output has the input's layout), and ``forward(input, mask)`` normalizes padded
    sequences with statistics over the valid (``True``) positions only. See
    :class:`NormBase` for ``nonfinite``, ``single_sample`` and ``backend``.
    """

    _NDIM = (2, 3)
    _NDIM_TEXT = "2D or 3D"

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
        channel_axis: int = 1,
        nonfinite: NonFinite = "skip",
        single_sample: SingleSample = "raise",
        backend: str = "auto",
    ) -> None:
        if channel_axis not in (1, -1):
            raise ValueError(
                f"BatchNorm1d channel_axis must be 1 for (N, C, L) or -1 for (N, L, C), got {channel_axis}"
            )
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
        self.channel_axis = channel_axis

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text + (", channel_axis=-1" if self.channel_axis == -1 else "")

    def _to_channels_first(self, input: Tensor) -> tuple[Tensor, bool]:
        if self.channel_axis == -1 and input.dim() == 3:
            return input.movedim(-1, 1), True
        return input, False


class BatchNorm2d(NormBase):
    r"""Drop-in for :class:`torch.nn.BatchNorm2d` over ``(N, C, H, W)`` input (channels_last kept).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    See :class:`NormBase` for ``nonfinite``, ``single_sample`` and ``backend``.
    """

    _NDIM = (4,)
    _NDIM_TEXT = "4D"


class BatchNorm3d(NormBase):
    r"""Drop-in for :class:`torch.nn.BatchNorm3d` over ``(N, C, D, H, W)`` input.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    See :class:`NormBase` for ``nonfinite``, ``single_sample`` and ``backend``.
    """

    _NDIM = (5,)
    _NDIM_TEXT = "5D"
