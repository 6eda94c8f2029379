"""``input_normalization`` — the notes' first topic and its limit: standardizing inputs fixes the input layer only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ... import nn as nlnn
from ...preprocessing import Standardizer
from ..data import Dataset, distort
from ..ensemble import TrainConfig, train_ensemble
from ..models import mlp
from . import Claim, ClaimResult, Experiment, Results, as_floats, register
from ._common import band, fmt, grouped, md_table, members
from .convergence import PROBE_SAMPLES, quantile_drift, quantile_probe

ARMS = ("clean", "raw", "standardizer", "bn")
LABELS = {
    "clean": "clean inputs (reference)",
    "raw": "distorted, raw",
    "standardizer": "distorted + Standardizer",
    "bn": "distorted + BN (input and hidden layers)",
}


def _arm_data(data: Dataset, arm: str) -> Dataset:
    if arm == "clean":
        return data
    xtr, xte = distort(data.x_train, seed=0), distort(data.x_test, seed=0)
    if arm == "standardizer":
        std = Standardizer().fit(xtr)
        xtr, xte = std(xtr), std(xte)
    return Dataset(
        data.name,
        xtr,
        data.y_train,
        xte,
        data.y_test,
        data.image_shape,
        data.num_classes,
        f"{data.checksum}-{arm}",
    )


@register
class InputNormalization(Experiment):
    name = "input_normalization"
    paper = "LeCun et al. 1998 (Efficient BackProp); Ioffe & Szegedy 2015"
    summary = (
        "Standardizing badly scaled inputs recovers the clean accuracy, but the hidden layers' input "
        "distributions still drift during training; BN stabilizes those too."
    )
    setup = (
        "Inputs distorted per feature by a scale 10^U(−2, 2) and an offset (fixed, train and test alike). MLP "
        "64-100-100-100-10 with sigmoids, PyTorch default init, SGD lr 0.5, batch 60, 5000 steps (the "
        "`convergence` setup), evaluation every 20 steps. Arms: clean inputs; distorted raw; distorted + "
        "Standardizer (fitted on the training set); distorted + BN (a BatchNorm on the inputs and BN in every "
        "hidden layer). Hidden-layer drift: the `convergence` quantile drift of the last hidden layer's sigmoid "
        "input (network as it trains)."
    )
    paper_numbers = (
        "LeCun et al. 1998 recommend inputs with zero mean and unit variance per feature; Ioffe & Szegedy 2015 "
        "call BN 'preprocessing at every layer' because whitening only the inputs leaves internal "
        "covariate shift."
    )
    minutes_quick = 0.4
    minutes_full = 0.6
    claims = (
        Claim(
            "standardizer_recovery",
            "The Standardizer recovers ≥ 95% of the clean accuracy",
            paper,
            "accuracy(distorted + Standardizer) / accuracy(clean)",
            ">=",
            0.95,
        ),
        Claim(
            "raw_loss",
            "Raw distorted inputs lose ≥ 0.20 accuracy at the same lr",
            paper,
            "accuracy(clean) − accuracy(distorted raw)",
            ">=",
            0.20,
        ),
        Claim(
            "hidden_drift",
            "With the Standardizer alone, hidden-layer drift is ≥ 2× BN's",
            paper,
            "quantile drift (Standardizer) / quantile drift (BN)",
            ">=",
            2.0,
        ),
    )

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        return [{"arm": arm, "seeds": seeds, "steps": 5000} for arm in ARMS]

    def run(
        self, config: dict[str, Any], data: Dataset, *, progress: bool = False
    ) -> dict[str, Any]:
        arm = config["arm"]
        arm_data = _arm_data(data, arm)
        models = []
        for s in config["seeds"]:
            m = mlp(
                data.in_features,
                3,
                100,
                data.num_classes,
                activation="sigmoid",
                norm="bn" if arm == "bn" else "none",
                seed=s,
            )
            if arm == "bn":
                m = nn.Sequential(nlnn.BatchNorm1d(data.in_features), *m)
            models.append(m)
        cfg = TrainConfig(
            optimizer="sgd", lr=0.5, batch_size=60, steps=config["steps"], eval_every=20
        )
        results, _ = train_ensemble(
            models,
            arm_data,
            cfg,
            seeds=config["seeds"],
            probe=quantile_probe(arm_data.x_test[:PROBE_SAMPLES]),
            progress=progress,
        )
        return {
            "members": [
                {
                    "seed": r.seed,
                    "final_test_acc": r.final_test_acc,
                    "diverged": r.diverged,
                    "steps": r.steps,
                    "test_acc": r.test_acc,
                    "drift": quantile_drift(r.probes["quantiles"]) if not r.diverged else None,
                }
                for r in results
            ]
        }

    def _by_arm(self, results: Results) -> dict[str, list[dict[str, Any]]]:
        return grouped(members(results), lambda r: r["config"]["arm"])

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        by = self._by_arm(results)
        acc = {arm: as_floats([r["final_test_acc"] for r in recs]) for arm, recs in by.items()}
        recovery = [s / c for s, c in zip(acc["standardizer"], acc["clean"])]
        loss = [c - r for c, r in zip(acc["clean"], acc["raw"])]
        drift = [s["drift"] / b["drift"] for s, b in zip(by["standardizer"], by["bn"])]
        return [
            self.claim("standardizer_recovery").check(recovery),
            self.claim("raw_loss").check(loss),
            self.claim("hidden_drift").check(drift),
        ]

    def table(self, results: Results) -> str:
        rows = [
            [
                LABELS[arm],
                fmt([r["final_test_acc"] for r in recs]),
                fmt([r["drift"] for r in recs], 4),
            ]
            for arm, recs in self._by_arm(results).items()
        ]
        return md_table(["inputs", "final test accuracy", "hidden-layer quantile drift"], rows)

    def plot(self, results: Results, out_dir: Path) -> list[Path]:
        from ..plots import new_figure, save

        fig, (ax,) = new_figure(1, 1, width=8)
        for arm, recs in self._by_arm(results).items():
            band(ax, recs[0]["steps"], [r["test_acc"] for r in recs], label=LABELS[arm])
        ax.set(
            title="Test accuracy while training (mean ± std over seeds)",
            xlabel="training step",
            ylabel="test accuracy",
            ylim=(0, 1.02),
        )
        ax.legend(fontsize=8)
        path = out_dir / "input_normalization.png"
        save(fig, path)
        return [path]
