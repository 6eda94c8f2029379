"""Batched ensembles vs the same K small MLPs trained one after the other: steady-state step throughput."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..lab.data import load_dataset
from ..lab.ensemble import Ensemble, TrainConfig, make_optimizer, train_step
from ..lab.models import mlp
from ._core import BenchOptions, Case

__all__ = ["ensemble_cases"]


def ensemble_cases(options: BenchOptions) -> list[Case]:
    """One training step of K MLPs (digits, batch 64, SGD + momentum): K separate steps vs one batched step.

    A ratio of 0.25 means the ensemble trains 4× as many models per second.
    """
    cases = []
    data = load_dataset("digits")
    for k, norm in ((16, "bn"), (16, "none")) if not options.quick else ((16, "bn"),):
        models = [
            mlp(data.in_features, 3, 100, data.num_classes, norm=norm, init="he", seed=s)
            for s in range(k)
        ]
        opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
        ens = Ensemble(models).train()
        opt = make_optimizer(ens, TrainConfig(lr=0.05, momentum=0.9))
        g = torch.Generator().manual_seed(0)
        idx = torch.randint(0, len(data.y_train), (k, 64), generator=g)
        x, y = data.x_train[idx], data.y_train[idx]  # (K, 64, F), (K, 64)
        scale = torch.full((k,), 0.05)

        def sequential(models=models, opts=opts, x=x, y=y) -> None:
            for i, (model, o) in enumerate(zip(models, opts)):
                loss = F.cross_entropy(model(x[i]), y[i])
                o.zero_grad()
                loss.backward()
                o.step()

        def batched(ens=ens, opt=opt, x=x, y=y, scale=scale) -> None:
            train_step(ens, opt, x, y, scale)

        label = f"K={k} MLP 3x100{'+BN' if norm == 'bn' else ''}, batch 64"
        cases.append(
            Case("ensemble", label, "train step", sequential, batched, baseline_label="sequential")
        )
    return cases
