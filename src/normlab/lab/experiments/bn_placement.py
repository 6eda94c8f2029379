"""``bn_placement`` — BN before or after the activation (the notes: "before or after activations"). Report only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data import Dataset
from ..ensemble import TrainConfig, train_ensemble
from ..models import mlp
from . import ClaimResult, Experiment, Results, register, t_interval
from ._common import band, fmt, grouped, md_table, members, num

ARMS = tuple((act, place) for act in ("relu", "sigmoid") for place in ("bn", "bn_after"))
SETUP = {"lr": 0.05, "momentum": 0.9, "batch": 64}


@register
class BNPlacement(Experiment):
    name = "bn_placement"
    paper = "Ioffe & Szegedy 2015, §3.2 (BN before the nonlinearity)"
    summary = "Where BN goes — before or after the activation — for ReLU and sigmoid networks. Report only."
    setup = (
        "Taken from the paper (§3.2): BN immediately before the nonlinearity (bias-free Linear → BN → act), "
        "compared with after it (Linear → act → BN), which the paper does not test. Ours: an MLP with 3 "
        "hidden layers of 100 units, He init (ReLU) / PyTorch's default (sigmoid), SGD momentum 0.9, lr "
        "0.05, batch 64, 20 epochs (--quick: 10). No claim: the paper gives no ablation, and practitioners "
        "report both orders work."
    )
    paper_numbers = (
        "Ioffe & Szegedy add BN 'immediately before the nonlinearity', arguing the pre-activation is 'more likely "
        "to have a symmetric, non-sparse distribution'; they give no ablation of the other order."
    )
    minutes_quick = 0.06
    minutes_full = 0.13
    claims = ()

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        return [
            {
                "activation": a,
                "norm": p,
                "seeds": seeds,
                "epochs": 10 if quick else 20,
                "setup": SETUP,
            }
            for a, p in ARMS
        ]

    def run(
        self, config: dict[str, Any], data: Dataset, *, progress: bool = False
    ) -> dict[str, Any]:
        init = "he" if config["activation"] == "relu" else "torch"
        models = [
            mlp(
                data.in_features,
                3,
                100,
                data.num_classes,
                activation=config["activation"],
                norm=config["norm"],
                init=init,
                seed=s,
            )
            for s in config["seeds"]
        ]
        cfg = TrainConfig(
            optimizer="sgd",
            lr=0.05,
            momentum=0.9,
            batch_size=64,
            epochs=config["epochs"],
            eval_every=20,
            eval_samples=2000,
        )
        results, _ = train_ensemble(models, data, cfg, seeds=config["seeds"], progress=progress)
        return {
            "members": [
                {
                    "seed": r.seed,
                    "final_test_acc": r.final_test_acc,
                    "steps": r.steps,
                    "test_acc": r.test_acc,
                    "diverged": r.diverged,
                }
                for r in results
            ]
        }

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        return []

    def _groups(self, results: Results) -> dict[tuple[str, str], list[dict[str, Any]]]:
        return grouped(members(results), lambda r: (r["config"]["activation"], r["config"]["norm"]))

    def table(self, results: Results) -> str:
        groups = self._groups(results)
        rows = [
            [act, "before" if norm == "bn" else "after", fmt([r["final_test_acc"] for r in recs])]
            for (act, norm), recs in groups.items()
        ]
        diffs = []
        for act in ("relu", "sigmoid"):
            before, after = groups.get((act, "bn"), []), groups.get((act, "bn_after"), [])
            d = [b["final_test_acc"] - a["final_test_acc"] for b, a in zip(before, after)]
            if d:
                est, lo, hi = t_interval(d)
                diffs.append(f"{act}: {num(est)} [{num(lo)}, {num(hi)}]")
        return (
            md_table(["activation", "BN placement", "final test accuracy"], rows)
            + "\n\nBefore − after, paired by seed, mean [95 % t interval]: "
            + "; ".join(diffs)
            + "."
        )

    def plot(self, results: Results, out_dir: Path) -> list[Path]:
        from ..plots import new_figure, save

        fig, axes = new_figure(1, 2, width=13, sharey=True)
        for (act, norm), recs in self._groups(results).items():
            ax = axes[0 if act == "relu" else 1]
            band(
                ax,
                recs[0]["steps"],
                [r["test_acc"] for r in recs],
                label=f"BN {'before' if norm == 'bn' else 'after'} {act}",
            )
        for ax, act in zip(axes, ("ReLU", "sigmoid")):
            ax.set(
                title=f"{act}: test accuracy (every seed, and the mean)",
                xlabel="training step",
                ylabel="test accuracy (axis from 0.5)",
                ylim=(0.5, 1.0),
            )
            ax.legend()
        path = out_dir / "bn_placement.png"
        save(fig, path)
        return [path]
