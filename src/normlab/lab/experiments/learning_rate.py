"""``learning_rate`` — "BN allows higher learning rates" (Ioffe & Szegedy 2015, §3.3 and §4.2.2)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from ..data import Dataset
from ..ensemble import TrainConfig, train_ensemble
from ..models import mlp
from . import Claim, ClaimResult, Experiment, Results, accuracy_level, register
from ._common import fmt, grouped, md_table, members, num

__all__ = ["LRS", "LearningRate", "largest_trainable", "train_rate"]

LRS = tuple(0.005 * 2**i for i in range(13))  # 0.005 … 20.48, ×2 apart
STEPS, DEPTH, WIDTH, BATCH = 400, 8, 100, 64
RATE = 0.8  # the fraction of seeds that must train at a learning rate
ARMS = ("none", "bn")
LABELS = {"none": "plain", "bn": "BN"}
SETUP = {"depth": DEPTH, "width": WIDTH, "batch": BATCH}


def trains(record: dict[str, Any], level: float) -> bool:
    """A run trains when it stays finite (no divergence) and reaches ``level`` test accuracy."""
    return not record["diverged"] and (record["final_test_acc"] or 0.0) >= level


def train_rate(success: np.ndarray) -> np.ndarray:
    """Per learning rate, the fraction of seeds that train: ``success`` ``(seeds, lrs)`` → ``(lrs,)``."""
    return np.asarray(success, dtype=float).mean(axis=0)


def largest_trainable(success: np.ndarray, lrs: Sequence[float], rate: float = RATE) -> float:
    """The largest learning rate at which at least ``rate`` of the seeds train (0 if none)."""
    ok = [lr for lr, r in zip(lrs, train_rate(success)) if r >= rate - 1e-12]
    return max(ok, default=0.0)


@register
class LearningRate(Experiment):
    name = "learning_rate"
    paper = "Ioffe & Szegedy 2015, §3.3 and §4.2.2"
    summary = "Batch normalization makes training stable at much higher learning rates."
    setup = (
        "Taken from the paper: plain vs BN (bias-free Linear → BN → ReLU) at increasing learning rates, "
        "plain SGD. Changed: an MLP with 8 hidden layers of 100 ReLU units (He init), not Inception; "
        f"batch {BATCH}, {STEPS} steps (20 epochs on digits) for every dataset; a ×2 grid of learning "
        f"rates {num(LRS[0])} … {num(LRS[-1])}. A run *trains* when its loss stays finite and below 10× its "
        "first loss and it reaches the accuracy level (0.80 on digits, 0.70 on Fashion-MNIST); at each learning rate the rate of seeds that "
        f"train is shown with its Wilson interval. The largest trainable learning rate is the largest at "
        f"which ≥ {RATE:.0%} of the seeds train. All learning rates and seeds of one model train as one "
        "batched ensemble; a seed keeps its data order at every learning rate (paired)."
    )
    paper_numbers = (
        "Ioffe & Szegedy (§4.2.2): BN-Inception trained at 5× (BN-x5) and 30× (BN-x30) Inception's initial "
        "learning rate (0.0015), while 'the same learning rate increase with original Inception caused the "
        "model parameters to reach machine infinity' at 5×: BN's largest trainable rate is > 30/5 = 6× the "
        "baseline's."
    )
    minutes_quick = 1.3
    minutes_full = 2.3
    claims = (
        Claim(
            "max_lr_ratio",
            "BN's largest trainable learning rate is > 6× plain's",
            paper,
            f"largest lr at which ≥ {RATE:.0%} of seeds train: BN / plain "
            "(train = finite and ≥ {level:0.80} test accuracy)",
            ">",
            6.0,
            "§4.2.2: BN-x30 trained at 30× Inception's rate; Inception diverged at 5× (ratio > 6)",
            threshold_origin="paper",
        ),
    )

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        return [
            {
                "norm": norm,
                "seeds": seeds,
                "lrs": list(LRS),
                "steps": STEPS,
                "dataset": dataset,
                "setup": SETUP,
            }
            for norm in ARMS
        ]

    def run(
        self, config: dict[str, Any], data: Dataset, *, progress: bool = False
    ) -> dict[str, Any]:
        combos = [(lr, s) for lr in config["lrs"] for s in config["seeds"]]
        models = [
            mlp(
                data.in_features,
                DEPTH,
                WIDTH,
                data.num_classes,
                norm=config["norm"],
                init="he",
                seed=s,
            )
            for _, s in combos
        ]
        cfg = TrainConfig(
            optimizer="sgd",
            lr=[lr for lr, _ in combos],
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
                    "lr": lr,
                    "seed": s,
                    "final_test_acc": r.final_test_acc,
                    "diverged": r.diverged,
                    "diverged_step": r.diverged_step,
                }
                for (lr, s), r in zip(combos, results)
            ]
        }

    @staticmethod
    def _success(results: Results, level: float) -> tuple[list[float], dict[str, np.ndarray]]:
        """``(lrs, {arm: (seeds, lrs) bool})``."""
        lrs = [float(v) for v in results[0][0]["lrs"]]
        seeds = list(results[0][0]["seeds"])
        out = {}
        for norm, recs in grouped(members(results), lambda r: r["config"]["norm"]).items():
            by = {(r["seed"], r["lr"]): trains(r, level) for r in recs}
            out[norm] = np.array([[by[(s, lr)] for lr in lrs] for s in seeds])
        return lrs, out

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        lrs, success = self._success(results, accuracy_level(0.80, dataset))
        plain, bn = success["none"], success["bn"]

        def ratio(idx: np.ndarray) -> float:
            p, b = largest_trainable(plain[idx], lrs), largest_trainable(bn[idx], lrs)
            return b / p if p > 0 else (float("inf") if b > 0 else float("nan"))

        top_plain = largest_trainable(plain, lrs) == lrs[-1]
        top_bn = largest_trainable(bn, lrs) == lrs[-1]
        bound: Any = (
            "lower" if top_bn and not top_plain else "upper" if top_plain and not top_bn else None
        )
        note = (
            "BN trains at the grid's largest rate, so the ratio is a lower bound"
            if bound == "lower"
            else "plain trains at the grid's largest rate, so the ratio is an upper bound"
            if bound == "upper"
            else ""
        )
        if not largest_trainable(plain, lrs):
            note = "plain trains at no rate of the grid"
        return [
            self.claim("max_lr_ratio", dataset).check_bootstrap(
                plain.shape[0], ratio, bound=bound, note=note
            )
        ]

    def table(self, results: Results) -> str:
        level = accuracy_level(0.80, results[0][0]["dataset"])
        lrs, success = self._success(results, level)
        by = grouped(members(results), lambda r: (r["config"]["norm"], r["lr"]))
        rows = []
        for j, lr in enumerate(lrs):
            row = [num(lr)]
            for norm in ARMS:
                s = success[norm][:, j]
                ci = stats.binomtest(int(s.sum()), len(s)).proportion_ci(0.95, method="wilson")
                trained = [r["final_test_acc"] for r in by[(norm, lr)] if not r["diverged"]]
                row += [
                    f"{int(s.sum())}/{len(s)} [{num(ci.low)}, {num(ci.high)}]",
                    fmt(trained) if trained else "all diverged",
                ]
            rows.append(row)
        head = ["lr"]
        for norm in ARMS:
            head += [
                f"{LABELS[norm]}: seeds that train [95 % CI]",
                f"{LABELS[norm]}: accuracy (finite runs)",
            ]
        largest = ", ".join(f"{LABELS[n]} {num(largest_trainable(success[n], lrs))}" for n in ARMS)
        return md_table(head, rows) + (
            f"\n\nTrain = finite and ≥ {level:.2f} test accuracy. Largest lr at which ≥ {RATE:.0%} "
            f"of the seeds train: {largest}."
        )

    def plot(self, results: Results, out_dir: Path) -> list[Path]:
        from ..plots import new_figure, save

        level = accuracy_level(0.80, results[0][0]["dataset"])
        lrs, success = self._success(results, level)
        by = grouped(members(results), lambda r: (r["config"]["norm"], r["lr"]))
        fig, axes = new_figure(1, 2, width=13, sharey=True)
        rng = np.random.default_rng(0)
        for norm, color in (("none", "tab:red"), ("bn", "tab:blue")):
            rate = train_rate(success[norm])
            ci = [
                stats.binomtest(int(s.sum()), len(s)).proportion_ci(0.95, method="wilson")
                for s in success[norm].T
            ]
            axes[0].errorbar(
                lrs,
                rate,
                yerr=[rate - [c.low for c in ci], [c.high for c in ci] - rate],
                fmt="o-",
                color=color,
                capsize=3,
                label=LABELS[norm],
            )
            for lr in lrs:
                recs = by[(norm, lr)]
                acc = [0.0 if r["diverged"] else r["final_test_acc"] for r in recs]
                jitter = lr * 2 ** rng.uniform(-0.15, 0.15, len(acc))
                axes[1].scatter(
                    jitter,
                    acc,
                    s=12,
                    color=color,
                    alpha=0.6,
                    label=LABELS[norm] if lr == lrs[0] else None,
                )
        axes[0].axhline(RATE, color="gray", ls=":", lw=1)
        axes[0].set(
            title=f"Seeds that train (finite, ≥ {level:.2f} accuracy), Wilson 95 % CI",
            xlabel="learning rate (log scale)",
            ylabel="fraction of seeds / accuracy",
        )
        axes[1].axhline(level, color="gray", ls=":", lw=1)
        axes[1].set(
            title="Final test accuracy per seed (diverged runs at 0)",
            xlabel="learning rate (log scale)",
        )
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.03, 1.03)
            ax.legend()
        path = out_dir / "learning_rate.png"
        save(fig, path)
        return [path]
