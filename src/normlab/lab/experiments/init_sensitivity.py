"""``init_sensitivity`` — "BN reduces sensitivity to initialization" (Ioffe & Szegedy 2015; Bjorck et al. 2018)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..data import Dataset
from ..ensemble import TrainConfig, train_ensemble
from ..models import mlp
from . import Claim, ClaimResult, Experiment, Results, accuracy_level, register
from ._common import activation_stats, grouped, md_table, members, nanmean

STDS = tuple(float(s) for s in np.logspace(-4, 0, 20))
ARMS = (("none", "relu"), ("bn", "relu"), ("none", "sigmoid"), ("none", "tanh"), ("none", "selu"))


def tolerated(records: list[dict[str, Any]], level: float) -> int:
    """Number of weight scales whose seed-mean test accuracy reaches ``level``."""
    by_std = grouped(records, lambda r: r["std"])
    return sum(nanmean([r["final_test_acc"] for r in g]) >= level for g in by_std.values())


@register
class InitSensitivity(Experiment):
    name = "init_sensitivity"
    paper = "Ioffe & Szegedy 2015; Bjorck et al. 2018"
    summary = "With BN, the network trains over a far wider range of initial weight scales."
    setup = (
        "MLP with 8 hidden layers of 50 units, every weight matrix N(0, std²) with std ∈ logspace(−4, 0, 20), "
        "biases 0, Adam lr 1e-3, batch 64, 30 epochs; ReLU plain vs BN, and without BN for sigmoid, tanh and "
        "SELU (the notes' 'activation functions less sensitive to weight scale'; full runs only, --quick runs the "
        "two ReLU arms the claims use). A scale is tolerated when the "
        "seed-mean test accuracy reaches 0.80. Each arm (20 scales × seeds) trains as one batched ensemble."
    )
    paper_numbers = (
        "Ioffe & Szegedy: 'Batch Normalization ... allows us to be less careful about initialization'. Bjorck "
        "et al. 2018 show unnormalized deep networks need carefully scaled initializations while BN networks "
        "train across scales."
    )
    minutes_quick = 0.8
    minutes_full = 1.5
    claims = (
        Claim(
            "count_ratio",
            "BN tolerates ≥ 2× as many initial weight scales as plain",
            paper,
            "scales with seed-mean accuracy ≥ {level:0.80}: BN / plain (ReLU)",
            ">=",
            2.0,
        ),
        Claim(
            "bn_count",
            "BN tolerates ≥ 10 of the 20 weight scales",
            paper,
            "scales with seed-mean accuracy ≥ {level:0.80} (BN, ReLU)",
            ">=",
            10.0,
        ),
    )

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        return [
            {
                "norm": n,
                "activation": a,
                "seeds": seeds,
                "stds": list(STDS),
                "epochs": 30,
                "dataset": dataset,
            }
            for n, a in (ARMS if not quick else ARMS[:2])  # quick: the claims' two arms only
        ]

    def run(
        self, config: dict[str, Any], data: Dataset, *, progress: bool = False
    ) -> dict[str, Any]:
        combos = [(std, s) for std in config["stds"] for s in config["seeds"]]
        models = [
            mlp(
                data.in_features,
                8,
                50,
                data.num_classes,
                activation=config["activation"],
                norm=config["norm"],
                init=std,
                seed=s,
            )
            for std, s in combos
        ]
        # per-layer activation std at init, for the first seed of a few scales
        probe_x = data.x_test[:256]
        init_stats = {
            f"{std:.2e}": activation_stats(m, probe_x)["post_std"]
            for (std, s), m in zip(combos, models)
            if s == config["seeds"][0] and std in STDS[::4]
        }
        cfg = TrainConfig(
            optimizer="adam", lr=1e-3, batch_size=64, epochs=config["epochs"], eval_every=200
        )
        results, _ = train_ensemble(
            models, data, cfg, seeds=[s for _, s in combos], progress=progress
        )
        return {
            "members": [
                {"std": std, "seed": s, "final_test_acc": r.final_test_acc, "diverged": r.diverged}
                for (std, s), r in zip(combos, results)
            ],
            "init_activation_std": init_stats,
        }

    def _counts(self, results: Results, dataset: str) -> dict[tuple[str, str], int]:
        level = accuracy_level(0.80, dataset)
        by = grouped(members(results), lambda r: (r["config"]["norm"], r["config"]["activation"]))
        return {arm: tolerated(records, level) for arm, records in by.items()}

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        counts = self._counts(results, dataset)
        plain, bn = counts[("none", "relu")], counts[("bn", "relu")]
        ratio = bn / plain if plain else (math.inf if bn else float("nan"))
        return [
            self.claim("count_ratio", dataset).check(ratio),
            self.claim("bn_count", dataset).check(bn),
        ]

    def table(self, results: Results) -> str:
        dataset = results[0][0]["dataset"]
        counts = self._counts(results, dataset)
        by = grouped(members(results), lambda r: (r["config"]["norm"], r["config"]["activation"]))
        rows = []
        for (norm, act), records in by.items():
            best = max(
                grouped(records, lambda r: r["std"]).items(),
                key=lambda kv: nanmean([r["final_test_acc"] for r in kv[1]]),
            )
            rows.append(
                [
                    f"{act}{' + BN' if norm == 'bn' else ''}",
                    f"{counts[(norm, act)]} / {len(STDS)}",
                    f"{best[0]:.2e}",
                    f"{nanmean([r['final_test_acc'] for r in best[1]]):.3f}",
                ]
            )
        level = accuracy_level(0.80, dataset)
        return md_table(
            ["model", f"scales tolerated (accuracy ≥ {level:.2f})", "best std", "best accuracy"],
            rows,
        )

    def plot(self, results: Results, out_dir: Path) -> list[Path]:
        from ..plots import new_figure, save

        by = grouped(members(results), lambda r: (r["config"]["norm"], r["config"]["activation"]))
        fig, axes = new_figure(1, 2, width=13)
        for (norm, act), records in by.items():
            per_std = grouped(records, lambda r: r["std"])
            label = f"{act}{' + BN' if norm == 'bn' else ' (plain)'}"
            style = "o-" if act == "relu" else ".--"
            axes[0].plot(
                list(per_std),
                [nanmean([r["final_test_acc"] for r in g]) for g in per_std.values()],
                style,
                label=label,
                lw=2.5 if act == "relu" else 1.2,
            )
        axes[0].axhline(accuracy_level(0.80, results[0][0]["dataset"]), color="gray", ls=":", lw=1)
        axes[0].set_xscale("log")
        axes[0].set(
            title="Test accuracy after 30 epochs vs initial weight std",
            xlabel="weight std (log scale)",
            ylabel="test accuracy (mean over seeds)",
            ylim=(0, 1.02),
        )
        axes[0].legend(fontsize=8)
        for cfg, metrics in results:
            if cfg["activation"] != "relu":
                continue
            for key, stds in metrics["init_activation_std"].items():
                axes[1].plot(
                    range(1, len(stds) + 1),
                    np.maximum(stds, 1e-30),
                    "o-" if cfg["norm"] == "bn" else "x--",
                    label=f"{'BN' if cfg['norm'] == 'bn' else 'plain'}, std {key}",
                )
        axes[1].set_yscale("log")
        axes[1].set(
            title="Activation std per layer at init (ReLU)",
            xlabel="hidden layer",
            ylabel="std of the layer's output (log scale)",
        )
        axes[1].legend(fontsize=7, ncol=2)
        path = out_dir / "init_sensitivity.png"
        save(fig, path)
        return [path]
