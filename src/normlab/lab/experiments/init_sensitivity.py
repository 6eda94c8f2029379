"""``init_sensitivity`` — "BN reduces sensitivity to initialization" (Ioffe & Szegedy 2015; Bjorck et al. 2018)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..data import Dataset
from ..ensemble import TrainConfig, train_ensemble
from ..models import mlp
from . import Claim, ClaimResult, Experiment, Results, accuracy_level, register
from ._common import activation_stats, grouped, md_table, members, num

__all__ = ["InitSensitivity", "tolerated"]

STDS = tuple(float(s) for s in np.logspace(-4, 0, 20))
STEPS, DEPTH, WIDTH, BATCH, LR, MOMENTUM = 600, 8, 50, 64, 0.01, 0.9
SETUP = {"depth": DEPTH, "width": WIDTH, "batch": BATCH, "lr": LR, "momentum": MOMENTUM}
ARMS = (("none", "relu"), ("bn", "relu"), ("none", "sigmoid"), ("none", "tanh"), ("none", "selu"))


def accuracy_matrix(records: list[dict[str, Any]], seeds: list[int], chance: float) -> np.ndarray:
    """``(seeds, scales)`` final test accuracy; a diverged run scores ``chance``."""
    by = {(r["seed"], r["std"]): r for r in records}
    return np.array(
        [
            [chance if by[(s, std)]["diverged"] else by[(s, std)]["final_test_acc"] for std in STDS]
            for s in seeds
        ]
    )


def tolerated(acc: np.ndarray, level: float) -> int:
    """Number of weight scales (columns) whose mean accuracy over the seeds (rows) reaches ``level``."""
    return int((acc.mean(axis=0) >= level).sum())


@register
class InitSensitivity(Experiment):
    name = "init_sensitivity"
    paper = "Ioffe & Szegedy 2015, §3.3; Bjorck et al. 2018"
    summary = "With BN, the network trains over a far wider range of initial weight scales."
    setup = (
        "Taken from the papers: SGD with momentum (as both papers trained), weights drawn at very "
        "different scales, plain vs BN. Changed: an MLP with 8 hidden layers of 50 ReLU units, every "
        "weight matrix N(0, std²) with std ∈ logspace(−4, 0, 20) and zero biases; SGD momentum "
        f"{MOMENTUM}, lr {LR}, batch {BATCH}, {STEPS} steps (30 epochs on digits) for every dataset. A "
        "scale is tolerated when the seed-mean test accuracy reaches 0.80 (0.70 on Fashion-MNIST; a diverged run scores "
        "chance). Full runs add sigmoid, tanh and SELU networks without BN (the notes' 'activation "
        "functions less sensitive to weight scale'; not a claim). Each arm (20 scales × seeds) trains as "
        "one batched ensemble."
    )
    paper_numbers = (
        "Ioffe & Szegedy (§3.3): BN 'allows us to be less careful about initialization' — no number. "
        "Bjorck et al. 2018: unnormalized deep networks need carefully scaled initializations, while BN "
        "networks train across scales."
    )
    minutes_quick = 0.9
    minutes_full = 4.3
    claims = (
        Claim(
            "count_ratio",
            "BN tolerates ≥ 2× as many initial weight scales as plain",
            paper,
            "scales with seed-mean accuracy ≥ {level:0.80}: BN / plain (ReLU)",
            ">=",
            2.0,
            "§3.3: 'less careful about initialization'; no count",
        ),
        Claim(
            "bn_count",
            "BN tolerates ≥ 10 of the 20 weight scales",
            paper,
            "scales with seed-mean accuracy ≥ {level:0.80} (BN, ReLU)",
            ">=",
            10.0,
            "§3.3: no count",
        ),
    )

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        return [
            {
                "norm": n,
                "activation": a,
                "seeds": seeds,
                "stds": list(STDS),
                "steps": STEPS,
                "dataset": dataset,
                "setup": SETUP,
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
                DEPTH,
                WIDTH,
                data.num_classes,
                activation=config["activation"],
                norm=config["norm"],
                init=std,
                seed=s,
            )
            for std, s in combos
        ]
        probe_x = data.x_test[:256]  # per-layer activation std at init: first seed, every 4th scale
        init_stats = {
            f"{std:.2e}": activation_stats(m, probe_x)["post_std"]
            for (std, s), m in zip(combos, models)
            if s == config["seeds"][0] and std in STDS[::4]
        }
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
                {"std": std, "seed": s, "final_test_acc": r.final_test_acc, "diverged": r.diverged}
                for (std, s), r in zip(combos, results)
            ],
            "init_activation_std": init_stats,
            "num_classes": data.num_classes,
        }

    def _acc(self, results: Results) -> dict[tuple[str, str], np.ndarray]:
        seeds = list(results[0][0]["seeds"])
        chance = 1.0 / results[0][1]["num_classes"]
        by = grouped(members(results), lambda r: (r["config"]["norm"], r["config"]["activation"]))
        return {arm: accuracy_matrix(recs, seeds, chance) for arm, recs in by.items()}

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        level = accuracy_level(0.80, dataset)
        acc = self._acc(results)
        plain, bn = acc[("none", "relu")], acc[("bn", "relu")]

        def ratio(idx: np.ndarray) -> float:
            p, b = tolerated(plain[idx], level), tolerated(bn[idx], level)
            return b / p if p else (float("inf") if b else float("nan"))

        n = plain.shape[0]
        note = "plain tolerates no scale (ratio ∞)" if not tolerated(plain, level) else ""
        return [
            self.claim("count_ratio", dataset).check_bootstrap(n, ratio, note=note),
            self.claim("bn_count", dataset).check_bootstrap(
                n, lambda idx: float(tolerated(bn[idx], level))
            ),
        ]

    def table(self, results: Results) -> str:
        dataset = results[0][0]["dataset"]
        level = accuracy_level(0.80, dataset)
        rows = []
        for (norm, act), acc in self._acc(results).items():
            mean = acc.mean(axis=0)
            ok = np.flatnonzero(mean >= level)
            rows.append(
                [
                    f"{act}{' + BN' if norm == 'bn' else ''}",
                    f"{len(ok)} / {len(STDS)}",
                    f"{num(STDS[ok[0]])} … {num(STDS[ok[-1]])}" if len(ok) else "none",
                    f"{num(STDS[int(mean.argmax())])}: {num(float(mean.max()))}",
                ]
            )
        return md_table(
            [
                "model",
                f"scales tolerated (seed-mean accuracy ≥ {level:.2f})",
                "tolerated stds",
                "best std: seed-mean accuracy",
            ],
            rows,
        )

    def plot(self, results: Results, out_dir: Path) -> list[Path]:
        from ..plots import new_figure, save

        dataset = results[0][0]["dataset"]
        fig, axes = new_figure(1, 2, width=13)
        rng = np.random.default_rng(0)
        for i, ((norm, act), acc) in enumerate(self._acc(results).items()):
            label = f"{act}{' + BN' if norm == 'bn' else ' (plain)'}"
            color = f"C{i}"
            main = act == "relu"
            axes[0].plot(
                STDS,
                acc.mean(axis=0),
                "o-" if main else ".--",
                color=color,
                label=label,
                lw=2.0 if main else 1.0,
            )
            if main:
                for row in acc:
                    axes[0].scatter(
                        np.asarray(STDS) * 10 ** rng.uniform(-0.04, 0.04, len(STDS)),
                        row,
                        s=8,
                        color=color,
                        alpha=0.4,
                    )
        axes[0].axhline(accuracy_level(0.80, dataset), color="gray", ls=":", lw=1)
        axes[0].set_xscale("log")
        axes[0].set(
            title="Final test accuracy vs initial weight std (dots: seeds)",
            xlabel="weight std (log scale)",
            ylabel="test accuracy (seed mean: line)",
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
            title="Activation std per layer at init (ReLU, first seed)",
            xlabel="hidden layer",
            ylabel="std of the layer's output (log scale)",
        )
        axes[1].legend(fontsize=7, ncol=2)
        path = out_dir / "init_sensitivity.png"
        save(fig, path)
        return [path]
