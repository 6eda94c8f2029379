"""Eval speed of a small ResNet-style CNN before and after :func:`normlab.nn.utils.fold_batchnorm`.

A same-run ratio (median of alternating repeats), never a timed test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.utils import fold_batchnorm
from ._core import BenchOptions, Case, time_pair

__all__ = ["fold_cases", "fold_speedup", "small_resnet"]


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def small_resnet(width: int = 16, num_classes: int = 10) -> nn.Module:
    """A CIFAR-style ResNet-8 (stem, 3 stages of one basic block, pool, linear) with torch BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        _Block(width, width, 1),
        _Block(width, 2 * width, 2),
        _Block(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )


def _with_random_stats(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters (so folding has something to fold), eval mode."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def fold_speedup(quick: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Eval time of ``small_resnet`` with BatchNorm vs folded; ``speedup = original / folded``.

    Returns ``model, input_shape, device, repeats, original_ms, folded_ms, speedup,
    max_abs_diff`` (the outputs' largest difference), ``folded`` (number of folded BNs).
    """
    batch, size, repeats = (16, 32, 15) if quick else (64, 32, 41)
    model = _with_random_stats(small_resnet()).to(device)
    folded, report = fold_batchnorm(model)
    x = torch.randn(batch, 3, size, size, device=device)

    def sync() -> None:
        if x.is_cuda:
            torch.cuda.synchronize()

    with torch.inference_mode():
        diff = float((model(x) - folded(x)).abs().max())

        def run(m: nn.Module) -> Callable[[], None]:
            def call() -> None:
                m(x)
                sync()

            return call

        base, fast = time_pair(run(model), run(folded), repeats=repeats, warmup=3)
    return {
        "model": "small_resnet(width=16), torch BatchNorm2d",
        "input_shape": (batch, 3, size, size),
        "device": str(x.device),
        "repeats": repeats,
        "original_ms": base * 1e3,
        "folded_ms": fast * 1e3,
        "speedup": base / fast,
        "max_abs_diff": diff,
        "folded": len(report.folded),
    }


def fold_cases(options: BenchOptions) -> list[Case]:
    """Eval forward of ``small_resnet`` before (baseline) and after ``fold_batchnorm``."""
    batch = 16 if options.quick else 64
    model = _with_random_stats(small_resnet())
    folded, _ = fold_batchnorm(model)
    x = torch.randn(batch, 3, 32, 32)

    def run(m: nn.Module) -> Callable[[], object]:
        def call() -> object:
            with torch.inference_mode():
                return m(x)

        return call

    return [
        Case(
            "fold",
            f"small_resnet ({batch}, 3, 32, 32)",
            "eval fwd",
            run(model),
            run(folded),
            baseline_label="unfolded",
        )
    ]
