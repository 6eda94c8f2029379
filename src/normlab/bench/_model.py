"""Whole-model benchmark: one SGD training step of a small ResNet-style CNN, torch BN vs normlab BN."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import nn as nlnn
from ..nn.utils import convert_batchnorm
from ._core import BenchOptions, Case
from ._fold import small_resnet

__all__ = ["model_cases"]


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
    ref = small_resnet(width=32)
    ours = convert_batchnorm(copy.deepcopy(ref), nlnn.BatchNorm2d, backend=options.backend)
    models: list[nn.Module] = [ref, ours]
    if compiled:
        models = [torch.compile(m) for m in models]  # type: ignore[misc]
    mode = "train step (compiled)" if compiled else "train step"
    label = f"small ResNet, batch {batch}, 3x32x32"
    return [Case("model", label, mode, _step(models[0], x, target), _step(models[1], x, target))]
