"""``gradients_at_init`` — Bjorck et al. 2018: without BN, gradients at init blow up and only tiny steps help."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ... import init as ni
from ... import nn as nlnn
from ...diagnostics import gradient_report
from ..data import Dataset
from . import Claim, ClaimResult, Experiment, Results, register
from ._common import fmt, grouped, md_table, members, num

BLOCKS, WIDTH, BATCH = 20, 100, 512
ALPHAS = tuple(float(a) for a in np.logspace(-5, 1, 61))
SETUP = {"blocks": BLOCKS, "width": WIDTH, "batch": BATCH}


def largest_safe_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[float, list[float], float]:
    """α* = the largest α on the grid such that L(θ − α'·∇L) ≤ L(θ) for every α' ≤ α (same batch, train mode;
    running statistics untouched). Returns (α*, the losses along the grid, L(θ))."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def loss_at(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(
            torch.func.functional_call(
                model, ({**p}, {k: v.clone() for k, v in buffers.items()}), (x,)
            ),
            y,
        )

    theta = {n: t.clone().requires_grad_(True) for n, t in params.items()}
    base = loss_at(theta)
    base_value = float(base.detach())
    grads = torch.autograd.grad(base, list(theta.values()))
    losses = []
    with torch.no_grad():
        for alpha in ALPHAS:
            moved = {n: t - alpha * g for (n, t), g in zip(params.items(), grads)}
            losses.append(float(loss_at(moved)))
    best = 0.0
    for alpha, loss in zip(ALPHAS, losses):
        if not (math.isfinite(loss) and loss <= base_value):
            break
        best = alpha
    return best, losses, base_value


class ResidualMLP(nn.Module):
    """``BLOCKS`` residual blocks ``h ← relu(h + Linear→[BN]→ReLU→Linear→[BN](h))`` between a stem and a head:
    the fully connected analogue of the ResNets Bjorck et al. study (He init, biases 0)."""

    def __init__(self, in_features: int, num_classes: int, *, bn: bool, seed: int) -> None:
        super().__init__()

        def norm() -> nn.Module:
            return nlnn.BatchNorm1d(WIDTH) if bn else nn.Identity()

        self.stem = nn.Linear(in_features, WIDTH)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Linear(WIDTH, WIDTH, bias=not bn),
                norm(),
                nn.ReLU(),
                nn.Linear(WIDTH, WIDTH, bias=not bn),
                norm(),
            )
            for _ in range(BLOCKS)
        )
        self.head = nn.Linear(WIDTH, num_classes)
        gen = torch.Generator().manual_seed(seed)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                ni.kaiming_normal_(m.weight, nonlinearity="relu", generator=gen)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        for block in self.blocks:
            h = torch.relu(h + block(h))
        return self.head(h)


@register
class GradientsAtInit(Experiment):
    name = "gradients_at_init"
    paper = "Bjorck et al. 2018, Figs. 2-3"
    summary = "BN keeps gradients at init balanced across depth, so much larger steps still lower the loss."
    setup = (
        "Taken from the paper (Figs. 2–3): a deep residual network at initialization, plain vs BN; the "
        "gradient norm of each layer and the largest step along the gradient that still lowers the loss. "
        f"Changed: a residual MLP (the fully connected analogue of their ResNet-110): {BLOCKS} blocks "
        f"h ← relu(h + Linear→[BN]→ReLU→Linear→[BN](h)), width {WIDTH}, He init; one batch of {BATCH} "
        "training samples (train mode). α*: the largest step on a log grid 1e-5…10 up to which the loss on "
        "that batch never rises. When no probed step lowers the loss, α* counts as 1e-5, and when every "
        "step does, as 10: either makes the ratio a lower bound."
    )
    paper_numbers = (
        "Bjorck et al. (ResNet-110, CIFAR-10): without BN the gradients of the first layers are orders of "
        "magnitude larger than the last layers' and only very small learning rates decrease the loss; with BN "
        "the gradient norms are similar across layers and far larger steps are possible."
    )
    minutes_quick = 0.2
    minutes_full = 0.3
    claims = (
        Claim(
            "alpha_ratio",
            "The largest loss-decreasing step along the gradient is ≥ 10× larger with BN",
            paper,
            "α*(BN) / α*(plain), per seed",
            ">=",
            10.0,
            "Figs. 2–3 (ResNet-110, CIFAR-10): without BN only very small steps lower the loss, with BN "
            "steps orders of magnitude larger do; no single ratio",
            scale="log",
        ),
    )

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        return [{"norm": norm, "seeds": seeds, "setup": SETUP} for norm in ("none", "bn")]

    def run(
        self, config: dict[str, Any], data: Dataset, *, progress: bool = False
    ) -> dict[str, Any]:
        out = []
        for seed in config["seeds"]:
            model = ResidualMLP(
                data.in_features, data.num_classes, bn=config["norm"] == "bn", seed=seed
            )
            idx = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))[
                :BATCH
            ]
            x, y = data.x_train[idx], data.y_train[idx]
            report = gradient_report(model, F.cross_entropy, (x, y))
            norms = [
                v
                for k, v in report.grad_norms.items()
                if isinstance(model.get_submodule(k), nn.Linear)
            ]
            alpha, losses, base = largest_safe_step(model, x, y)
            out.append(
                {
                    "seed": seed,
                    "grad_norms": norms,
                    "alpha_star": alpha,
                    "losses": losses,
                    "loss": base,
                }
            )
        return {"members": out}

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        g = grouped(members(results), lambda r: r["config"]["norm"])
        # α* = 0 means not even the smallest probed step lowers the loss: count it as that step,
        # so the ratio is a lower bound rather than infinite
        ratios = [
            b["alpha_star"] / max(p["alpha_star"], ALPHAS[0]) for p, b in zip(g["none"], g["bn"])
        ]
        censored: list[Any] = [
            "lower" if p["alpha_star"] < ALPHAS[0] or b["alpha_star"] >= ALPHAS[-1] else None
            for p, b in zip(g["none"], g["bn"])
        ]
        return [self.claim("alpha_ratio").check(ratios, censored=censored)]

    def table(self, results: Results) -> str:
        rows = []
        for norm, recs in grouped(members(results), lambda r: r["config"]["norm"]).items():
            growth = [r["grad_norms"][-2] / r["grad_norms"][0] for r in recs]  # last block / stem
            rows.append(
                [
                    "BN" if norm == "bn" else "plain",
                    fmt(growth),
                    num(float(np.median([r["alpha_star"] for r in recs]))),
                ]
            )
        return md_table(
            [
                "model",
                "gradient norm, last block / stem (growth with depth)",
                "α* (median over seeds)",
            ],
            rows,
        )

    def plot(self, results: Results, out_dir: Path) -> list[Path]:
        from ..plots import new_figure, save, seed_dots

        fig, axes = new_figure(1, 3, width=19)
        for norm, recs in grouped(members(results), lambda r: r["config"]["norm"]).items():
            label = "BN" if norm == "bn" else "plain"
            for i, r in enumerate(recs):
                axes[0].plot(
                    range(1, len(r["grad_norms"]) + 1),
                    r["grad_norms"],
                    "o-" if norm == "bn" else "x--",
                    color="tab:blue" if norm == "bn" else "tab:red",
                    alpha=0.7,
                    label=label if i == 0 else None,
                )
                rel = [
                    v / r["loss"] if v is not None and math.isfinite(v) else np.nan
                    for v in r["losses"]
                ]
                axes[1].plot(
                    ALPHAS,
                    rel,
                    color="tab:blue" if norm == "bn" else "tab:red",
                    alpha=0.7,
                    label=label if i == 0 else None,
                )
        axes[0].set_yscale("log")
        axes[0].set(
            title="Gradient norm per layer at init",
            xlabel="layer (input → output)",
            ylabel="‖∂loss/∂W‖ (log scale)",
        )
        axes[1].set_xscale("log")
        axes[1].set_yscale("log")
        axes[1].axhline(1.0, color="gray", ls=":")
        axes[1].set(
            title="Loss after a step α along the gradient",
            xlabel="step size α (log scale)",
            ylabel="L(θ − α∇L) / L(θ) (log scale)",
        )
        for ax in axes[:2]:
            ax.legend()
        g = grouped(members(results), lambda r: r["config"]["norm"])
        seed_dots(
            axes[2],
            [
                (label, [max(r["alpha_star"], ALPHAS[0]) for r in g[norm]])
                for norm, label in (("none", "plain"), ("bn", "BN"))
            ],
            colors=["tab:red", "tab:blue"],
        )
        axes[2].set_yscale("log")
        axes[2].set(title="α* per seed (dots), mean and 95 % interval", ylabel="α* (log scale)")
        path = out_dir / "gradients_at_init.png"
        save(fig, path)
        return [path]
