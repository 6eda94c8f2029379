"""Models for the lab: an MLP factory and a small CNN, with every normalization the experiments compare."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import init as ni
from .. import nn as nlnn

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "NORMS",
    "SmallCNN",
    "activation_module",
    "init_linear_",
    "mlp",
    "norm_layer",
]

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


def norm_layer(norm: str, width: int, **kwargs: Any) -> nn.Module:
    """The normalization layer ``norm`` over ``width`` features (``"bn"`` and ``"bn_after"`` are the same layer)."""
    if norm in ("bn", "bn_after"):
        return nlnn.BatchNorm1d(width, **kwargs)
    if norm in ("renorm", "ghost"):
        name = "BatchRenorm1d" if norm == "renorm" else "GhostBatchNorm1d"
        cls = getattr(nlnn, name, None)
        if cls is None:
            raise RuntimeError(
                f"norm={norm!r} needs normlab.nn.{name}, which this installation lacks"
            )
        return cls(width, **kwargs)
    if norm == "layer":
        return nn.LayerNorm(width, **kwargs)
    if norm == "group":
        groups = kwargs.pop("num_groups", 8 if width % 8 == 0 else 1)
        return nn.GroupNorm(groups, width, **kwargs)
    raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(NORMS)}")


def _gain(activation: str) -> float:
    if activation in ("selu", "identity"):
        return 1.0  # SELU's self-normalization assumes LeCun's 1/fan_in
    return ni.calculate_gain(activation)


def init_linear_(
    layer: nn.Linear, init: str | float, activation: str, generator: torch.Generator
) -> None:
    """Initialize one Linear layer for the activation that follows it (:mod:`normlab.init`); biases 0.

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
) -> nn.Sequential:
    """An MLP with ``depth`` hidden layers of ``width`` units.

    Per hidden layer: ``Linear → norm → activation`` (the Linear has no bias when a
    norm follows it directly), or ``Linear → activation → BatchNorm`` for
    ``norm="bn_after"``. The output layer is a plain ``Linear``. ``seed`` fixes the
    initialization (the global RNG is left untouched).
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
        for _ in range(depth):
            layers.append(nn.Linear(fan_in, width, bias=norm in ("none", "bn_after")))
            if norm in ("none", "bn_after"):
                layers.append(activation_module(activation))
                if norm == "bn_after":
                    layers.append(norm_layer(norm, width, **(norm_kwargs or {})))
            else:
                layers.append(norm_layer(norm, width, **(norm_kwargs or {})))
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


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head for 28×28 / 32×32 images (``norm``: none, bn, bn_after, group)."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        *,
        width: int = 32,
        norm: str = "bn",
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if norm not in ("none", "bn", "bn_after", "group"):
            raise ValueError(f"SmallCNN supports norm none, bn, bn_after, group; got {norm!r}")
        blocks: list[nn.Module] = []
        c = in_channels
        for out in (width, 2 * width):
            blocks.append(nn.Conv2d(c, out, 3, padding=1, bias=norm in ("none", "bn_after")))
            if norm == "bn":
                blocks.append(nlnn.BatchNorm2d(out))
            elif norm == "group":
                blocks.append(nn.GroupNorm(8, out))
            blocks.append(activation_module(activation))
            if norm == "bn_after":
                blocks.append(nlnn.BatchNorm2d(out))
            blocks.append(nn.MaxPool2d(2))
            c = out
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
