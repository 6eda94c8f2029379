"""``rank_collapse`` — Daneshmand et al. 2020: at initialization, the batch representations of a deep
network without BN collapse towards rank one as depth grows; BN keeps the rank high."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import Dataset
from ..models import mlp
from . import Claim, ClaimResult, Experiment, Results, register
from ._common import fmt, grouped, md_table, members, num

__all__ = ["DEPTHS", "RankCollapse", "hidden_representations", "numerical_rank"]

WIDTH, SAMPLES, RTOL = 32, 128, 0.01
FLOOR = 1e-20  # the spectrum plot's floor: smaller ratios are drawn on it
DEPTHS = tuple(2**i for i in range(9))  # 1 … 256 hidden layers
ARMS = (("none", "identity"), ("bn", "identity"), ("none", "relu"), ("bn", "relu"))
LABELS = {
    ("none", "identity"): "linear",
    ("bn", "identity"): "linear + BN",
    ("none", "relu"): "ReLU",
    ("bn", "relu"): "ReLU + BN",
}
SETUP = {"width": WIDTH, "samples": SAMPLES, "rtol": RTOL, "depths": list(DEPTHS)}


def numerical_rank(h: torch.Tensor, rtol: float = RTOL) -> int:
    """The number of singular values of ``h`` ``(N, C)`` above ``rtol`` × the largest (0 for a zero
    or non-finite matrix)."""
    if not bool(torch.isfinite(h).all()):
        return 0
    s = torch.linalg.svdvals(h.double())
    return int((s > rtol * s[0]).sum()) if float(s[0]) > 0 else 0


@torch.no_grad()
def hidden_representations(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Every hidden layer's output ``(N, C)`` (after its activation, or its norm for a linear net),
    in training mode (batch statistics), float64."""
    model = model.double().train()
    outs = []
    h = x.double()
    layers = list(model)[:-1]  # the output Linear is not a hidden layer
    for i, layer in enumerate(layers):
        h = layer(h)
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if nxt is None or isinstance(nxt, nn.Linear):  # the end of a hidden block
            outs.append(h)
    return outs


@register
class RankCollapse(Experiment):
    name = "rank_collapse"
    paper = "Daneshmand et al. 2020"
    summary = (
        "At initialization, a deep network without BN maps a batch to nearly rank one; with BN the "
        "batch representation keeps a high rank."
    )
    setup = (
        "Taken from the paper: deep linear (and ReLU) networks at random initialization, with and "
        "without BN after every Linear, the rank of the last hidden layer's representation of a batch "
        f"as depth grows. Changed: width {WIDTH}, depths {', '.join(map(str, DEPTHS))} (the layers of "
        f"one {DEPTHS[-1]}-layer network read at every depth: a shallower network is its first layers), "
        f"LeCun-normal weights (He for ReLU; the rank does not depend on the weight scale), a batch of "
        f"{SAMPLES} test samples per seed, training mode (batch statistics), float64. Numerical rank: "
        f"singular values above {RTOL} × the largest (our tolerance). At initialization only: no training."
    )
    paper_numbers = (
        "Daneshmand et al. 2020 (main theorem and their rank-vs-depth experiments): without BN the representations of a deep "
        "linear network converge to rank one as depth grows; with BN the rank stays at least of order "
        "√width at any depth. Our thresholds below are ours (the paper's bound has unspecified constants)."
    )
    minutes_quick = 0.03
    minutes_full = 0.1
    claims = (
        Claim(
            "linear_collapses",
            f"Without BN a {DEPTHS[-1]}-layer linear net's batch representation is nearly rank one "
            "(numerical rank < 3)",
            "Daneshmand et al. 2020",
            f"numerical rank of the last hidden layer's batch representation, linear, {DEPTHS[-1]} layers",
            "<",
            3.0,
            "the rank of the plain linear network decays towards 1 with depth; no number for our width",
        ),
        Claim(
            "linear_bn_keeps_rank",
            f"With BN the {DEPTHS[-1]}-layer linear net keeps rank ≥ √width = {math.sqrt(WIDTH):.1f}",
            "Daneshmand et al. 2020, main theorem",
            f"numerical rank of the last hidden layer's batch representation, linear + BN, "
            f"{DEPTHS[-1]} layers",
            ">=",
            math.sqrt(WIDTH),
            "main theorem: with BN the rank is Ω(√width) at every depth (constants unspecified)",
        ),
        Claim(
            "relu_bn_keeps_more",
            f"In a {DEPTHS[-1]}-layer ReLU net, BN keeps a higher rank than no normalization",
            "Daneshmand et al. 2020",
            f"numerical rank, ReLU + BN − ReLU, {DEPTHS[-1]} layers, per seed",
            ">",
            0.0,
            "the paper's experiments show the same for ReLU networks (our reading); no number",
            threshold_origin="paper",
        ),
    )

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        return [
            {"norm": norm, "activation": act, "seeds": seeds, "setup": SETUP} for norm, act in ARMS
        ]

    def run(
        self, config: dict[str, Any], data: Dataset, *, progress: bool = False
    ) -> dict[str, Any]:
        out = []
        for seed in config["seeds"]:
            model = mlp(
                data.in_features,
                DEPTHS[-1],
                WIDTH,
                data.num_classes,
                activation=config["activation"],
                norm=config["norm"],
                init="he",
                seed=seed,
            )
            gen = torch.Generator().manual_seed(seed)
            idx = torch.randperm(len(data.y_test), generator=gen)[:SAMPLES]
            hs = hidden_representations(model, data.x_test[idx])
            last = torch.linalg.svdvals(hs[-1])
            out.append(
                {
                    "seed": seed,
                    "rank": [numerical_rank(hs[d - 1]) for d in DEPTHS],
                    "spectrum": (last / last[0]).tolist() if float(last[0]) > 0 else [],
                }
            )
        return {"members": out}

    def _by(self, results: Results) -> dict[tuple[str, str], list[dict[str, Any]]]:
        return grouped(members(results), lambda r: (r["config"]["norm"], r["config"]["activation"]))

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        by = self._by(results)

        def deepest(arm: tuple[str, str]) -> list[float]:
            return [float(r["rank"][-1]) for r in by[arm]]

        relu, relu_bn = deepest(("none", "relu")), deepest(("bn", "relu"))
        return [
            self.claim("linear_collapses").check(deepest(("none", "identity"))),
            self.claim("linear_bn_keeps_rank").check(deepest(("bn", "identity"))),
            self.claim("relu_bn_keeps_more").check([b - p for b, p in zip(relu_bn, relu)]),
        ]

    def table(self, results: Results) -> str:
        rows = []
        for arm, recs in self._by(results).items():
            rows.append(
                [LABELS[arm], *[fmt([r["rank"][i] for r in recs]) for i in range(len(DEPTHS))]]
            )
        return (
            md_table(["network", *[f"depth {d}" for d in DEPTHS]], rows)
            + f"\n\nNumerical rank (singular values > {num(RTOL)} × the largest) of a {SAMPLES}-sample batch."
        )

    def plot(self, results: Results, out_dir: Path) -> list[Path]:
        from ..plots import new_figure, save

        fig, axes = new_figure(1, 2, width=14)
        rng = np.random.default_rng(0)
        for i, (arm, recs) in enumerate(self._by(results).items()):
            color = f"C{i}"
            ranks = np.array([r["rank"] for r in recs], dtype=float)  # (seeds, depths)
            style = "o-" if arm[0] == "bn" else "x--"
            axes[0].plot(DEPTHS, ranks.mean(axis=0), style, color=color, label=LABELS[arm])
            for row in ranks:
                axes[0].scatter(
                    np.asarray(DEPTHS) * 2 ** rng.uniform(-0.08, 0.08, len(DEPTHS)),
                    row,
                    s=8,
                    color=color,
                    alpha=0.4,
                )
            spec = recs[0]["spectrum"]
            if spec:
                axes[1].plot(
                    range(1, len(spec) + 1),
                    np.maximum(spec, FLOOR),
                    style,
                    color=color,
                    label=f"{LABELS[arm]} (seed {recs[0]['seed']})",
                )
        axes[0].axhline(math.sqrt(WIDTH), color="gray", ls=":", lw=1)
        axes[0].set_xscale("log", base=2)
        axes[0].set(
            title=f"Numerical rank of the batch representation (dotted: √{WIDTH})",
            xlabel="depth (hidden layers, log scale)",
            ylabel=f"rank (σ > {num(RTOL)}·σ_max; line: seed mean)",
        )
        axes[1].axhline(RTOL, color="gray", ls=":", lw=1)
        axes[1].set_yscale("log")
        axes[1].set_ylim(FLOOR / 2, 2.0)
        axes[1].set(
            title=f"Singular values at depth {DEPTHS[-1]} (relative to the largest)",
            xlabel="index",
            ylabel="σ_i / σ_1 (log scale)",
        )
        for ax in axes:
            ax.legend(fontsize=8)
        path = out_dir / "rank_collapse.png"
        save(fig, path)
        return [path]
