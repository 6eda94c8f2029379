"""``NormBase``: what every normlab batch-norm layer shares, and the registry of layer kinds.

A layer holds parameters, buffers and settings; its ``forward`` is one call of
:func:`normlab.functional.batch_norm_layer` with a :class:`~normlab.functional.LayerSpec`
of plain constants. The variants differ only in the spec fields they fill (an activation,
chunks, a correction, a cross-process reducer), so they need no forward of their own.

**Layers describe themselves.** Each class declares its ``kind`` (``"batchnorm"``,
``"bnact"``, ``"renorm"``, ``"ghost"``, ``"sync"``, ``"frozen"``), the input ranks it takes
and its ``OPTIONS`` (settings beyond torch's constructor, with defaults); ``config()``
returns every constructor argument. The converters (:meth:`SyncBatchNorm.convert_sync_batchnorm`,
:meth:`FrozenBatchNorm2d.convert_frozen_batchnorm`, :func:`normlab.nn.utils.convert_batchnorm`,
add/remove, folding) read these descriptions through :func:`describe` and :func:`layer_class`,
so they keep the variant and every option — or refuse with a clear error.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx import _symbolic_trace
from torch.nn.modules.batchnorm import _BatchNorm

from .._norms import has_running_stats, is_batchnorm
from ..functional import (
    BACKENDS,
    NONFINITE,
    SINGLE_SAMPLE,
    Activation,
    LayerSpec,
    batch_norm_layer,
    make_activation,
    nonfinite_channels,
)
from ..functional._checks import check_choice, check_eps, check_momentum, check_num_features

__all__ = [
    "ActivationOptions",
    "LayerDescription",
    "NormBase",
    "describe",
    "layer_class",
    "registered_kinds",
]

# fx records a call of batch_norm_layer as one node instead of tracing into it
torch.fx.wrap("batch_norm_layer")

_REGISTRY: dict[tuple[str, int | None], type[nn.Module]] = {}


def _register(cls: type[nn.Module]) -> None:
    """Register a public class that declares its own ``spatial`` rank (the first one wins: a
    user's subclass does not replace normlab's class for its kind)."""
    key = (getattr(cls, "kind", ""), getattr(cls, "spatial", None))
    if not cls.__name__.startswith("_") and "spatial" in cls.__dict__ and key not in _REGISTRY:
        _REGISTRY[key] = cls


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


class NormBase(_BatchNorm):
    r"""Shared machinery of normlab's batch-norm layers (a ``torch.nn.modules.batchnorm._BatchNorm``).

    In training, each channel is normalized with the batch's mean and *biased* variance over
    every axis but the channel axis, and the running statistics move toward the batch's mean
    and *unbiased* variance: ``running = (1 − momentum)·running + momentum·batch``. In eval the
    running statistics are used (batch statistics when ``track_running_stats=False``):

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    The concrete classes (:class:`BatchNorm2d`, …) fix the input rank; this base class takes
    any ``(N, C, *)`` input.

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels.
    eps : float
        Added to the variance, ``>= 0``. Default 1e-5.
    momentum : float or None
        Running-statistics factor in ``[0, 1]``; ``None`` is the cumulative average.
    affine : bool
        Learnable γ (``weight``, shape ``(C,)``) and β (``bias``, shape ``(C,)``).
    track_running_stats : bool
        Keep running mean/variance (buffers of shape ``(C,)``, used in eval).
    device : torch.device or str, optional
        Where parameters and buffers are created.
    dtype : torch.dtype, optional
        Their dtype.
    bias : bool
        With ``affine``, a learnable β (torch 2.13's ``bias=``); ``False`` keeps γ only.
    nonfinite : {"skip", "raise", "propagate"}
        A training batch whose statistics are NaN/Inf in some channels: ``"skip"`` (default)
        leaves those channels' running statistics unchanged and warns naming them;
        ``"raise"`` raises ``FloatingPointError``; ``"propagate"`` is torch's behaviour.
    single_sample : {"raise", "running"}
        A training batch with one value per channel: torch's error, or normalize it with
        the running statistics (leaving them unchanged).
    backend : {"auto", "reference", "native", "fused"}
        See :func:`normlab.functional.batch_norm`.
    channel_axis : {1, -1}
        ``-1`` takes ``(N, L, C)`` sequences (layers that accept 3D input only).

    Notes
    -----
    Shapes: ``forward(input, mask=None)`` takes ``(N, C, *)`` (``(N, *, C)`` with
    ``channel_axis=-1``) and returns a tensor of the same shape, dtype and memory format;
    ``mask`` is a bool tensor of the input's shape without the channel axis.

    Eager forward and a ``torch.fx`` trace run the same function,
    :func:`normlab.functional.batch_norm_layer`; ``torch.jit.script`` is not supported
    (use ``torch.export`` or ``torch.compile``).

    Examples
    --------
    >>> import torch, normlab
    >>> bn = normlab.nn.BatchNorm2d(3, nonfinite="skip")
    >>> x = torch.randn(4, 3, 5, 5)
    >>> x[0, 1, 0, 0] = float("nan")                    # one bad value in channel 1
    >>> with __import__("warnings").catch_warnings(record=True):
    ...     y = bn(x)
    >>> bn.running_mean.isfinite().all().item()         # channel 1's running stats untouched
    True
    """

    kind: ClassVar[str] = "batchnorm"
    #: accepted input ranks (``()``: any >= 2) and the class's spatial rank (``None``: any)
    _NDIM: ClassVar[tuple[int, ...]] = ()
    spatial: ClassVar[int | None] = None
    #: normlab's settings beyond torch's constructor, with their defaults
    OPTIONS: ClassVar[dict[str, Any]] = {
        "nonfinite": "skip",
        "single_sample": "raise",
        "backend": "auto",
        "channel_axis": 1,
    }

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register(cls)

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
        bias: bool = True,
        nonfinite: str = "skip",
        single_sample: str = "raise",
        backend: str = "auto",
        channel_axis: int = 1,
    ) -> None:
        """Create the layer (the arguments are described in the class docstring)."""
        check_num_features(num_features)
        eps = check_eps(eps)
        momentum = check_momentum(momentum)
        for name, value in (
            ("affine", affine),
            ("track_running_stats", track_running_stats),
            ("bias", bias),
        ):
            _check_bool(value, name)
        check_choice(nonfinite, "nonfinite", NONFINITE)
        check_choice(single_sample, "single_sample", SINGLE_SAMPLE)
        check_choice(backend, "backend", BACKENDS)
        if channel_axis not in (1, -1) or (channel_axis == -1 and 3 not in self._ranks()):
            raise ValueError(
                f"{type(self).__name__} channel_axis must be 1"
                + (" or -1 (for (N, L, C) input)" if 3 in self._ranks() else "")
                + f", got {channel_axis!r}"
            )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.nonfinite = nonfinite
        self.single_sample = single_sample
        self.backend = backend
        self.channel_axis = channel_axis
        self._buffers_checked = False

    @classmethod
    def _ranks(cls) -> tuple[int, ...]:
        return cls._NDIM or (2, 3, 4, 5)

    # --- self-description -------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Every constructor argument that rebuilds this layer (torch's and normlab's options).

        Returns
        -------
        dict
            Keyword arguments: ``type(layer)(**layer.config())`` is an equivalent fresh layer.

        Examples
        --------
        >>> import normlab
        >>> cfg = normlab.nn.BatchNorm2d(8, momentum=None, nonfinite="raise").config()
        >>> cfg["momentum"], cfg["nonfinite"], cfg["backend"]
        (None, 'raise', 'auto')
        """
        return {
            "num_features": self.num_features,
            "eps": self.eps,
            "momentum": self.momentum,
            "affine": self.affine,
            "track_running_stats": self.track_running_stats,
            "bias": not self.affine or self.bias is not None,
            **{name: getattr(self, name) for name in type(self).OPTIONS},
        }

    def extra_repr(self) -> str:
        text = super().extra_repr()
        for name, default in type(self).OPTIONS.items():
            value = getattr(self, name)
            if value != default:
                text += f", {name}={_short(value)}"
        return text

    # --- the forward: one function of the layer's state --------------------------------
    #: the spec is built once and kept until a setting it holds changes (see __setattr__)
    _CACHE_SPEC: ClassVar[bool] = True

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SPEC_ATTRIBUTES:
            self.__dict__.pop("_spec_cache", None)
        super().__setattr__(name, value)

    def _spec(self) -> LayerSpec:
        """The settings as constants (cached); variants add fields in :meth:`_variant_spec`."""
        spec: LayerSpec | None = self.__dict__.get("_spec_cache")
        if (
            spec is None
            or spec.training is not self.training
            or _symbolic_trace._is_fx_tracing_flag
        ):
            spec = self._build_spec()
            if type(self)._CACHE_SPEC:
                self.__dict__["_spec_cache"] = spec
        return spec

    def _build_spec(self) -> LayerSpec:
        return LayerSpec(
            name=f"{type(self).__name__}({self.num_features})",
            num_features=self.num_features,
            ndims=type(self)._NDIM,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
            nonfinite=self.nonfinite,
            single_sample=self.single_sample,
            backend=self.backend,
            channel_axis=self.channel_axis,
            **self._variant_spec(),
        )

    def _variant_spec(self) -> dict[str, Any]:
        return {}

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input`` (batch statistics in training, running statistics in eval).

        Parameters
        ----------
        input : Tensor, shape (N, C, *)
            ``(N, *, C)`` with ``channel_axis=-1``; floating point.
        mask : Tensor of bool, optional
            The input's shape without the channel axis, e.g. ``(N, L)``: ``True`` marks valid
            positions. Statistics use only those; the others output β.

        Returns
        -------
        Tensor
            The input's shape, dtype and memory format.

        Examples
        --------
        >>> import torch, normlab
        >>> bn = normlab.nn.BatchNorm1d(2)
        >>> x, mask = torch.randn(3, 2, 4), torch.tensor([[1, 1, 0, 0]] * 3).bool()
        >>> y = bn(x, mask)
        >>> y[..., :2].mean().abs().item() < 1e-5      # zero mean over the valid positions
        True
        """
        if not self._buffers_checked and not _fx_tracing():  # once
            self._buffers_checked = True
            self._report_nonfinite_buffers("in use")
        training = self.training
        spec: LayerSpec | None = self.__dict__.get("_spec_cache")  # _spec(), inlined: hot
        if spec is None or spec.training is not training or _symbolic_trace._is_fx_tracing_flag:
            spec = self._spec()
        use_buffers = not training or self.track_running_stats
        return batch_norm_layer(
            input,
            mask,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.num_batches_tracked if training and self.track_running_stats else None,
            self.weight,
            self.bias,
            spec,
        )

    # --- state ----------------------------------------------------------------------
    def _report_nonfinite_buffers(self, when: str) -> None:
        """Warn naming the channels whose running statistics are NaN/Inf (a damaged checkpoint)."""
        if torch.compiler.is_compiling():  # first: dynamo cannot trace the functorch check
            return
        if not (has_running_stats(self) and _concrete(self.running_mean)):
            return
        assert self.running_mean is not None and self.running_var is not None
        channels = nonfinite_channels(self.running_mean, self.running_var)
        if channels is not None:
            warnings.warn(
                f"{type(self).__name__}({self.num_features}): running statistics {when} are "
                f"non-finite (NaN/Inf) in channel(s) {channels}; eval outputs there are NaN and "
                "an exponential average cannot recover. The other channels update as usual. "
                "Reset with layer.reset_running_stats() or re-estimate them with "
                "normlab.nn.utils.recalibrate_batchnorm(model, batches).",
                RuntimeWarning,
                stacklevel=3,
            )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Checkpoints written before the counter existed, or by tools that drop it (ONNX
        # round trips, hand-made dicts), still load: the counter restarts at 0.
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._report_nonfinite_buffers("loaded")
        self._buffers_checked = True

    def __setstate__(self, state: dict[str, Any]) -> None:
        # layers pickled by an older normlab lack newer options: give them the defaults
        for name, default in type(self).OPTIONS.items():
            state.setdefault(name, default)
        state.setdefault("_buffers_checked", False)
        super().__setstate__(state)

    def __prepare_scriptable__(self) -> nn.Module:
        raise RuntimeError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script (TorchScript cannot "
            "express its options). Use torch.export.export(model, args) or torch.compile(model); "
            "or, for a TorchScript-only runtime, convert the layers first: "
            "normlab.nn.utils.convert_batchnorm(model, {normlab.nn.BatchNorm2d: torch.nn.BatchNorm2d})."
        )


class ActivationOptions:
    """Mixin: the activation a layer applies after its affine map.

    Used by :class:`BatchNormAct2d`, :class:`SyncBatchNorm` and :class:`FrozenBatchNorm2d`
    (and their 1d/3d siblings); a user does not create it directly.

    Attributes
    ----------
    activation : str or None
        ``None``, ``"identity"``, ``"relu"``, ``"leaky_relu"``, ``"elu"``, ``"silu"`` or
        ``"gelu"``.
    negative_slope : float
        ``leaky_relu``'s slope for negative inputs.
    alpha : float
        ``elu``'s scale for negative inputs.

    Examples
    --------
    >>> import normlab
    >>> layer = normlab.nn.BatchNormAct2d(4, activation="elu", alpha=0.5)
    >>> layer.activation, layer.alpha, layer.act.name
    ('elu', 0.5, 'elu')
    """

    ACTIVATION_OPTIONS: ClassVar[dict[str, Any]] = {
        "activation": None,
        "negative_slope": 0.01,
        "alpha": 1.0,
    }
    activation: str | None
    negative_slope: float
    alpha: float

    def _set_activation(self, activation: str | None, negative_slope: float, alpha: float) -> None:
        make_activation(activation, negative_slope, alpha)  # validates
        self.activation, self.negative_slope, self.alpha = activation, negative_slope, alpha

    @property
    def act(self) -> Activation | None:
        """The validated :class:`~normlab.functional.Activation`, or ``None``."""
        return make_activation(self.activation, self.negative_slope, self.alpha)

    def _activation_repr(self) -> str:
        if self.activation is None:
            return ""
        detail = {
            "leaky_relu": f", negative_slope={self.negative_slope:g}",
            "elu": f", alpha={self.alpha:g}",
        }
        return f", activation={self.activation!r}" + detail.get(self.activation, "")


# the attributes a LayerSpec is built from: setting one drops the cached spec
_SPEC_ATTRIBUTES = frozenset(  # not "training": the spec is checked against the mode at each call
    {
        "num_features",
        "eps",
        "momentum",
        "nonfinite",
        "single_sample",
        "backend",
        "channel_axis",
        "activation",
        "negative_slope",
        "alpha",
        "r_max",
        "d_max",
        "virtual_batch_size",
    }
)


def _fx_tracing() -> bool:
    # the flag itself: is_fx_symbolic_tracing() adds two calls to every forward
    return torch.fx._symbolic_trace._is_fx_tracing_flag and not torch.compiler.is_compiling()


def _concrete(t: Tensor | None) -> bool:
    """A tensor whose values can be read on the host (not meta, not inside ``torch.func``)."""
    return (
        isinstance(t, Tensor)
        and t.device.type != "meta"
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
    )


def _short(value: Any) -> str:
    if callable(value) and not isinstance(value, tuple):
        return "schedule"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    return repr(value)


# --- the registry ----------------------------------------------------------------------
@dataclass(frozen=True)
class LayerDescription:
    """What a batch-norm layer is: its kind, spatial rank and every constructor argument.

    Parameters
    ----------
    kind : str
        ``"batchnorm"``, ``"bnact"``, ``"renorm"``, ``"ghost"``, ``"sync"`` or ``"frozen"``.
    spatial : int or None
        The input's spatial rank (1, 2, 3) the class is for; ``None`` for rank-agnostic ones.
    config : dict
        Keyword arguments that rebuild the layer.

    Examples
    --------
    >>> import normlab
    >>> d = normlab.nn.describe(normlab.nn.GhostBatchNorm2d(4, virtual_batch_size=8))
    >>> d.kind, d.spatial, d.config["virtual_batch_size"]
    ('ghost', 2, 8)
    """

    kind: str
    spatial: int | None
    config: dict[str, Any] = field(default_factory=dict)


_TORCH_SPATIAL: dict[type[nn.Module], int | None] = {
    nn.BatchNorm1d: 1,
    nn.BatchNorm2d: 2,
    nn.BatchNorm3d: 3,
    nn.SyncBatchNorm: None,
    nn.LazyBatchNorm1d: 1,
    nn.LazyBatchNorm2d: 2,
    nn.LazyBatchNorm3d: 3,
}


def describe(module: nn.Module) -> LayerDescription:
    """The :class:`LayerDescription` of a batch-norm layer — normlab's, torch's or a
    ``FrozenBatchNorm*`` (normlab's or another library's).

    Parameters
    ----------
    module : nn.Module
        A batch-norm layer.

    Returns
    -------
    LayerDescription

    Raises
    ------
    TypeError
        ``module`` is not a batch-norm layer.

    Examples
    --------
    >>> import torch, normlab
    >>> normlab.nn.describe(torch.nn.BatchNorm1d(3, momentum=None))
    LayerDescription(kind='batchnorm', spatial=1, config={'num_features': 3, 'eps': 1e-05, 'momentum': None, 'affine': True, 'track_running_stats': True, 'bias': True})
    """
    describe_self = getattr(module, "describe", None)
    if callable(describe_self):
        description: LayerDescription = describe_self()
        return description
    if isinstance(module, NormBase):
        return LayerDescription(type(module).kind, type(module).spatial, module.config())
    if not is_batchnorm(module):
        raise TypeError(f"{type(module).__name__} is not a batch-norm layer")
    spatial = next(
        (s for cls, s in _TORCH_SPATIAL.items() if isinstance(module, cls)),
        getattr(module, "spatial", None),
    )
    if not isinstance(module, _BatchNorm):  # a frozen layer of another library
        running_mean, eps = module.running_mean, module.eps
        assert isinstance(running_mean, Tensor)
        eps_value = float(eps.item()) if isinstance(eps, Tensor) else float(eps)  # type: ignore[arg-type]
        return LayerDescription(
            "frozen", spatial, {"num_features": running_mean.numel(), "eps": eps_value}
        )
    config: dict[str, Any] = {
        "num_features": module.num_features,
        "eps": float(module.eps),
        "momentum": module.momentum,
        "affine": module.affine,
        "track_running_stats": module.track_running_stats,
        "bias": not module.affine or getattr(module, "bias", None) is not None,
    }
    if isinstance(module, nn.SyncBatchNorm):
        config["process_group"] = module.process_group
        return LayerDescription("sync", None, config)
    return LayerDescription("batchnorm", spatial, config)


def layer_class(kind: str, spatial: int | None) -> type[nn.Module]:
    """normlab's class for ``kind`` at ``spatial`` rank.

    Parameters
    ----------
    kind : str
        A registered kind (:func:`registered_kinds`).
    spatial : int or None
        1, 2 or 3; a rank-agnostic class (``SyncBatchNorm``) is found for any.

    Returns
    -------
    type

    Raises
    ------
    ValueError
        normlab has no such layer (the message names the ranks it has).

    Examples
    --------
    >>> import normlab
    >>> normlab.nn.layer_class("renorm", 2).__name__, normlab.nn.layer_class("sync", 3).__name__
    ('BatchRenorm2d', 'SyncBatchNorm')
    """
    for key in ((kind, spatial), (kind, None)):
        if key in _REGISTRY:
            return _REGISTRY[key]
    have = sorted(s for k, s in _REGISTRY if k == kind and s is not None)
    raise ValueError(
        f"normlab has no {kind!r} layer for {spatial}-d input"
        + (f" (it has {', '.join(f'{s}d' for s in have)})" if have else "")
    )


def registered_kinds() -> dict[tuple[str, int | None], type[nn.Module]]:
    """Every registered layer class.

    Returns
    -------
    dict
        ``(kind, spatial rank) -> class`` (a copy).

    Examples
    --------
    >>> import normlab
    >>> normlab.nn.registered_kinds()[("bnact", 2)].__name__
    'BatchNormAct2d'
    """
    return dict(_REGISTRY)
