"""``activations`` — activation functions less sensitive to weight scale (Klambauer et al. 2017;
LeCun et al. 1998): a deep MLP without normalization, five activations across weight scales."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import Dataset
from ..ensemble import TrainConfig, train_ensemble
from ..models import mlp
from . import Claim, ClaimResult, Experiment, Results, accuracy_level, register
from ._common import fmt, grouped, md_table, members, num
from .init_sensitivity import tolerated

__all__ = ["GAINS", "Activations", "init_profile"]

DEPTH, WIDTH, BATCH, LR, MOMENTUM, STEPS = 16, 32, 64, 0.01, 0.9, 300
GAINS = tuple(2 ** (k / 2) for k in range(-2, 5))  # 0.5 … 4, ×√2 apart: std = gain/√fan_in
ARMS = (
    ("none", "sigmoid"),
    ("none", "tanh"),
    ("none", "relu"),
    ("none", "gelu"),
    ("none", "selu"),
    ("bn", "relu"),
)
BOUNDED = ("tanh", "sigmoid")
CLAIM_ARMS = (("none", "tanh"), ("none", "relu"), ("none", "selu"))
SATURATED = 0.05  # a unit is saturated where the activation's slope is < 5 % of its slope at 0
BAND = math.log(1.25)
SETUP = {
    "depth": DEPTH,
    "width": WIDTH,
    "batch": BATCH,
    "lr": LR,
    "momentum": MOMENTUM,
    "saturated": SATURATED,
}


def label(norm: str, act: str) -> str:
    """``"tanh"``, ``"BN-ReLU"``: an arm's name in tables and figures."""
    if norm != "none":
        return f"BN-{label('none', act)}"
    return {"relu": "ReLU", "gelu": "GELU", "selu": "SELU"}.get(act, act)


def build(data: Dataset, norm: str, activation: str, gain: float, seed: int) -> nn.Sequential:
    """The arm's MLP: LeCun-normal weights N(0, 1/fan_in) times ``gain`` in every hidden layer (the
    output layer stays LeCun), zero biases."""
    model = mlp(
        data.in_features,
        DEPTH,
        WIDTH,
        data.num_classes,
        activation=activation,
        norm=norm,
        init="lecun",
        seed=seed,
    )
    linears = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for layer in linears[:-1]:
            layer.weight.mul_(gain)
    return model


@torch.no_grad()
def init_profile(model: nn.Sequential, x: torch.Tensor) -> dict[str, Any]:
    """At init, in training mode: each hidden layer's output std (after its activation) and, for the
    last hidden layer, the fraction of (sample, unit) pairs where the activation is saturated (its
    slope below :data:`SATURATED` × its slope at 0)."""
    was = model.training
    saved = [b.clone() for b in model.buffers()]  # measuring leaves running statistics alone
    model.train()
    stds: list[float] = []
    saturation = math.nan
    h = x
    try:
        for layer in list(model)[:-1]:
            if isinstance(layer, nn.Linear) or hasattr(layer, "running_mean"):
                h = layer(h)
                continue
            with torch.enable_grad():
                z = h.detach().requires_grad_(True)
                slope = torch.autograd.grad(layer(z).sum(), z)[0]
                zero = torch.zeros(1, requires_grad=True)
                slope0 = float(torch.autograd.grad(layer(zero).sum(), zero)[0])
            saturation = float((slope.abs() < SATURATED * abs(slope0)).float().mean())
            h = layer(h)
            stds.append(float(h.std()))
    finally:
        for b, s in zip(model.buffers(), saved):
            b.copy_(s)
        model.train(was)
    return {"std": stds, "saturation": saturation}


@register
class Activations(Experiment):
    name = "activations"
    paper = "Klambauer et al. 2017 (SELU); LeCun et al. 1998, §4.4–4.6"
    summary = (
        "Without normalization, SELU (LeCun init) keeps activations at unit variance through depth and "
        "trains over a wider range of weight scales than ReLU; bounded activations saturate at large scales."
    )
    setup = (
        "Taken from the papers: a deep MLP without normalization, SELU with LeCun-normal init "
        "(Klambauer et al.'s self-normalizing network), compared with sigmoid, tanh, ReLU and GELU, BN-ReLU "
        "as the reference row. Changed: "
        f"{DEPTH} hidden layers of {WIDTH} units; every hidden weight N(0, gain²/fan_in) (LeCun's std "
        f"times the gain; ReLU's He init is gain √2) with gains {', '.join(num(g) for g in GAINS)}, the "
        f"output layer LeCun, zero biases; SGD momentum {MOMENTUM}, lr {LR}, batch {BATCH}, {STEPS} steps "
        "for every dataset (no tuning per activation: one setting for all). A gain is tolerated when the "
        "seed-mean test accuracy reaches 0.80 (0.70 on Fashion-MNIST; a diverged run scores chance), as "
        "in `init_sensitivity`. At init (training mode, 256 test samples): each hidden layer's output "
        f"std, and the last hidden layer's saturation (slope < {SATURATED:.0%} of the slope at 0). "
        "Quick runs train the claims' arms only (tanh, ReLU, SELU); full runs add sigmoid, GELU and "
        "BN-ReLU. He et al.'s 22- and 30-layer cases are in `xavier_vs_he`. Each arm (gains × seeds) "
        "trains as one batched ensemble."
    )
    paper_numbers = (
        "Klambauer et al. (Theorem 1): for SELU the mean and variance (0, 1) are a stable, attracting "
        "fixed point for normalized weights (Σw ≈ 0, Σw² ∈ [0.95, 1.1]); Theorems 2–3 bound the variance "
        "beyond that; their SNNs trained up to 32 layers without normalization. LeCun et al. 1998 (§4.6): "
        "weights too large saturate sigmoids and make learning slow; no numbers for our setting."
    )
    minutes_quick = 0.21
    minutes_full = 1.2
    claims = (
        Claim(
            "selu_unit_variance",
            f"SELU with LeCun init keeps unit variance: the last hidden layer's std is in [0.8, 1.25] "
            f"at depth {DEPTH}",
            "Klambauer et al. 2017, Theorem 1",
            f"ln(std of the last SELU output at init, gain 1), per seed (within ±ln 1.25 = {BAND:.3f})",
            "within",
            BAND,
            "Theorem 1: (0, 1) is an attracting fixed point of the mean and variance",
            kind="sanity",
        ),
        Claim(
            "selu_wider_than_relu",
            "Without BN, SELU tolerates more weight scales than ReLU",
            "Klambauer et al. 2017",
            "gains with seed-mean accuracy ≥ {level:0.80}: SELU − ReLU",
            ">",
            0.0,
            "Theorems 1–3: SELU's variance is pulled to 1 from a range of weight norms; no training "
            "comparison across scales",
        ),
        Claim(
            "tanh_saturates",
            f"At the largest gain ({num(GAINS[-1])}), most of tanh's last-layer units are saturated",
            "LeCun et al. 1998, §4.6",
            f"fraction of saturated (sample, unit) pairs in the last tanh layer at init, gain {num(GAINS[-1])}",
            ">",
            0.5,
            "§4.6: large weights drive sigmoids into saturation; no number",
            kind="sanity",
        ),
        Claim(
            "tanh_worse_at_large_scale",
            "tanh trains worse at the largest gain than at gain 1",
            "LeCun et al. 1998, §4.6",
            f"test accuracy of tanh: gain 1 − gain {num(GAINS[-1])}, paired by seed",
            ">",
            0.0,
            "§4.6: saturated sigmoids have small gradients and learn slowly; no number",
            threshold_origin="paper",
        ),
    )

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        return [
            {
                "norm": norm,
                "activation": act,
                "gains": list(GAINS),
                "seeds": seeds,
                "steps": STEPS,
                "dataset": dataset,
                "setup": SETUP,
            }
            for norm, act in (ARMS if not quick else CLAIM_ARMS)  # quick: the claims' arms only
        ]

    def run(
        self, config: dict[str, Any], data: Dataset, *, progress: bool = False
    ) -> dict[str, Any]:
        combos = [(g, s) for g in config["gains"] for s in config["seeds"]]
        models = [build(data, config["norm"], config["activation"], g, s) for g, s in combos]
        profiles = [init_profile(m, data.x_test[:256]) for m in models]
        cfg = TrainConfig(
            optimizer="sgd",
            lr=LR,
            momentum=MOMENTUM,
            batch_size=BATCH,
            steps=config["steps"],
            eval_every=None,
        )
        results, _ = train_ensemble(
            models, data, cfg, seeds=[s for _, s in combos], progress=progress
        )
        return {
            "members": [
                {
                    "gain": g,
                    "seed": s,
                    "final_test_acc": r.final_test_acc,
                    "diverged": r.diverged,
                    "init_std": p["std"],
                    "saturation": p["saturation"],
                }
                for (g, s), r, p in zip(combos, results, profiles)
            ],
            "num_classes": data.num_classes,
        }

    def _arms(self, results: Results) -> dict[tuple[str, str], list[dict[str, Any]]]:
        return grouped(members(results), lambda r: (r["config"]["norm"], r["config"]["activation"]))

    def _acc(self, results: Results) -> dict[tuple[str, str], np.ndarray]:
        """Per arm, ``(seeds, gains)`` test accuracy; a diverged run scores chance."""
        chance = 1.0 / results[0][1]["num_classes"]
        seeds = list(results[0][0]["seeds"])
        out = {}
        for arm, recs in self._arms(results).items():
            by = {(r["seed"], r["gain"]): r for r in recs}
            out[arm] = np.array(
                [
                    [
                        chance if by[(s, g)]["diverged"] else by[(s, g)]["final_test_acc"]
                        for g in GAINS
                    ]
                    for s in seeds
                ]
            )
        return out

    def _at(self, results: Results, arm: tuple[str, str], gain: float) -> list[dict[str, Any]]:
        return [r for r in self._arms(results)[arm] if r["gain"] == gain]

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        level = accuracy_level(0.80, dataset)
        acc = self._acc(results)
        selu, relu = acc[("none", "selu")], acc[("none", "relu")]
        one = GAINS.index(1.0)
        selu_std = [
            math.log(r["init_std"][-1]) if r["init_std"] and r["init_std"][-1] > 0 else None
            for r in self._at(results, ("none", "selu"), 1.0)
        ]
        tanh = acc[("none", "tanh")]
        return [
            self.claim("selu_unit_variance").check(selu_std),
            self.claim("selu_wider_than_relu", dataset).check_bootstrap(
                selu.shape[0],
                lambda idx: float(tolerated(selu[idx], level) - tolerated(relu[idx], level)),
                values=[float(tolerated(selu, level)), float(tolerated(relu, level))],
            ),
            self.claim("tanh_saturates").check(
                [r["saturation"] for r in self._at(results, ("none", "tanh"), GAINS[-1])]
            ),
            self.claim("tanh_worse_at_large_scale").check((tanh[:, one] - tanh[:, -1]).tolist()),
        ]

    def table(self, results: Results) -> str:
        level = accuracy_level(0.80, results[0][0]["dataset"])
        acc = self._acc(results)
        rows = []
        for arm, recs in self._arms(results).items():
            mean = acc[arm].mean(axis=0)
            ok = np.flatnonzero(mean >= level)
            last = [r["init_std"][-1] for r in recs if r["gain"] == 1.0]
            sat = [r["saturation"] for r in recs if r["gain"] == GAINS[-1]]
            rows.append(
                [
                    label(*arm),
                    *[num(float(v)) for v in mean],
                    f"{len(ok)} / {len(GAINS)}",
                    fmt(last),
                    fmt(sat) if arm[1] in BOUNDED else "—",
                ]
            )
        return (
            md_table(
                [
                    "activation",
                    *[f"gain {num(g)}" for g in GAINS],
                    f"gains tolerated (≥ {level:.2f})",
                    f"last-layer std at init, gain 1 (layer {DEPTH})",
                    f"saturated at init, gain {num(GAINS[-1])}",
                ],
                rows,
            )
            + "\n\nSeed-mean test accuracy per gain (a diverged run scores chance)."
        )

    def plot(self, results: Results, out_dir: Path) -> list[Path]:
        from ..plots import new_figure, save

        level = accuracy_level(0.80, results[0][0]["dataset"])
        acc = self._acc(results)
        arms = self._arms(results)
        fig, axes = new_figure(1, 3, width=20, height=5.5)
        rng = np.random.default_rng(0)
        for i, (arm, a) in enumerate(acc.items()):
            color = f"C{i}"
            ref = arm[0] == "bn"
            axes[0].plot(
                GAINS, a.mean(axis=0), "s--" if ref else "o-", color=color, label=label(*arm)
            )
            for row in a:
                axes[0].scatter(
                    np.asarray(GAINS) * 2 ** rng.uniform(-0.06, 0.06, len(GAINS)),
                    row,
                    s=8,
                    color=color,
                    alpha=0.4,
                )
            first = next(r for r in arms[arm] if r["gain"] == 1.0)
            axes[1].plot(
                range(1, len(first["init_std"]) + 1),
                np.maximum(first["init_std"], 1e-30),
                "s--" if ref else "o-",
                color=color,
                label=f"{label(*arm)} (seed {first['seed']})",
            )
            sat = [np.mean([r["saturation"] for r in arms[arm] if r["gain"] == g]) for g in GAINS]
            if arm[1] in BOUNDED:
                axes[2].plot(GAINS, sat, "o-", color=color, label=label(*arm))
        axes[0].axhline(level, color="gray", ls=":", lw=1)
        axes[0].set_xscale("log", base=2)
        axes[0].set(
            title="Final test accuracy vs weight gain (dots: seeds)",
            xlabel="gain (std = gain/√fan_in, log scale)",
            ylabel="test accuracy (seed mean: line)",
            ylim=(0, 1.02),
        )
        axes[1].axhline(1.0, color="gray", ls=":", lw=1)
        axes[1].set_yscale("log")
        axes[1].set(
            title="Activation std per layer at init, gain 1 (LeCun)",
            xlabel="hidden layer",
            ylabel="std of the layer's output (log scale)",
        )
        axes[2].axhline(0.5, color="gray", ls=":", lw=1)
        axes[2].set_xscale("log", base=2)
        axes[2].set(
            title=f"Saturated units in the last layer at init (slope < {SATURATED:.0%} of slope at 0)",
            xlabel="gain (log scale)",
            ylabel="fraction of (sample, unit) pairs",
            ylim=(-0.02, 1.02),
        )
        for ax in axes:
            ax.legend(fontsize=7)
        path = out_dir / "activations.png"
        save(fig, path)
        return [path]
