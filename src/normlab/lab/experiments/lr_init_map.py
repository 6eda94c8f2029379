"""``lr_init_map`` — learning rate × initialization, plain vs BN, as one map (Ioffe & Szegedy 2015,
§3.3; Bjorck et al. 2018)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ... import init as ni
from ..data import Dataset
from ..ensemble import TrainConfig, train_ensemble
from ..models import mlp
from . import Claim, ClaimResult, Experiment, Results, accuracy_level, register
from ._common import grouped, md_table, members, num
from .learning_rate import RATE, trains

__all__ = ["INITS", "LRS", "LrInitMap", "cell_success", "trainable_cells"]

DEPTH, WIDTH, BATCH, STEPS = 6, 32, 64, 200
LRS = tuple(0.01 * 2**i for i in range(9))  # 0.01 … 2.56, ×2 apart
# init name → (label, the value mlp's ``init`` takes; LSUV starts from it and rescales)
INITS: dict[str, tuple[str, str | float]] = {
    "unit_normal": ("N(0, 1)", 1.0),
    "small_normal": ("N(0, 0.01²)", "normal"),
    "glorot": ("Glorot", "xavier"),
    "he": ("He", "he"),
    "lsuv": ("LSUV", "orthogonal"),
}
ARMS = ("none", "bn")
LABELS = {"none": "plain", "bn": "BN"}
LSUV_SAMPLES = 256
MARGIN = 0.02  # the equivalence margin at the smallest learning rate (ours)
SETUP = {"depth": DEPTH, "width": WIDTH, "batch": BATCH, "lsuv_samples": LSUV_SAMPLES}


def build(data: Dataset, norm: str, init: str, seed: int) -> nn.Sequential:
    """The arm's MLP (Linear → [BN] → ReLU) with one of :data:`INITS`; ``"lsuv"`` runs
    :func:`normlab.init.lsuv_` on a seeded batch of training samples."""
    model = mlp(
        data.in_features,
        DEPTH,
        WIDTH,
        data.num_classes,
        norm=norm,
        init=INITS[init][1],
        seed=seed,
    )
    if init == "lsuv":
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(data.y_train), generator=gen)[:LSUV_SAMPLES]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a layer outside the tolerance is still a valid start
            ni.lsuv_(model, data.x_train[idx], generator=gen)
    return model


def cell_success(
    records: list[dict[str, Any]], seeds: list[int], level: float, lrs: Sequence[float] = LRS
) -> np.ndarray:
    """``(seeds, inits, lrs)`` bool: the run trains (finite, ≥ ``level`` test accuracy)."""
    by = {(r["seed"], r["init"], float(r["lr"])): trains(r, level) for r in records}
    return np.array([[[by[(s, i, lr)] for lr in lrs] for i in INITS] for s in seeds])


def trainable_cells(success: np.ndarray, rate: float = RATE) -> int:
    """Cells (init × lr) where at least ``rate`` of the seeds (axis 0) train."""
    return int((success.mean(axis=0) >= rate - 1e-12).sum())


def _lrs(results: Any) -> list[float]:
    """The learning rates the units ran (quick runs: every other rate of :data:`LRS`)."""
    return [float(v) for v in results[0][0]["lrs"]]


@register
class LrInitMap(Experiment):
    name = "lr_init_map"
    paper = "Ioffe & Szegedy 2015, §3.3; Bjorck et al. 2018, Fig. 1"
    summary = (
        "Learning rate × initialization: BN trains in a larger region of the map (higher rates, any "
        "init); at the smallest rates both arms reach the same accuracy."
    )
    setup = (
        "Taken from the papers: plain vs BN (bias-free Linear → BN → ReLU) over learning rates and "
        "initializations, plain SGD (Ioffe & Szegedy: BN allows higher rates and less care about init; "
        "Bjorck et al.: at small rates BN and unnormalized networks reach similar accuracy, BN's benefit "
        "comes from the larger rates it allows). Changed: a small MLP with "
        f"{DEPTH} hidden layers of {WIDTH} ReLU units (small so that the whole map — 5 inits × "
        f"{len(LRS)} rates × seeds — trains as one batched ensemble per arm), batch {BATCH}, {STEPS} steps "
        "for every dataset; inits N(0, 1) (a 'standard normal' weight), N(0, 0.01²), Glorot normal, He "
        f"normal and LSUV (`normlab.init.lsuv_` on {LSUV_SAMPLES} training samples per seed), zero biases; "
        f"a ×2 grid of learning rates {num(LRS[0])} … {num(LRS[-1])} (quick runs: every other rate, a ×4 "
        "grid with the same ends). A run trains when its loss stays "
        "finite and below 10× its first loss and it reaches the accuracy level (0.80 on digits, 0.70 on "
        "Fashion-MNIST), as in `learning_rate`; a cell is trainable when ≥ 80 % of its seeds train. Each "
        "cell shows the median test accuracy (a diverged run scores chance) and the fraction of diverged "
        "seeds. The equivalence at the smallest rate compares He-initialized nets, paired by seed; its "
        f"margin ±{MARGIN} is ours."
    )
    paper_numbers = (
        "Ioffe & Szegedy (§3.3, §4.2.2): BN 'allows us to use much higher learning rates and be less "
        "careful about initialization' (BN-Inception at 30× the base rate; no map). Bjorck et al. (Fig. 1, "
        "ResNet-110 on CIFAR-10): at the smallest learning rate the networks with and without BN reach "
        "similar test accuracy, while at large rates only BN trains."
    )
    minutes_quick = 0.14
    minutes_full = 0.8
    claims = (
        Claim(
            "bn_larger_region",
            "BN's trainable region (init × learning rate) is larger than plain's",
            paper,
            "cells where ≥ 80 % of seeds train (finite, ≥ {level:0.80} test accuracy): BN / plain",
            ">",
            1.0,
            "§3.3: higher learning rates and less care about initialization; no map, no count",
            threshold_origin="paper",
        ),
        Claim(
            "same_at_smallest_lr",
            f"At the smallest learning rate ({num(LRS[0])}), BN's accuracy is within ±{MARGIN} of plain's",
            paper,
            f"test accuracy BN − plain, He init, lr {num(LRS[0])}, paired by seed (equivalence)",
            "within",
            MARGIN,
            "Bjorck et al. Fig. 1: similar accuracy with and without BN at the smallest rate; no margin",
        ),
    )

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        return [
            {
                "norm": norm,
                "seeds": seeds,
                "inits": list(INITS),
                "lrs": list(LRS[::2] if quick else LRS),
                "steps": STEPS,
                "dataset": dataset,
                "setup": SETUP,
            }
            for norm in ARMS
        ]

    def run(
        self, config: dict[str, Any], data: Dataset, *, progress: bool = False
    ) -> dict[str, Any]:
        combos = [
            (init, lr, s)
            for init in config["inits"]
            for lr in config["lrs"]
            for s in config["seeds"]
        ]
        models = [build(data, config["norm"], init, s) for init, _, s in combos]
        cfg = TrainConfig(
            optimizer="sgd",
            lr=[lr for _, lr, _ in combos],
            batch_size=BATCH,
            steps=config["steps"],
            eval_every=None,
        )
        results, _ = train_ensemble(
            models, data, cfg, seeds=[s for _, _, s in combos], progress=progress
        )
        return {
            "members": [
                {
                    "init": init,
                    "lr": lr,
                    "seed": s,
                    "final_test_acc": r.final_test_acc,
                    "diverged": r.diverged,
                }
                for (init, lr, s), r in zip(combos, results)
            ],
            "num_classes": data.num_classes,
        }

    def _success(self, results: Results, level: float) -> dict[str, np.ndarray]:
        seeds = list(results[0][0]["seeds"])
        by = grouped(members(results), lambda r: r["config"]["norm"])
        return {norm: cell_success(recs, seeds, level, _lrs(results)) for norm, recs in by.items()}

    def _cells(self, results: Results) -> dict[tuple[str, str, float], list[dict[str, Any]]]:
        return grouped(members(results), lambda r: (r["config"]["norm"], r["init"], float(r["lr"])))

    def _accuracy(self, results: Results) -> dict[str, np.ndarray]:
        """Per arm, ``(seeds, inits, lrs)`` test accuracy; a diverged run scores chance."""
        chance = 1.0 / results[0][1]["num_classes"]
        cells = self._cells(results)
        return {
            norm: np.array(
                [
                    [
                        [
                            chance if r["diverged"] else r["final_test_acc"]
                            for r in cells[(norm, init, lr)]
                        ]
                        for lr in _lrs(results)
                    ]
                    for init in INITS
                ]
            ).transpose(2, 0, 1)
            for norm in ARMS
        }

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        level = accuracy_level(0.80, dataset)
        success = self._success(results, level)
        plain, bn = success["none"], success["bn"]

        def ratio(idx: np.ndarray) -> float:
            p, b = trainable_cells(plain[idx]), trainable_cells(bn[idx])
            return b / p if p else (math.inf if b else math.nan)

        note = "plain trains in no cell (ratio ∞)" if not trainable_cells(plain) else ""
        acc = self._accuracy(results)
        he = list(INITS).index("he")
        gap = (acc["bn"][:, he, 0] - acc["none"][:, he, 0]).tolist()
        return [
            self.claim("bn_larger_region", dataset).check_bootstrap(
                plain.shape[0],
                ratio,
                values=[float(trainable_cells(plain)), float(trainable_cells(bn))],
                note=note,
            ),
            self.claim("same_at_smallest_lr").check(gap),
        ]

    def table(self, results: Results) -> str:
        level = accuracy_level(0.80, results[0][0]["dataset"])
        success, acc = self._success(results, level), self._accuracy(results)
        cells = self._cells(results)
        rows = []
        for i, (init, (label, _)) in enumerate(INITS.items()):
            for norm in ARMS:
                row = [label, LABELS[norm]]
                for j, lr in enumerate(_lrs(results)):
                    div = sum(r["diverged"] for r in cells[(norm, init, lr)])
                    mark = "**" if success[norm][:, i, j].mean() >= RATE - 1e-12 else ""
                    row.append(
                        f"{mark}{num(float(np.median(acc[norm][:, i, j])))}{mark}"
                        + (f" ({div} div.)" if div else "")
                    )
                rows.append(row)
        counts = ", ".join(f"{LABELS[n]} {trainable_cells(success[n])}" for n in ARMS)
        return md_table(["init", "model", *[f"lr {num(lr)}" for lr in _lrs(results)]], rows) + (
            f"\n\nMedian test accuracy over seeds (diverged runs score chance); bold: ≥ {RATE:.0%} of "
            f"the seeds train (finite, ≥ {level:.2f}). Trainable cells: {counts} of "
            f"{len(INITS) * len(_lrs(results))}."
        )

    def plot(self, results: Results, out_dir: Path) -> list[Path]:
        from matplotlib.patches import Rectangle

        from ..plots import new_figure, save, seed_dots

        lrs = _lrs(results)
        level = accuracy_level(0.80, results[0][0]["dataset"])
        success, acc = self._success(results, level), self._accuracy(results)
        fig, axes = new_figure(1, 3, width=22, height=5.5)
        image = None
        for ax, norm in zip(axes, ARMS):
            median = np.median(acc[norm], axis=0)  # (inits, lrs)
            diverged = self._diverged(results, norm).mean(axis=0)  # fraction per cell
            image = ax.imshow(median, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            for i in range(len(INITS)):
                for j in range(len(lrs)):
                    text = f"{median[i, j]:.2f}"
                    if diverged[i, j] > 0:
                        text += f"\n{diverged[i, j]:.0%} div."
                    ax.text(
                        j,
                        i,
                        text,
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if median[i, j] < 0.6 else "black",
                    )
                    if success[norm][:, i, j].mean() >= RATE - 1e-12:
                        ax.add_patch(
                            Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=1.5)
                        )
            ax.set_xticks(range(len(lrs)), [num(lr) for lr in lrs], rotation=45)
            ax.set_yticks(range(len(INITS)), [label for label, _ in INITS.values()])
            ax.grid(False)
            ax.set(
                title=f"{LABELS[norm]}: median test accuracy (red: ≥ {RATE:.0%} of seeds train; "
                f"{trainable_cells(success[norm])} cells)",
                xlabel="learning rate",
                ylabel="initialization",
            )
        if image is not None:
            fig.colorbar(image, ax=axes[1], label="median test accuracy (same scale in both maps)")
        seed_dots(
            axes[2],
            [
                (label, (acc["bn"][:, i, 0] - acc["none"][:, i, 0]).tolist())
                for i, (label, _) in enumerate(INITS.values())
            ],
            zero_line=True,
        )
        for bound in (-MARGIN, MARGIN):
            axes[2].axhline(bound, color="gray", ls="--", lw=0.8)
        axes[2].set(
            title=f"At lr {num(lrs[0])}: accuracy BN − plain per seed (dashed: ±{MARGIN})",
            ylabel="accuracy difference",
        )
        path = out_dir / "lr_init_map.png"
        save(fig, path)
        return [path]

    def _diverged(self, results: Results, norm: str) -> np.ndarray:
        """``(seeds, inits, lrs)`` bool: the run diverged."""
        cells = self._cells(results)
        return np.array(
            [
                [[r["diverged"] for r in cells[(norm, init, lr)]] for lr in _lrs(results)]
                for init in INITS
            ]
        ).transpose(2, 0, 1)
