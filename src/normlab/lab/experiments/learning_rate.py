"""``learning_rate`` — "BN allows higher learning rates" (Ioffe & Szegedy 2015, §3.3)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..data import Dataset
from ..ensemble import TrainConfig, train_ensemble
from ..models import mlp
from . import Claim, ClaimResult, Experiment, Results, accuracy_level, register
from ._common import fmt, grouped, md_table, members, nanmean

LRS = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def max_stable_lr(records: list[dict[str, Any]], level: float) -> float:
    """Largest lr at which every seed stayed finite and reached ``level`` test accuracy (0 if none)."""
    stable = [
        lr
        for lr, group in grouped(records, lambda r: r["lr"]).items()
        if all(not r["diverged"] and (r["final_test_acc"] or 0.0) >= level for r in group)
    ]
    return max(stable, default=0.0)


@register
class LearningRate(Experiment):
    name = "learning_rate"
    paper = "Ioffe & Szegedy 2015, §3.3"
    summary = "Batch normalization makes training stable at much higher learning rates."
    setup = (
        "MLP with 8 hidden layers of 100 ReLU units, He init, plain SGD (no momentum), batch 64, 20 epochs, "
        f"lr ∈ {list(LRS)}; plain (Linear with bias → ReLU) vs BN (bias-free Linear → BN → ReLU). "
        "A run is stable when its loss stays finite and below 10× its first loss. All learning rates and "
        "seeds of one model train as one batched ensemble."
    )
    paper_numbers = (
        "Ioffe & Szegedy trained BN-Inception with a 5× and 30× higher initial learning rate (BN-x5, BN-x30) "
        "than Inception; BN-x5 reached Inception's accuracy in 14× fewer steps, while the baseline "
        "diverged at such rates."
    )
    minutes_quick = 0.3
    minutes_full = 0.6
    claims = (
        Claim(
            "max_lr_ratio",
            "BN's largest stable learning rate is ≥ 10× plain's",
            paper,
            "max stable lr (BN) / max stable lr (plain); stable = every seed finite and ≥ {level:0.80} test accuracy",
            ">=",
            10.0,
        ),
    )

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        return [
            {"norm": norm, "seeds": seeds, "lrs": list(LRS), "epochs": 20}
            for norm in ("none", "bn")
        ]

    def run(
        self, config: dict[str, Any], data: Dataset, *, progress: bool = False
    ) -> dict[str, Any]:
        combos = [(lr, s) for lr in config["lrs"] for s in config["seeds"]]
        models = [
            mlp(data.in_features, 8, 100, data.num_classes, norm=config["norm"], init="he", seed=s)
            for _, s in combos
        ]
        cfg = TrainConfig(
            optimizer="sgd",
            lr=[lr for lr, _ in combos],
            batch_size=64,
            epochs=config["epochs"],
            eval_every=100,
        )
        results, _ = train_ensemble(
            models, data, cfg, seeds=[s for _, s in combos], progress=progress
        )
        return {
            "members": [
                {
                    "lr": lr,
                    "seed": s,
                    "final_test_acc": r.final_test_acc,
                    "diverged": r.diverged,
                    "diverged_step": r.diverged_step,
                }
                for (lr, s), r in zip(combos, results)
            ]
        }

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        by = grouped(members(results), lambda r: r["config"]["norm"])
        level = accuracy_level(0.80, dataset)
        plain, bn = max_stable_lr(by["none"], level), max_stable_lr(by["bn"], level)
        ratio = bn / plain if plain > 0 else (math.inf if bn > 0 else float("nan"))
        return [self.claim("max_lr_ratio", dataset).check(ratio)]

    def table(self, results: Results) -> str:
        by = grouped(members(results), lambda r: (r["config"]["norm"], r["lr"]))
        rows = []
        for lr in LRS:
            row = [f"{lr:g}"]
            for norm in ("none", "bn"):
                group = by.get((norm, lr), [])
                row.append(fmt([r["final_test_acc"] for r in group]))
            rows.append(row)
        return md_table(["lr", "plain: final test accuracy", "BN: final test accuracy"], rows)

    def plot(self, results: Results, out_dir: Path) -> list[Path]:

        from ..plots import new_figure, save

        by = grouped(members(results), lambda r: (r["config"]["norm"], r["lr"]))
        fig, (ax,) = new_figure(1, 1, width=7)
        for norm, label, color in (("none", "plain", "tab:red"), ("bn", "BN", "tab:blue")):
            # seed mean over the runs that did not diverge (divergences are marked separately)
            accs = [
                nanmean([r["final_test_acc"] for r in by.get((norm, lr), []) if not r["diverged"]])
                for lr in LRS
            ]
            ax.plot(LRS, accs, "o-", color=color, label=label)
            for lr in LRS:
                if any(r["diverged"] for r in by.get((norm, lr), [])):
                    ax.plot([lr], [0.02], "x", color=color, markersize=10, mew=2)
        ax.set_xscale("log")
        ax.set(
            title="Final test accuracy vs learning rate (× = a seed diverged)",
            xlabel="learning rate (log scale)",
            ylabel="test accuracy (mean over seeds)",
            ylim=(0, 1.02),
        )
        ax.legend()
        path = out_dir / "learning_rate.png"
        save(fig, path)
        return [path]
