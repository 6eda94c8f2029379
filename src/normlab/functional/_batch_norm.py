r"""``batch_norm`` and ``batch_norm_layer``: a layer's whole forward as one function of its state.

Every normlab layer's ``forward`` is :func:`batch_norm_layer` called with the layer's tensors
(input, mask, running buffers, counter, γ, β) and a :class:`LayerSpec` of plain constants.
So the eager forward, a ``torch.fx`` graph (where the call is one ``call_function`` node)
and :func:`batch_norm` (torch's functional signature) run the same code, which checks its
arguments before any kernel runs.

Running statistics follow torch: ``running = (1 − m)·running + m·batch`` with the unbiased
variance ``var·n/(n−1)``; ``momentum=None`` is the cumulative average
``m = 1/(num_batches_tracked + 1)``. A channel whose batch statistics are not finite is
handled by ``nonfinite``: ``"skip"`` leaves that channel's running statistics as they were
(the other channels update, and ``num_batches_tracked`` counts the batch when any did),
``"raise"`` raises ``FloatingPointError`` naming the channels, ``"propagate"`` is torch's
behaviour.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ._activation import Activation
from ._backend import resolve_kernel
from ._checks import check_channels, check_choice, check_eps, check_input, check_momentum
from ._reference import channel_view
from ._train import Correction, Plan, Reducer, train

__all__ = [
    "NONFINITE",
    "SINGLE_SAMPLE",
    "LayerSpec",
    "NonFinite",
    "Ramp",
    "batch_norm",
    "batch_norm_layer",
    "batch_norm_train",
    "check_batch_size",
    "ghost_chunks",
    "nonfinite_channels",
    "renorm_correction",
    "update_running_stats_",
]

NonFinite = Literal["skip", "raise", "propagate"]
NONFINITE: tuple[str, ...] = ("skip", "raise", "propagate")
SINGLE_SAMPLE: tuple[str, ...] = ("raise", "running")


class Ramp(NamedTuple):
    """A limit that moves linearly from ``start`` to ``end`` between two step counts
    (``num_batches_tracked``), constant outside — Ioffe 2017's ``r_max``/``d_max`` schedule.
    A plain tuple of numbers: it pickles, prints and traces.

    Parameters
    ----------
    start : float
        The value up to ``start_step``.
    end : float
        The value from ``end_step`` on.
    start_step : int
        Where the ramp starts.
    end_step : int
        Where it ends.

    Examples
    --------
    >>> from normlab.functional import Ramp
    >>> ramp = Ramp(1.0, 3.0, 100, 200)
    >>> ramp(0), ramp(150), ramp(10_000)
    (1.0, 2.0, 3.0)
    """

    start: float
    end: float
    start_step: int
    end_step: int

    def __call__(self, step: int) -> float:
        """The limit at ``step`` (a ``num_batches_tracked`` count), as a float."""
        if step <= self.start_step:
            return float(self.start)
        t = min(1.0, (step - self.start_step) / max(1, self.end_step - self.start_step))
        return float(self.start + t * (self.end - self.start))


Limit = float | Ramp | Callable[[int], float]


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


# ---------- statistics checks and the running update ----------
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
    expected = input.shape[:channel_axis] + input.shape[channel_axis + 1 :]
    if (
        not isinstance(mask, Tensor)
        or mask.dtype != torch.bool
        or tuple(mask.shape) != tuple(expected)
    ):
        got = (tuple(mask.shape), mask.dtype) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            "mask must be a bool tensor with the input's shape without its channel axis, "
            f"expected {tuple(expected)} (bool), got {got}"
        )
    if mask.device != input.device:
        raise RuntimeError(f"mask is on {mask.device} but the input is on {input.device}")
    n = int(mask.sum())
    if n <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {n} valid (unmasked) "
            f"value(s) per channel for input size {input.size()}"
        )
    return n


def _bad_channels(ok: Tensor) -> str:
    bad = (~ok).nonzero().flatten().tolist()
    shown = ", ".join(str(c) for c in bad[:8])
    return shown + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")


def nonfinite_channels(*tensors: Tensor) -> str | None:
    """The channels where any of the per-channel ``tensors`` is NaN/Inf, for messages.

    Parameters
    ----------
    *tensors : Tensor
        Per-channel tensors of one shape ``(C,)``.

    Returns
    -------
    str or None
        ``"3, 7"`` (the first 8, then ``"and k more"``), or ``None`` when all are finite.

    Examples
    --------
    >>> import torch
    >>> from normlab.functional import nonfinite_channels
    >>> nonfinite_channels(torch.tensor([0.0, float("nan"), 1.0]), torch.tensor([1.0, 1.0, float("inf")]))
    '1, 2'
    """
    ok = torch.ones_like(tensors[0], dtype=torch.bool)
    for t in tensors:
        ok &= torch.isfinite(t)
    return None if bool(ok.all()) else _bad_channels(ok)


def _host_finite(t: Tensor) -> bool:
    """All finite, answered on the host (a NumPy view skips torch's per-op dispatch: ~3 µs
    instead of ~8 µs, once per layer per training step)."""
    if t.dtype in (torch.float32, torch.float64) and not t.requires_grad:
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())


def _host_positive(t: Tensor) -> bool:
    """All finite and > 0, answered on the host."""
    if t.dtype in (torch.float32, torch.float64) and not t.requires_grad:
        a = t.numpy()
        return bool(np.isfinite(a).all() and (a > 0).all())
    return bool((torch.isfinite(t) & (t > 0)).all())


def update_running_stats_(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var_unbiased: Tensor,
    factor: float,
    *,
    nonfinite: str = "propagate",
    owner: str = "batch_norm",
) -> bool | Tensor:
    r"""``running = (1 - factor) * running + factor * batch`` per channel, in place.

    ``nonfinite`` decides for channels whose batch ``mean`` or ``var_unbiased`` is NaN/Inf:
    ``"propagate"`` updates anyway (torch), ``"skip"`` leaves those channels unchanged and
    warns naming them, ``"raise"`` raises ``FloatingPointError`` naming them and changes
    nothing.

    Parameters
    ----------
    running_mean : Tensor, shape (C,)
        Updated in place.
    running_var : Tensor, shape (C,)
        Updated in place.
    mean : Tensor, shape (C,)
        The batch mean.
    var_unbiased : Tensor, shape (C,)
        The batch's unbiased variance ``var·n/(n−1)``.
    factor : float
        The momentum (or ``1/k`` for a cumulative average).
    nonfinite : {"propagate", "skip", "raise"}
        See above.
    owner : str
        The layer's name, for messages.

    Returns
    -------
    bool or Tensor
        Whether any channel was updated: a ``bool``, or a 0-d bool tensor where that is only
        known on the device (an accelerator or ``torch.compile``: no host synchronisation).

    Raises
    ------
    FloatingPointError
        ``nonfinite="raise"`` and some channel's batch statistics are NaN/Inf.

    Examples
    --------
    >>> import torch
    >>> from normlab.functional import update_running_stats_
    >>> rm, rv = torch.zeros(2), torch.ones(2)
    >>> with __import__("warnings").catch_warnings(record=True):
    ...     _ = update_running_stats_(rm, rv, torch.tensor([1.0, float("nan")]),
    ...                               torch.tensor([3.0, 1.0]), 0.5, nonfinite="skip")
    >>> rm, rv                                       # channel 1 left as it was
    (tensor([0.5000, 0.0000]), tensor([2., 1.]))
    """
    check_choice(nonfinite, "nonfinite", NONFINITE)
    mean, var_unbiased = mean.to(running_mean.dtype), var_unbiased.to(running_var.dtype)
    if nonfinite == "propagate" or (
        _on_host(running_mean) and _host_finite(mean) and _host_finite(var_unbiased)
    ):
        _lerp_(running_mean, mean, factor)
        _lerp_(running_var, var_unbiased, factor)
        return True
    ok = torch.isfinite(mean) & torch.isfinite(var_unbiased)
    new_mean, new_var = running_mean.lerp(mean, factor), running_var.lerp(var_unbiased, factor)
    return _commit(running_mean, running_var, new_mean, new_var, ok, nonfinite, owner)


def _on_host(t: Tensor) -> bool:
    """Decisions about ``t`` may be taken on the host (CPU, eager)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _commit(
    running_mean: Tensor,
    running_var: Tensor,
    new_mean: Tensor,
    new_var: Tensor,
    ok: Tensor,
    nonfinite: str,
    owner: str,
) -> bool | Tensor:
    """Copy the new statistics into the buffers for the channels where ``ok`` (per ``nonfinite``)."""
    if not _on_host(running_mean) and nonfinite == "skip":  # decide on the device
        running_mean.copy_(torch.where(ok, new_mean, running_mean))
        running_var.copy_(torch.where(ok, new_var, running_var))
        return ok.any()
    if bool(ok.all()):
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
        return True
    channels = _bad_channels(ok)
    if nonfinite == "raise":
        raise FloatingPointError(
            f"{owner}: non-finite batch statistics (NaN/Inf) in channel(s) {channels} in "
            "training; the running statistics were left unchanged (nonfinite='raise')"
        )
    running_mean.copy_(torch.where(ok, new_mean, running_mean))
    running_var.copy_(torch.where(ok, new_var, running_var))
    warnings.warn(
        f"{owner}: non-finite batch statistics (NaN/Inf) in channel(s) {channels} in training; "
        "those channels' running statistics were left unchanged for this batch (nonfinite='skip')",
        RuntimeWarning,
        stacklevel=5,
    )
    return bool(ok.any())


def _lerp_(running: Tensor, batch: Tensor, factor: float) -> None:
    if factor == 1.0:
        running.copy_(batch)
    else:
        running.lerp_(batch, factor)


# ---------- Batch Renorm's correction ----------
def renorm_correction(
    running_mean: Tensor, running_var: Tensor, eps: float, r_max: float, d_max: float
) -> Correction:
    r"""Ioffe 2017's ``(mean_B, var_B) -> (r, d)`` against the given running statistics:

    .. math::
        r = \operatorname{clip}_{[1/r_{max},\, r_{max}]}\Big(\frac{\sigma_B}{\sigma}\Big),\quad
        d = \operatorname{clip}_{[-d_{max},\, d_{max}]}\Big(\frac{\mu_B - \mu}{\sigma}\Big)

    with :math:`\sigma_B = \sqrt{\sigma_B^2 + \epsilon}`, :math:`\sigma = \sqrt{\text{running\_var} + \epsilon}`;
    ``r`` and ``d`` carry no gradient (Alg. 1).

    Parameters
    ----------
    running_mean : Tensor, shape (C,)
        μ, taken before this step's update.
    running_var : Tensor, shape (C,)
        The running variance.
    eps : float
        The layer's ``eps``.
    r_max : float
        ``>= 1``.
    d_max : float
        ``>= 0``.

    Returns
    -------
    callable
        ``correction(mean_B, var_B) -> (r, d)``, each ``(C,)``; pass it to
        :func:`batch_norm_train`.

    Raises
    ------
    ValueError
        ``r_max < 1``, ``d_max < 0`` or either not finite.

    Examples
    --------
    >>> import torch
    >>> from normlab.functional import renorm_correction
    >>> correction = renorm_correction(torch.zeros(2), torch.ones(2), 0.0, 3.0, 5.0)
    >>> correction(torch.tensor([0.5, 0.0]), torch.tensor([16.0, 1.0]))   # r clipped at 3
    (tensor([3., 1.]), tensor([0.5000, 0.0000]))
    """
    if not (math.isfinite(r_max) and r_max >= 1.0 and math.isfinite(d_max) and d_max >= 0.0):
        raise ValueError(f"need finite r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")

    def correction(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            sigma = torch.sqrt(running_var.to(mean.dtype) + eps)
            r = (torch.sqrt(var + eps) / sigma).clamp(1.0 / r_max, r_max)
            d = ((mean - running_mean.to(mean.dtype)) / sigma).clamp(-d_max, d_max)
        return r, d

    return correction


def _limit(value: Limit, step: int) -> float:
    return float(value(step)) if callable(value) else float(value)


def ghost_chunks(n: int, virtual_batch_size: int) -> list[int]:
    """Ghost BN's chunk sizes for a batch of ``n``.

    ``virtual_batch_size`` each; a last chunk of a single sample joins the previous one (it
    has no variance).

    Parameters
    ----------
    n : int
        The batch size.
    virtual_batch_size : int
        Samples per chunk.

    Returns
    -------
    list of int
        Sizes that add up to ``n``.

    Examples
    --------
    >>> from normlab.functional import ghost_chunks
    >>> ghost_chunks(10, 4), ghost_chunks(9, 4), ghost_chunks(3, 4)
    ([4, 4, 2], [4, 5], [3])
    """
    if n <= virtual_batch_size:
        return [n]
    full, rest = divmod(n, virtual_batch_size)
    if rest == 1:
        return [virtual_batch_size] * (full - 1) + [virtual_batch_size + 1]
    return [virtual_batch_size] * full + ([rest] if rest else [])


# ---------- the layer ----------
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
    moved = spec.channel_axis != 1 and input.dim() > 2
    x = input.movedim(spec.channel_axis, 1) if moved else input  # (N, C, *)
    check_channels(
        x.shape[1],
        running_mean=running_mean,
        running_var=running_var,
        weight=weight,
        bias=bias,
        device=x.device,
    )
    y = _forward(x, mask, running_mean, running_var, num_batches_tracked, weight, bias, spec)
    return y.movedim(1, spec.channel_axis) if moved else y


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
    if not spec.training and has_running:
        return _eval(x, mask, running_mean, running_var, weight, bias, spec)  # type: ignore[arg-type]
    tracking = spec.training and has_running
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
        check_batch_size_shape(x, mask)
    if mask is not None and spec.virtual_batch_size:
        raise ValueError(f"GhostBatchNorm does not support mask ({spec.name})")
    factor = _factor(spec.momentum, num_batches_tracked) if tracking else 0.0
    chunks = ghost_chunks(x.shape[0], spec.virtual_batch_size) if spec.virtual_batch_size else None
    correction = None
    if spec.renorm is not None and has_running:
        assert running_mean is not None and running_var is not None
        step = int(num_batches_tracked) if num_batches_tracked is not None else 0
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
    aten = plain and spec.reducer is None and mask is None and spec.unbiased_running_var
    if tracking and aten and kernel.name == "native":
        assert running_mean is not None and running_var is not None
        return _aten_train(
            x, running_mean, running_var, num_batches_tracked, weight, bias, factor, spec
        )
    plan = Plan(kernel, spec.eps, spec.act, chunks, correction, spec.reducer, spec.save_output)
    result = train(x, weight, bias, plan, mask)
    if tracking:
        assert running_mean is not None and running_var is not None
        mean, var = result.mean, result.var
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
                factor,
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
    factor: float,
    spec: LayerSpec,
) -> Tensor:
    """Plain batch norm on ATen: one call normalizes and moves the running statistics.

    Under ``"propagate"`` ATen updates the buffers themselves (torch's own path). Otherwise
    it updates copies, which are committed per channel where the batch statistics are
    finite (a running buffer must not be modified in place after autograd saved it).
    """
    from ..kernels import NativeKernel

    if spec.nonfinite == "propagate":
        y = NativeKernel.train_and_update(
            x, weight, bias, running_mean, running_var, factor, spec.eps
        )[0]
        _count_batch(num_batches_tracked, True)
        return y
    new_mean, new_var = running_mean.clone(), running_var.clone()
    y, mean, invstd = NativeKernel.train_and_update(
        x, weight, bias, new_mean, new_var, factor, spec.eps
    )
    if _on_host(running_mean) and _host_finite(mean) and _host_positive(invstd):
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
        updated: bool | Tensor = True
    else:  # a variance of +inf gives invstd = 0, NaN gives NaN
        ok = torch.isfinite(mean) & torch.isfinite(invstd) & (invstd > 0)
        with torch.no_grad():
            updated = _commit(
                running_mean, running_var, new_mean, new_var, ok, spec.nonfinite, spec.name
            )
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
    records = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    )
    kernel = resolve_kernel(spec.backend, x, variant=spec.act is not None)
    if records and not kernel.differentiable and kernel.name != "reference":
        kernel = resolve_kernel("native", x)  # the same affine map, with ATen's autograd
    act = spec.act
    fused = act if act is not None and act.name in kernel.activations else None
    y = kernel.forward_eval(x, running_mean, running_var, weight, bias, spec.eps, fused)
    if act is not None and fused is None:
        y = act.forward(y)
    if mask is not None:
        check_batch_size_shape(x, mask)
        fill = bias if bias is not None else x.new_zeros(x.shape[1])
        fill = fill.to(y.dtype) if act is None else act.forward(fill.to(y.dtype))
        y = torch.where(mask.unsqueeze(1), y, channel_view(fill, x.dim()))
    return y


def check_batch_size_shape(x: Tensor, mask: Tensor) -> None:
    """The mask's dtype, shape and device (eval: no count needed)."""
    expected = x.shape[:1] + x.shape[2:]
    if (
        not isinstance(mask, Tensor)
        or mask.dtype != torch.bool
        or tuple(mask.shape) != tuple(expected)
    ):
        got = (tuple(mask.shape), mask.dtype) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            "mask must be a bool tensor with the input's shape without its channel axis, "
            f"expected {tuple(expected)} (bool), got {got}"
        )


# ---------- functional entry points ----------
def batch_norm_train(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    mask: Tensor | None = None,
    backend: str = "auto",
    activation: Activation | None = None,
    chunks: list[int] | None = None,
    correction: Correction | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize ``input`` ``(N, C, *)`` with its own batch statistics: ``(y, mean, var)``.

    ``var`` is biased; both statistics are in the accumulation dtype, without gradient,
    ``(C,)`` — or ``(len(chunks), C)`` when ``chunks`` (sizes of consecutive batch chunks,
    each normalized with its own statistics) is given. ``activation`` follows the affine map;
    ``correction(mean, var) -> (r, d)`` (per channel, no gradient) turns the output into
    ``weight·(r·x̂ + d) + bias`` — Batch Renormalization — at plain batch-norm cost.

    Parameters
    ----------
    input : Tensor, shape (N, C, *)
        Floating point.
    weight : Tensor of shape (C,) or None
        γ.
    bias : Tensor of shape (C,) or None
        β.
    eps : float
        Added to the variance.
    mask : Tensor of bool, optional
        Valid positions, the input's shape without the channel axis.
    backend : str
        See :func:`batch_norm`.
    activation : Activation, optional
        Applied after the affine map (:func:`make_activation`).
    chunks : list of int, optional
        Sizes of consecutive batch chunks (:func:`ghost_chunks`).
    correction : callable, optional
        ``(mean, var) -> (r, d)`` (:func:`renorm_correction`).

    Returns
    -------
    (Tensor, Tensor, Tensor)
        ``y`` (the input's shape), ``mean`` and biased ``var``.

    Examples
    --------
    >>> import torch
    >>> from normlab.functional import batch_norm_train, ghost_chunks, make_activation
    >>> x = torch.randn(12, 4, requires_grad=True)
    >>> y, mean, var = batch_norm_train(x, None, None, 1e-5, activation=make_activation("relu"),
    ...                                 chunks=ghost_chunks(12, 6))
    >>> y.shape, mean.shape, bool((y >= 0).all())
    (torch.Size([12, 4]), torch.Size([2, 4]), True)
    >>> y.sum().backward()                               # the closed-form backward
    """
    check_input(input)
    check_channels(input.shape[1], weight=weight, bias=bias, device=input.device)
    eps = check_eps(eps)
    check_batch_size(input, mask)
    per_sample = input.numel() // max(1, input.shape[0] * input.shape[1])
    if chunks is not None and (
        sum(chunks) != input.shape[0] or min(chunks) < 1 or min(chunks) * per_sample < 2
    ):
        raise ValueError(
            "chunks must be positive sizes summing to the batch size "
            f"{input.shape[0]}, each with more than 1 value per channel; got {chunks}"
        )
    if chunks is not None and mask is not None:
        raise ValueError("batch_norm_train: chunks and mask cannot be combined")
    variant = activation is not None or chunks is not None or correction is not None
    kernel = resolve_kernel(backend, input, mask=mask, variant=variant)
    result = train(input, weight, bias, Plan(kernel, eps, activation, chunks, correction), mask)
    return result.y, result.mean, result.var


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

    In training, :math:`\mu, \sigma^2` are the batch mean and biased variance per channel
    (axis 1) over ``n = N * prod(spatial)`` values, and the running buffers, when given,
    are updated in place as torch does: ``running = (1 - momentum) * running + momentum *
    batch`` with the unbiased variance ``var * n / (n - 1)``. In eval, the running
    statistics are used.

    Parameters
    ----------
    input : Tensor
        ``(N, C, *)``, floating point.
    running_mean, running_var : Tensor or None
        ``(C,)`` buffers; required in eval (``training=False``).
    weight, bias : Tensor or None
        ``(C,)`` affine parameters γ and β.
    training : bool
        Batch statistics (True) or running statistics (False).
    momentum : float
        In ``[0, 1]``.
    eps : float
        Added to the variance; ``>= 0``.
    mask : Tensor, optional
        bool, the input's shape without the channel axis: statistics use only ``True``
        positions; masked positions output ``bias`` (finite whatever they hold), in
        training and in eval alike.
    backend : str
        ``"auto"`` (fastest correct path), ``"reference"`` (plain torch ops, the oracle),
        ``"native"`` (ATen), ``"fused"`` (normlab's C++ kernels; raises if they cannot be
        built or do not serve the input).
    nonfinite : str
        For channels whose batch statistics are NaN/Inf: ``"propagate"`` (torch),
        ``"skip"`` (warns, leaves those channels' running statistics unchanged) or
        ``"raise"``.

    Returns
    -------
    Tensor
        The normalized input, same shape, dtype and memory layout.

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(8, 3, 4, 4)
    >>> rm, rv = torch.zeros(3), torch.ones(3)
    >>> y = batch_norm(x, rm, rv, training=True)
    >>> torch.allclose(y, torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3), training=True), atol=1e-6)
    True

    The training path's backward is the closed form
    ``dx = γ/σ · (dy − mean(dy) − x̂·mean(dy·x̂))``; double backward is supported.
    """
    check_input(input)
    if not training and (running_mean is None or running_var is None):
        raise ValueError(
            "batch_norm in eval mode (training=False) needs running_mean and running_var"
        )
    if (running_mean is None and running_var is not None) or (
        running_var is None and running_mean is not None
    ):
        raise ValueError("batch_norm needs both running_mean and running_var, or neither")
    momentum = check_momentum(momentum)  # type: ignore[assignment]
    if momentum is None:
        raise ValueError(
            "batch_norm needs a float momentum (None, the cumulative average, is a layer option)"
        )
    spec = LayerSpec(
        name="batch_norm",
        num_features=input.shape[1],
        training=training,
        momentum=momentum,
        eps=check_eps(eps),
        nonfinite=check_choice(nonfinite, "nonfinite", NONFINITE),
        backend=backend,
    )
    return batch_norm_layer(input, mask, running_mean, running_var, None, weight, bias, spec)
