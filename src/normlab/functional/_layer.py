r"""``batch_norm_layer``: a layer's whole forward as one function of its state.

Every normlab layer's ``forward`` is :func:`batch_norm_layer` called with the layer's tensors
(input, mask, running buffers, counter, γ, β) and a :class:`LayerSpec` of plain constants.
So the eager forward, a ``torch.fx`` graph (where the call is one ``call_function`` node)
and :func:`~normlab.functional.batch_norm` (torch's functional signature) run the same code,
which checks its arguments before any kernel runs.

Running statistics follow torch (:mod:`._running`); ``momentum=None`` is the cumulative
average ``m = 1/(num_batches_tracked + 1)``, and ``num_batches_tracked`` counts a batch when
any channel's statistics moved.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..kernels import NativeKernel
from ._activation import Activation
from ._backend import resolve_kernel
from ._checks import check_channels, check_input, check_mask
from ._reference import channel_view
from ._running import (
    _commit,
    _on_host,
    _warn_skipped,
    update_running_on_host_,
    update_running_stats_,
)
from ._train import Plan, Reducer, train
from ._variants import Limit, _limit, ghost_chunks, renorm_correction

__all__ = ["SINGLE_SAMPLE", "LayerSpec", "batch_norm_layer", "check_batch_size"]

SINGLE_SAMPLE: tuple[str, ...] = ("raise", "running")
# kernels whose eval forward checks every per-channel tensor itself, with torch's words
# (torch.batch_norm; the fused C++ entry point): the Python check would be paid twice
_CHECKED_EVAL = ("native", "fused")


class LayerSpec(NamedTuple):
    """A layer's settings, as constants (what ``torch.fx`` records in its graph).

    The layers build one per forward (:meth:`normlab.nn.NormBase.forward`); users of
    :func:`batch_norm_layer` may build their own.

    Parameters
    ----------
    name : str
        For messages, e.g. ``"BatchNorm2d(64)"``.
    num_features : int
        ``C``.
    ndims : tuple of int
        Accepted input ranks; ``()``: any ``>= 2``.
    training : bool
        Batch statistics (True) or running ones.
    momentum : float or None
        Running-statistics factor; ``None``: cumulative average.
    eps : float
        Added to the variance.
    nonfinite : {"skip", "raise", "propagate"}
        See :class:`normlab.nn.NormBase`.
    single_sample : {"raise", "running"}
        See :class:`normlab.nn.NormBase`.
    backend : str
        See :func:`batch_norm`.
    channel_axis : {1, -1}
        Where the channels are.
    act : Activation, optional
        An activation after the affine map (BN+act).
    save_output : bool
        Keep only the output for backward (BN+act with an invertible activation).
    virtual_batch_size : int, optional
        Ghost BN's chunk size.
    renorm : (limit, limit), optional
        Batch Renorm's ``(r_max, d_max)``: numbers, :class:`Ramp` or callables of the step.
    reducer : Reducer, optional
        SyncBN's cross-process reduction (eager only).
    unbiased_running_var : bool
        torch's rule (``var·n/(n−1)`` into ``running_var``); ``False``: Keras' (``var``).

    Examples
    --------
    >>> import torch
    >>> from normlab.functional import LayerSpec, batch_norm_layer
    >>> spec = LayerSpec("demo", 3, virtual_batch_size=4)
    >>> y = batch_norm_layer(torch.randn(8, 3), None, None, None, None, None, None, spec)
    >>> y[:4].mean(0).abs().max().item() < 1e-5                # each chunk of 4 normalized
    True
    """

    name: str  # for messages, e.g. "BatchNorm2d(64)"
    num_features: int
    ndims: tuple[int, ...] = ()  # accepted input ranks; () = any >= 2
    training: bool = True
    momentum: float | None = 0.1
    eps: float = 1e-5
    nonfinite: str = "skip"
    single_sample: str = "raise"
    backend: str = "auto"
    channel_axis: int = 1
    act: Activation | None = None
    save_output: bool = False  # keep only the output for backward (BN+act)
    virtual_batch_size: int | None = None  # Ghost BN
    renorm: tuple[Limit, Limit] | None = None  # Batch Renorm's (r_max, d_max)
    reducer: Reducer | None = None  # SyncBN's cross-process reduction (eager only)
    unbiased_running_var: bool = True  # torch: var·n/(n−1) into running_var; Keras: var


def check_batch_size(input: Tensor, mask: Tensor | None = None, channel_axis: int = 1) -> int:
    """Values per channel in a training batch; raises torch's error when it is exactly 1.

    With a mask (the input's shape without the channel axis, bool) the count is the number
    of valid positions, and 0 raises too (there would be nothing to normalize with).

    Parameters
    ----------
    input : Tensor, shape (N, C, *)
        The batch.
    mask : Tensor of bool, optional
        Valid positions, the input's shape without the channel axis.
    channel_axis : int
        Where the channels are.

    Returns
    -------
    int
        ``n``, the values per channel.

    Raises
    ------
    ValueError
        One value per channel (torch's message), no valid value, or a malformed mask.

    Examples
    --------
    >>> import torch
    >>> from normlab.functional import check_batch_size
    >>> check_batch_size(torch.zeros(4, 3, 5))
    20
    >>> check_batch_size(torch.zeros(1, 3))
    Traceback (most recent call last):
    ValueError: Expected more than 1 value per channel when training, got input size torch.Size([1, 3])
    """
    channels = input.shape[channel_axis]
    if mask is None:
        n = input.numel() // channels if channels else 0
        if n == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {input.size()}"
            )
        return n
    check_mask(input, mask, channel_axis)
    n = int(mask.sum())
    if n <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {n} valid (unmasked) "
            f"value(s) per channel for input size {input.size()}"
        )
    return n


def batch_norm_layer(
    input: Tensor,
    mask: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    spec: LayerSpec,
) -> Tensor:
    """A batch-norm layer's forward: validate, normalize, move the running statistics.

    Training uses the batch statistics (and moves the running buffers when they are given);
    eval — or training with ``single_sample="running"`` on a one-value batch — uses the
    running ones. Without running buffers the batch statistics serve in eval too (torch).

    Parameters
    ----------
    input : Tensor, shape (N, C, *)
        ``(N, *, C)`` with ``spec.channel_axis == -1``.
    mask : Tensor of bool, optional
        Valid positions, the input's shape without the channel axis.
    running_mean : Tensor of shape (C,) or None
        Updated in place in training.
    running_var : Tensor of shape (C,) or None
        Updated in place in training.
    num_batches_tracked : Tensor or None
        The step counter (0-d long), incremented in training.
    weight : Tensor of shape (C,) or None
        γ.
    bias : Tensor of shape (C,) or None
        β.
    spec : LayerSpec
        The layer's settings.

    Returns
    -------
    Tensor
        The input's shape, dtype and layout.

    Examples
    --------
    >>> import torch
    >>> from normlab.functional import LayerSpec, batch_norm_layer
    >>> rm, rv, steps = torch.zeros(3), torch.ones(3), torch.tensor(0)
    >>> x = torch.randn(16, 3) * 2 + 5
    >>> y = batch_norm_layer(x, None, rm, rv, steps, None, None, LayerSpec("demo", 3, momentum=None))
    >>> int(steps), torch.allclose(rm, x.mean(0))              # a cumulative average of one batch
    (1, True)
    """
    check_input(input, what=spec.name, ndims=spec.ndims)
    if spec.channel_axis != 1 and input.dim() > 2:
        x = input.movedim(spec.channel_axis, 1)  # (N, C, *)
        y = _forward(x, mask, running_mean, running_var, num_batches_tracked, weight, bias, spec)
        return y.movedim(1, spec.channel_axis)
    if not spec.training and running_mean is not None and running_var is not None:
        return _eval(input, mask, running_mean, running_var, weight, bias, spec)
    return _forward(input, mask, running_mean, running_var, num_batches_tracked, weight, bias, spec)


def _forward(
    x: Tensor,
    mask: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    spec: LayerSpec,
) -> Tensor:
    has_running = running_mean is not None and running_var is not None
    tracking = spec.training and has_running
    aten = (  # plain batch norm moving running statistics: ATen's hot path (checks in C++)
        tracking
        and mask is None
        and spec.act is None
        and not spec.virtual_batch_size
        and spec.renorm is None
        and spec.reducer is None
        and not spec.save_output
        and spec.unbiased_running_var
    )
    if aten and x.numel() > x.shape[1] and not torch.compiler.is_compiling():
        assert running_mean is not None and running_var is not None
        kernel = resolve_kernel(spec.backend, x)
        if kernel.name == "native" and running_mean.device.type == "cpu":
            return _aten_train(
                x, running_mean, running_var, num_batches_tracked, weight, bias, spec, host=True
            )
    if not spec.training and has_running:
        return _eval(x, mask, running_mean, running_var, weight, bias, spec)  # type: ignore[arg-type]
    check_channels(x, running_mean, running_var, weight, bias)
    if spec.reducer is None:  # SyncBN counts across processes (a rank may hold no sample)
        try:
            n = check_batch_size(x, mask)
        except ValueError:
            if spec.single_sample == "running" and has_running and mask is None:
                return _eval(x, None, running_mean, running_var, weight, bias, spec)  # type: ignore[arg-type]
            raise
        if n == 0:  # torch 2.13: empty output, counter incremented, running stats unchanged
            if tracking and num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            return x.clone()
    elif mask is not None:
        check_mask(x, mask)
    if mask is not None and spec.virtual_batch_size:
        raise ValueError(f"GhostBatchNorm does not support mask ({spec.name})")
    chunks = ghost_chunks(x.shape[0], spec.virtual_batch_size) if spec.virtual_batch_size else None
    correction = None
    if spec.renorm is not None and has_running:
        assert running_mean is not None and running_var is not None
        # the step is read only for a schedule (inside torch.func.vmap a counter has no value)
        scheduled = callable(spec.renorm[0]) or callable(spec.renorm[1])
        step = int(num_batches_tracked) if scheduled and num_batches_tracked is not None else 0
        correction = renorm_correction(
            running_mean.clone(),  # the running statistics before this step's update
            running_var.clone(),
            spec.eps,
            _limit(spec.renorm[0], step),
            _limit(spec.renorm[1], step),
        )
    plain = spec.act is None and chunks is None and correction is None and not spec.save_output
    kernel = resolve_kernel(
        spec.backend, x, mask=mask, variant=not plain or spec.reducer is not None
    )
    if aten and kernel.name == "native":
        assert running_mean is not None and running_var is not None
        host = _on_host(running_mean)
        return _aten_train(
            x, running_mean, running_var, num_batches_tracked, weight, bias, spec, host=host
        )
    plan = Plan(kernel, spec.eps, spec.act, chunks, correction, spec.reducer, spec.save_output)
    result = train(x, weight, bias, plan, mask)
    if tracking:
        assert running_mean is not None and running_var is not None
        mean, var = result.mean, result.var
        if chunks is None and result.total is None:  # one C++ call where it can
            bessel = n / (n - 1) if spec.unbiased_running_var else 1.0
            if update_running_on_host_(
                running_mean,
                running_var,
                num_batches_tracked,
                mean,
                var,
                spec.momentum,
                bessel,
                nonfinite=spec.nonfinite,
                owner=spec.name,
            ):
                return result.y
        with torch.no_grad():
            if chunks is not None:  # Ghost: the mean over chunks of their statistics
                per_sample = x.numel() // (x.shape[0] * x.shape[1])
                counts = (
                    torch.tensor(chunks, dtype=var.dtype, device=var.device)[:, None] * per_sample
                )
                unbias = counts / (counts - 1) if spec.unbiased_running_var else 1.0
                mean, var = mean.mean(0), (var * unbias).mean(0)
            elif not spec.unbiased_running_var:
                pass
            elif result.total is not None:  # SyncBN: the global count
                var = var * result.total / (result.total - 1).clamp(min=1)
            else:
                var = var * (n / (n - 1))
            updated = update_running_stats_(
                running_mean,
                running_var,
                mean,
                var,
                _factor(spec.momentum, num_batches_tracked),
                nonfinite=spec.nonfinite,
                owner=spec.name,
            )
        _count_batch(num_batches_tracked, updated)
    return result.y


def _factor(momentum: float | None, num_batches_tracked: Tensor | None) -> float:
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError("momentum=None (a cumulative average) needs num_batches_tracked")
    return 1.0 / float(num_batches_tracked + 1)


def _count_batch(num_batches_tracked: Tensor | None, updated: bool | Tensor) -> None:
    if num_batches_tracked is None:
        return
    if isinstance(updated, Tensor):  # decided on the device, without a host sync
        num_batches_tracked.add_(updated.long())
    elif updated:
        num_batches_tracked.add_(1)


def _aten_train(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    spec: LayerSpec,
    *,
    host: bool,
) -> Tensor:
    """Plain batch norm on ATen: one call normalizes, moves the running statistics and counts
    the batch (:meth:`NativeKernel.train_and_update`). ``"propagate"`` is torch's own update,
    ``"skip"`` on the host (CPU, eager) restores the channels whose batch statistics are not
    finite inside that call. Otherwise ATen updates copies, committed per channel (a buffer
    must not change in place after autograd saved it). ATen does not check the channels of
    the tensors it is given: the compiled call does, in C++; otherwise they are checked here."""
    if not (host and NativeKernel.checks_channels()):
        check_channels(x, running_mean, running_var, weight, bias)
    policy = spec.nonfinite
    if policy == "propagate" or (policy == "skip" and host):
        y, mean, invstd, restored = NativeKernel.train_and_update(
            x, weight, bias, running_mean, running_var, num_batches_tracked, spec.momentum,
            spec.eps, skip=policy == "skip",
        )  # fmt: skip
        if restored:
            _warn_skipped(spec.name, torch.isfinite(mean) & torch.isfinite(invstd) & (invstd > 0))
        return y
    new_mean, new_var = running_mean.clone(), running_var.clone()
    factor = _factor(spec.momentum, num_batches_tracked)
    y, mean, invstd, _ = NativeKernel.train_and_update(
        x, weight, bias, new_mean, new_var, None, factor, spec.eps
    )
    ok = torch.isfinite(mean) & torch.isfinite(invstd) & (invstd > 0)  # var = +inf: invstd 0
    with torch.no_grad():
        updated = _commit(running_mean, running_var, new_mean, new_var, ok, policy, spec.name)
    _count_batch(num_batches_tracked, updated)
    return y


def _eval(
    x: Tensor,
    mask: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    spec: LayerSpec,
) -> Tensor:
    """Normalize with the running statistics; masked positions output ``f(bias)`` as in training."""
    if mask is not None:
        check_mask(x, mask)
    records = torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )
    kernel = resolve_kernel(spec.backend, x, variant=spec.act is not None, differentiable=records)
    if kernel.name not in _CHECKED_EVAL:
        check_channels(x, running_mean, running_var, weight, bias)
    act = spec.act
    fused = act if act is not None and act.name in kernel.activations else None
    y = kernel.forward_eval(x, running_mean, running_var, weight, bias, spec.eps, fused)
    if act is not None and fused is None:
        y = act.forward(y)
    if mask is not None:
        fill = bias if bias is not None else x.new_zeros(x.shape[1])
        fill = fill.to(y.dtype) if act is None else act.forward(fill.to(y.dtype))
        y = torch.where(mask.unsqueeze(1), y, channel_view(fill, x.dim()))
    return y
