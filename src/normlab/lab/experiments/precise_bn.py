"""``precise_bn`` — Wu & Johnson 2021: EMA running statistics lag the population's; re-estimating them
("precise BN") closes most of the accuracy they cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...nn.utils import recalibrate_batchnorm
from ..data import Dataset
from ..ensemble import Ensemble, TrainConfig, train_ensemble
from ..models import mlp
from . import Claim, ClaimResult, Experiment, Results, as_floats, register
from ._common import band, fmt, md_table, members

__all__ = ["PreciseBN", "statistics_probe"]

BATCH, STEPS, EVERY, LR, MOMENTUM, EMA = 8, 300, 50, 0.05, 0.9, 0.01
PRECISE_BATCHES, PRECISE_SIZE = 10, 32
SETUP = {
    "batch": BATCH,
    "every": EVERY,
    "lr": LR,
    "momentum": MOMENTUM,
    "ema": EMA,
    "precise": [PRECISE_BATCHES, PRECISE_SIZE],
}
KINDS = ("ema", "precise", "population")
LABELS = {
    "ema": "EMA running statistics",
    "precise": f"precise BN ({PRECISE_BATCHES}×{PRECISE_SIZE} samples)",
    "population": "population statistics (whole training set)",
}


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def statistics_probe(data: Dataset, seeds: list[int]) -> Any:
    """A ``train_ensemble`` probe: per member, its eval-mode test accuracy with the EMA statistics, with
    precise-BN statistics (:func:`normlab.nn.utils.recalibrate_batchnorm` over a few random training
    batches, drawn with the member's seed and the step) and with the population statistics (the whole
    training set as one batch). The trained members are copies: the run is not changed."""

    def probe(step: int, ens: Ensemble) -> list[dict[str, Any]]:
        out = []
        for seed, model in zip(seeds, ens.to_models()):
            row = {"ema": _accuracy(model, data.x_test, data.y_test)}
            g = torch.Generator().manual_seed(1_000 * int(seed) + step)
            batches = [
                data.x_train[torch.randint(0, len(data.y_train), (PRECISE_SIZE,), generator=g)]
                for _ in range(PRECISE_BATCHES)
            ]
            recalibrate_batchnorm(model, batches, num_batches=PRECISE_BATCHES, progress=False)
            row["precise"] = _accuracy(model, data.x_test, data.y_test)
            recalibrate_batchnorm(model, [data.x_train], num_batches=1, progress=False)
            row["population"] = _accuracy(model, data.x_test, data.y_test)
            out.append(row)
        return out

    return probe


@register
class PreciseBN(Experiment):
    name = "precise_bn"
    paper = "Wu & Johnson 2021, 'Rethinking Batch in BatchNorm', §3"
    summary = (
        "Where the EMA of batch statistics is inaccurate — small batches, a slow average, a model that "
        "changes fast — it costs eval accuracy; re-estimated ('precise') statistics recover most of it."
    )
    setup = (
        "Taken from the paper (§3): compare eval-mode accuracy with the EMA running statistics, with "
        "population statistics, and with PreciseBN's statistics re-estimated from a modest sample, "
        "under the conditions where the EMA is inaccurate. Ours: an MLP with 3 hidden layers of 100 ReLU "
        f"units + BN (He init), SGD momentum {MOMENTUM}, lr {LR}, batch {BATCH}, EMA momentum {EMA} in "
        f"torch's convention (Wu & Johnson's λ = {1 - EMA}), {STEPS} steps (early in training: the "
        f"model still changes fast). Every {EVERY} steps, on copies of the members: test accuracy with "
        "the EMA; after `normlab.nn.utils.recalibrate_batchnorm` over "
        f"{PRECISE_BATCHES} random batches of {PRECISE_SIZE} training samples (precise BN); and with the "
        "population statistics (the whole training set as one batch)."
    )
    paper_numbers = (
        "Wu & Johnson 2021 (§3, ImageNet): the EMA statistics lag the model when it changes fast and "
        "the momentum is high, and give lower and noisier validation accuracy than population "
        "statistics; PreciseBN's estimate from ~10³–10⁴ samples matches the population's."
    )
    minutes_quick = 0.04
    minutes_full = 0.04
    claims = (
        Claim(
            "ema_costs_accuracy",
            "Under these conditions the EMA statistics give lower accuracy than the population's",
            paper,
            "accuracy(population statistics) − accuracy(EMA), end of training, paired by seed",
            ">",
            0.0,
            "§3: EMA statistics are inaccurate under a high momentum and a fast-changing model, and "
            "cost validation accuracy",
            threshold_origin="paper",
        ),
        Claim(
            "precise_closes_gap",
            "Precise BN recovers ≥ 50 % of the accuracy the EMA costs",
            paper,
            "mean(precise − EMA) / mean(population − EMA), end of training, paired by seed",
            ">=",
            0.5,
            "§3: PreciseBN's estimate from ~10³–10⁴ samples is as good as the population's",
        ),
    )

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        return [{"seeds": seeds, "steps": STEPS, "setup": SETUP}]

    def run(
        self, config: dict[str, Any], data: Dataset, *, progress: bool = False
    ) -> dict[str, Any]:
        seeds = config["seeds"]
        models = [
            mlp(
                data.in_features,
                3,
                100,
                data.num_classes,
                norm="bn",
                init="he",
                seed=s,
                norm_kwargs={"momentum": EMA},
            )
            for s in seeds
        ]
        cfg = TrainConfig(
            optimizer="sgd",
            lr=LR,
            momentum=MOMENTUM,
            batch_size=BATCH,
            steps=config["steps"],
            eval_every=None,
        )
        results, _ = train_ensemble(
            models,
            data,
            cfg,
            seeds=seeds,
            probe=statistics_probe(data, seeds),
            probe_every=EVERY,
            progress=progress,
        )
        return {
            "members": [
                {
                    "seed": r.seed,
                    "diverged": r.diverged,
                    "steps": r.probe_steps,
                    **{kind: r.probes.get(kind, []) for kind in KINDS},
                }
                for r in results
            ]
        }

    @staticmethod
    def _final(results: Results) -> dict[str, list[float]]:
        recs = members(results)
        return {
            kind: as_floats([None if r["diverged"] or not r[kind] else r[kind][-1] for r in recs])
            for kind in KINDS
        }

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        final = {k: np.asarray(v) for k, v in self._final(results).items()}
        cost = final["population"] - final["ema"]
        gain = final["precise"] - final["ema"]

        def recovered(idx: np.ndarray) -> float:
            denominator = float(cost[idx].mean())
            return float(gain[idx].mean()) / denominator if denominator > 0 else float("nan")

        closes = (
            self.claim("precise_closes_gap").check_bootstrap(
                len(cost), recovered, values=list(gain)
            )
            if np.isfinite(cost).all() and np.isfinite(gain).all()
            else self.claim("precise_closes_gap").check([None] * len(cost), note="a seed diverged")
        )
        return [self.claim("ema_costs_accuracy").check(cost.tolist()), closes]

    def table(self, results: Results) -> str:
        final = self._final(results)
        rows = [[LABELS[k], fmt(final[k])] for k in KINDS]
        cost = [p - e for p, e in zip(final["population"], final["ema"])]
        gain = [p - e for p, e in zip(final["precise"], final["ema"])]
        return md_table(["statistics", "eval test accuracy, end of training"], rows) + (
            f"\n\nPer seed: population − EMA {fmt(cost)}; precise − EMA {fmt(gain)}."
        )

    def plot(self, results: Results, out_dir: Path) -> list[Path]:
        from ..plots import new_figure, save, seed_dots

        recs = members(results)
        final = self._final(results)
        fig, axes = new_figure(1, 2, width=13)
        for kind in KINDS:
            band(axes[0], recs[0]["steps"], [r[kind] for r in recs], label=LABELS[kind])
        axes[0].set(
            title=f"Eval-mode test accuracy while training at batch {BATCH}",
            xlabel="training step",
            ylabel="test accuracy",
        )
        axes[0].legend(fontsize=8)
        seed_dots(
            axes[1],
            [
                ("population − EMA", [p - e for p, e in zip(final["population"], final["ema"])]),
                ("precise − EMA", [p - e for p, e in zip(final["precise"], final["ema"])]),
            ],
            zero_line=True,
        )
        axes[1].set(title="End of training, paired by seed", ylabel="accuracy difference")
        path = out_dir / "precise_bn.png"
        save(fig, path)
        return [path]
