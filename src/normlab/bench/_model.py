"""Whole-model benchmark: one SGD training step of a small ResNet-style CNN, torch BN vs normlab BN."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import nn as nlnn
from ._core import BenchOptions, Case

__all__ = ["model_cases", "small_resnet"]


class _Block(nn.Module):
    """conv-BN-ReLU-conv-BN + identity (or a strided 1x1 projection)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


def small_resnet(width: int = 32, classes: int = 10) -> nn.Module:
    """A ResNet-style CNN for 32x32 images: stem, three stages of one block, pool, linear."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        _Block(width, width, 1),
        _Block(width, 2 * width, 2),
        _Block(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, classes),
    )


def _with_normlab_bn(model: nn.Module, backend: str) -> nn.Module:
    """A copy of ``model`` with every ``nn.BatchNorm2d`` replaced by ``normlab.nn.BatchNorm2d``."""
    model = copy.deepcopy(model)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            ours = nlnn.BatchNorm2d(child.num_features, backend=backend)
            ours.load_state_dict(child.state_dict())
            setattr(model, name, ours)
        else:
            setattr(model, name, _with_normlab_bn(child, backend))
    return model


def _step(model: nn.Module, x: Tensor, target: Tensor) -> Callable[[], object]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def run() -> object:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        return loss

    return run


def model_cases(options: BenchOptions, *, compiled: bool = False) -> list[Case]:
    """A training step (forward, loss, backward, SGD) with torch's BN vs normlab's."""
    batch = 32 if options.quick else 128
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    target = torch.randint(0, 10, (batch,), generator=g)
    torch.manual_seed(0)
    ref = small_resnet()
    ours = _with_normlab_bn(ref, options.backend)
    models: list[nn.Module] = [ref, ours]
    if compiled:
        models = [torch.compile(m) for m in models]  # type: ignore[misc]
    mode = "train step (compiled)" if compiled else "train step"
    label = f"small ResNet, batch {batch}, 3x32x32"
    return [Case("model", label, mode, _step(models[0], x, target), _step(models[1], x, target))]
