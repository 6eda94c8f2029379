"""Models for the lab: an MLP and a ConvNet factory, with every normalization the experiments compare."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import init as ni
from .. import nn as nlnn
from .ensemble import StackedBatchNorm, channel_concat

__all__ = [
    "ACTIVATIONS",
    "CONVNET",
    "INITS",
    "NORMS",
    "MicroBatch",
    "activation_module",
    "convnet",
    "init_linear_",
    "mlp",
    "norm_layer",
]

#: The ConvNet's architecture in a unit's config (a change here reruns the ConvNet units).
CONVNET = "conv3x3 8-16 (8x8) / 8-16-32 (larger; over 16 px avg-pooled 2x2 first), BN-ReLU-maxpool, linear"
NORMS = ("none", "bn", "bn_after", "renorm", "ghost", "layer", "group")
INITS = ("torch", "he", "xavier", "lecun", "orthogonal", "normal", "standard")
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


def activation_module(name: str) -> nn.Module:
    """A fresh activation module by name (one of :data:`ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}"
        ) from None


def norm_layer(norm: str, width: int, *, images: bool = False, **kwargs: Any) -> nn.Module:
    """The normalization layer ``norm`` over ``width`` features, or over ``width`` channels of
    ``(N, C, H, W)`` images with ``images=True`` (``"bn"`` and ``"bn_after"`` are the same layer;
    ``"layer"`` is for features only)."""
    if norm in ("bn", "bn_after"):
        return (nlnn.BatchNorm2d if images else nlnn.BatchNorm1d)(width, **kwargs)
    if norm == "renorm":
        return (nlnn.BatchRenorm2d if images else nlnn.BatchRenorm1d)(width, **kwargs)
    if norm == "ghost":
        return (nlnn.GhostBatchNorm2d if images else nlnn.GhostBatchNorm1d)(width, **kwargs)
    if norm == "layer":
        if images:
            raise ValueError("norm 'layer' is for features; on images use 'group'")
        return nn.LayerNorm(width, **kwargs)
    if norm == "group":
        groups = kwargs.pop("num_groups", 8 if width % 8 == 0 else 1)
        return nn.GroupNorm(groups, width, **kwargs)
    raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(NORMS)}")


class MicroBatch(nn.Module):
    """A batch-norm-family layer applied to micro-batches of ``size`` samples (Ioffe 2017, §4.2).

    In training, a batch of ``N = G·size`` samples ``(N, C)`` or images ``(N, C, H, W)`` is split
    into ``G`` contiguous micro-batches, each normalized with its own statistics (over ``size``
    values per channel, or ``size·H·W`` for images) (Batch Renorm: corrected toward the
    running statistics as they were before this step). The running statistics move once per
    forward toward the mean over micro-batches of their means and unbiased variances — as
    synchronous workers averaging their updates, and as :class:`normlab.nn.GhostBatchNorm1d`
    (which equals ``MicroBatch(BatchNorm1d(C), size)``; tested). Eval mode, and batches of at most
    ``size`` samples, are the layer itself.

    The ``G`` micro-batches run as one call of the layer over ``G·C`` channels
    (:func:`normlab.lab.ensemble.channel_concat`), with the layer's own parameters repeated
    (so their gradients are the sums over micro-batches).
    """

    def __init__(self, norm: _BatchNorm, size: int) -> None:
        super().__init__()
        if not isinstance(norm, _BatchNorm):
            raise TypeError(f"MicroBatch wraps a batch-norm layer, got {type(norm).__name__}")
        if size < 2:
            raise ValueError(f"micro-batch size must be >= 2, got {size}")
        self.norm, self.size = norm, size
        self._wide: dict[int, _BatchNorm] = {}  # per number of micro-batches; not submodules

    def extra_repr(self) -> str:
        return f"size={self.size}"

    @classmethod
    def stack(cls, layers: Sequence[MicroBatch]) -> StackedBatchNorm:
        """The ensemble form: the members' layers over ``K·C`` channels, micro-batched."""
        size = layers[0].size
        if any(m.size != size for m in layers):
            raise ValueError("stacked MicroBatch layers need one micro-batch size")

        def unwrap(target: nn.Module) -> _BatchNorm:
            assert isinstance(target, MicroBatch)
            return target.norm

        return StackedBatchNorm(
            [m.norm for m in layers], wrap=lambda n: cls(n, size), unwrap=unwrap
        )

    def _wide_layer(self, groups: int) -> _BatchNorm:
        """The layer over ``groups·C`` channels; its parameters are set from ``norm``'s each forward."""
        wide = self._wide.get(groups)
        if wide is None:
            wide = channel_concat([self.norm] * groups)
            for name, _ in list(wide.named_parameters(recurse=False)):
                delattr(wide, name)  # a plain attribute from now on: the repeat of norm's parameter
                setattr(wide, name, None)
            self._wide[groups] = wide
        return wide

    def forward(self, x: Tensor) -> Tensor:  # (N, C) or (N, C, H, W)
        n, c, *spatial = x.shape
        if not self.training or n <= self.size:
            return self.norm(x)
        groups, rest = divmod(n, self.size)
        if rest:
            raise ValueError(
                f"a batch of {n} samples is not a whole number of micro-batches of {self.size}"
            )
        norm, wide = self.norm, self._wide_layer(groups)
        buffers = [
            (name, b, b.dim() == 1 and b.numel() == c)
            for name, b in norm.named_buffers(recurse=False)
            if b is not None
        ]
        with torch.no_grad():
            for name, b, per_channel in buffers:
                getattr(wide, name).copy_(b.repeat(groups) if per_channel else b)
        for name, p in norm.named_parameters(recurse=False):
            setattr(wide, name, p.repeat(groups))  # gradients flow back to norm's parameter
        wide.train()
        chunks = (
            x.view(groups, self.size, c, *spatial)
            .transpose(0, 1)
            .reshape(self.size, groups * c, *spatial)
        )
        y = wide(chunks)  # (size, G·C, *spatial)
        with torch.no_grad():
            for name, b, per_channel in buffers:
                src = getattr(wide, name)
                b.copy_(src.view(groups, c).mean(0) if per_channel else src)
        for name, _ in norm.named_parameters(recurse=False):
            setattr(wide, name, None)  # hold no graph between steps (and stay deep-copyable)
        return y.view(self.size, groups, c, *spatial).transpose(0, 1).reshape(n, c, *spatial)


def _gain(activation: str) -> float:
    if activation in ("selu", "identity"):
        return 1.0  # SELU's self-normalization assumes LeCun's 1/fan_in
    return ni.calculate_gain(activation)


def init_linear_(
    layer: nn.Linear | nn.Conv2d, init: str | float, activation: str, generator: torch.Generator
) -> None:
    """Initialize one Linear (or Conv2d: fan-in ``C_in·kh·kw``) layer for the activation that follows it (:mod:`normlab.init`); biases 0.

    ``init``: ``"torch"`` (PyTorch's default, left as constructed), ``"he"`` (N(0, gain²/fan_in),
    gain of the activation), ``"xavier"`` (Glorot normal, gain 1), ``"lecun"``, ``"orthogonal"``
    (activation gain), ``"normal"`` (N(0, 0.01²)), ``"standard"`` (Glorot & Bengio's
    U[−1/√fan_in, 1/√fan_in]), or a float: weights N(0, init²).
    """
    w = layer.weight
    with torch.no_grad():
        if init == "torch":
            return
        if isinstance(init, float | int):
            ni.normal_(w, 0.0, float(init), generator=generator)
        elif init == "he":
            ni.variance_scaling_(w, _gain(activation) ** 2, "fan_in", "normal", generator=generator)
        elif init == "xavier":
            ni.xavier_normal_(w, 1.0, generator=generator)
        elif init == "lecun":
            ni.lecun_normal_(w, generator=generator)
        elif init == "orthogonal":
            ni.orthogonal_(w, _gain(activation), generator=generator)
        elif init == "normal":
            ni.normal_(w, 0.0, 0.01, generator=generator)
        elif init == "standard":
            ni.variance_scaling_(
                w, 1.0 / 3.0, "fan_in", "uniform", generator=generator
            )  # U(±1/√fan_in)
        else:
            raise ValueError(
                f"unknown init {init!r}; expected a float std or one of {', '.join(INITS)}"
            )
        if layer.bias is not None:
            layer.bias.zero_()


def mlp(
    in_features: int,
    depth: int,
    width: int,
    num_classes: int,
    *,
    activation: str = "relu",
    norm: str = "none",
    init: str | float = "torch",
    seed: int = 0,
    norm_kwargs: dict[str, Any] | None = None,
    micro_batch: int | None = None,
) -> nn.Sequential:
    """An MLP with ``depth`` hidden layers of ``width`` units.

    Per hidden layer: ``Linear → norm → activation`` (the Linear has no bias when a
    norm follows it directly), or ``Linear → activation → BatchNorm`` for
    ``norm="bn_after"``. The output layer is a plain ``Linear``. ``seed`` fixes the
    initialization (the global RNG is left untouched). ``micro_batch`` wraps every
    batch-norm layer in :class:`MicroBatch` (per-sample norms ignore it).
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(NORMS)}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    activation_module(activation)  # validate early
    layers: list[nn.Module] = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        fan_in = in_features

        def make_norm() -> nn.Module:
            layer = norm_layer(norm, width, **(norm_kwargs or {}))
            if micro_batch is not None and isinstance(layer, _BatchNorm):
                return MicroBatch(layer, micro_batch)
            return layer

        for _ in range(depth):
            layers.append(nn.Linear(fan_in, width, bias=norm in ("none", "bn_after")))
            if norm in ("none", "bn_after"):
                layers.append(activation_module(activation))
                if norm == "bn_after":
                    layers.append(make_norm())
            else:
                layers.append(make_norm())
                layers.append(activation_module(activation))
            fan_in = width
        layers.append(nn.Linear(fan_in, num_classes))
    model = nn.Sequential(*layers)
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for i, lin in enumerate(linears):
        # the output layer is followed by softmax: initialize it as linear
        init_linear_(lin, init, activation if i < len(linears) - 1 else "identity", gen)
    return model


def convnet(
    image_shape: Sequence[int],
    num_classes: int,
    *,
    channels: Sequence[int] | None = None,
    activation: str = "relu",
    norm: str = "none",
    init: str | float = "torch",
    seed: int = 0,
    norm_kwargs: dict[str, Any] | None = None,
    micro_batch: int | None = None,
) -> nn.Sequential:
    """A small VGG-style ConvNet on flattened images ``(N, C·H·W)``, e.g. a :class:`Dataset`'s rows.

    ``nn.Unflatten`` to ``image_shape`` ``(C, H, W)``, then per stage ``Conv3x3 → norm →
    activation → MaxPool2×2`` (the convolution has no bias when a norm follows it), then
    ``Flatten → Linear`` on the last stage's ``C·H·W`` features. ``channels`` per stage defaults
    to ``(8, 16)`` for images of at most 8×8 pixels (digits: 8 → 4 → 2) and ``(8, 16, 32)``
    otherwise; images over 16 pixels high or wide are first average-pooled 2×2 (28×28: 14 → 7 →
    3 → 1). Narrow and coarse, so that the lab's ConvNet track fits its time budget on two CPU
    cores (at full resolution, Fashion-MNIST's ConvNet units took about 4× as long). ``norm`` as :func:`norm_layer` with ``images=True``
    (``"layer"`` excluded); ``init``, ``seed``, ``norm_kwargs`` and ``micro_batch`` as :func:`mlp`.
    Stacks into an :class:`~normlab.lab.ensemble.Ensemble` (grouped convolutions).

    Examples
    --------
    >>> net = convnet((1, 8, 8), 10, norm="bn", init="he")
    >>> net(torch.rand(4, 64)).shape
    torch.Size([4, 10])
    """
    if norm not in NORMS or norm in ("layer", "bn_after"):
        raise ValueError(f"convnet supports norm none, bn, renorm, ghost, group; got {norm!r}")
    if len(image_shape) != 3:
        raise ValueError(f"convnet needs images (C, H, W), got shape {tuple(image_shape)}")
    activation_module(activation)  # validate early
    c, h, w = (int(v) for v in image_shape)
    stages = tuple(channels) if channels is not None else (8, 16) if max(h, w) <= 8 else (8, 16, 32)
    layers: list[nn.Module] = [nn.Unflatten(1, (c, h, w))]
    if max(h, w) > 16:
        layers.append(nn.AvgPool2d(2))
        h, w = h // 2, w // 2
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for out in stages:
            layers.append(nn.Conv2d(c, out, 3, padding=1, bias=norm == "none"))
            if norm != "none":
                layer = norm_layer(norm, out, images=True, **(norm_kwargs or {}))
                if micro_batch is not None and isinstance(layer, _BatchNorm):
                    layer = MicroBatch(layer, micro_batch)
                layers.append(layer)
            layers += [activation_module(activation), nn.MaxPool2d(2)]
            c, h, w = out, h // 2, w // 2
        layers += [nn.Flatten(), nn.Linear(c * h * w, num_classes)]
    model = nn.Sequential(*layers)
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    weighted = [m for m in model if isinstance(m, nn.Linear | nn.Conv2d)]
    for i, layer in enumerate(weighted):
        init_linear_(layer, init, activation if i < len(weighted) - 1 else "identity", gen)
    return model
