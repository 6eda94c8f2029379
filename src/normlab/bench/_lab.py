"""The lab's engine: one training step of a batched ensemble against K sequential torch models and
against its floor, the same step's matrix products and convolutions alone (forward and backward).

``ratio`` = batched / sequential (0.2: the ensemble trains 5× as many models per second);
``normlab eff`` = floor / batched step (1.0: no time outside the products; the rest is the
framework's: normalization, activations, pooling, the loss, the optimizer, Python and dispatch).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..lab.data import load_dataset
from ..lab.ensemble import (
    Ensemble,
    StackedConv2d,
    StackedLinear,
    TrainConfig,
    make_optimizer,
    train_step,
)
from ..lab.models import convnet, mlp
from ._core import BenchOptions, Case

__all__ = ["lab_cases", "product_floor"]

K, BATCH = 16, 64


def product_floor(ens: Ensemble, x: Tensor) -> Callable[[], None]:
    """The products of one training step of ``ens`` on ``x`` alone: every stacked Linear's ``bmm``
    and every stacked convolution, forward and backward (input gradients except for the first
    layer, whose input needs none), on preallocated tensors of the step's shapes."""
    shapes: list[tuple[nn.Module, Tensor, Tensor]] = []  # (layer, its input, its output)
    hooks = [
        m.register_forward_hook(lambda mod, args, out: shapes.append((mod, args[0], out)))
        for m in ens.modules()
        if isinstance(m, StackedLinear | StackedConv2d)
    ]
    with torch.no_grad():
        ens(x)
    for h in hooks:
        h.remove()
    ops: list[Callable[[], Any]] = []
    for i, (mod, inp, out) in enumerate(shapes):
        a, g = torch.randn_like(inp), torch.randn_like(out)
        first = i == 0  # its input needs no gradient
        if isinstance(mod, StackedLinear):  # (K, N, in) @ (K, in, out)
            w = mod.weight.detach().clone()
            ops.append(partial(torch.bmm, a, w, out=torch.empty_like(out)))
            ops.append(partial(torch.bmm, a.transpose(1, 2), g, out=torch.empty_like(w)))
            if not first:
                ops.append(partial(torch.bmm, g, w.transpose(1, 2), out=torch.empty_like(inp)))
        else:
            assert isinstance(mod, StackedConv2d)
            w = mod.weight.detach().clone()
            geometry = (mod.stride, mod.padding, mod.dilation)
            ops.append(partial(F.conv2d, a, w, None, *geometry, mod.groups))
            backward = torch.ops.aten.convolution_backward
            mask = [not first, True, False]
            ops.append(partial(backward, g, a, w, None, *geometry, False, [0, 0], mod.groups, mask))

    def run() -> None:
        for op in ops:
            op()

    return run


def lab_cases(options: BenchOptions) -> list[Case]:
    """One training step (SGD + momentum, batch 64, digits) of K = 16 members — the lab's 3×100 MLP
    and its ConvNet, with BN (and the MLP without, in the full run) — batched vs sequential, with
    the floor of the batched step's products timed in the same run."""
    data = load_dataset("digits")
    nets: list[tuple[str, Callable[[int], nn.Sequential]]] = [
        (
            "MLP 3x100+BN",
            lambda s: mlp(data.in_features, 3, 100, data.num_classes, norm="bn", init="he", seed=s),
        ),
        (
            "ConvNet 8-16+BN",
            lambda s: convnet(data.image_shape, data.num_classes, norm="bn", init="he", seed=s),
        ),
    ]
    if not options.quick:
        nets.append(
            (
                "MLP 3x100",
                lambda s: mlp(data.in_features, 3, 100, data.num_classes, init="he", seed=s),
            )
        )
    cases = []
    for label, make in nets:
        models = [make(s) for s in range(K)]
        opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
        ens = Ensemble(models).train()
        opt = make_optimizer(ens, TrainConfig(lr=0.05, momentum=0.9))
        g = torch.Generator().manual_seed(0)
        idx = torch.randint(0, len(data.y_train), (K, BATCH), generator=g)
        x, y = data.x_train[idx], data.y_train[idx]  # (K, B, F), (K, B)
        scale = torch.full((K,), 0.05)

        def sequential(models=models, opts=opts, x=x, y=y) -> None:
            for i, (model, o) in enumerate(zip(models, opts)):
                loss = F.cross_entropy(model(x[i]), y[i])
                o.zero_grad()
                loss.backward()
                o.step()

        def batched(ens=ens, opt=opt, x=x, y=y, scale=scale) -> None:
            train_step(ens, opt, x, y, scale)

        cases.append(
            Case(
                "lab",
                f"K={K} {label}, batch {BATCH}",
                "train step",
                sequential,
                batched,
                baseline_label="sequential",
                floor=product_floor(ens, x),
            )
        )
    return cases
