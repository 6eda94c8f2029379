"""``input_normalization`` — the notes' first topic and its limits: standardizing inputs fixes the input
layer only, and only inputs that a per-feature affine map can fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ... import nn as nlnn
from ...preprocessing import Standardizer
from ..data import Dataset, distort
from ..ensemble import TrainConfig, train_ensemble
from ..models import mlp
from . import Claim, ClaimResult, Experiment, Results, as_floats, register
from ._common import band, fmt, grouped, md_table, members
from .convergence import PROBE_SAMPLES, quantile_drift, quantile_probe

__all__ = ["InputNormalization", "distorted"]

STEPS, LR, BATCH, EVAL_EVERY, PROBE_EVERY = 2000, 0.5, 60, 50, 100
SETUP = {"lr": LR, "batch": BATCH, "eval_every": EVAL_EVERY, "probe_every": PROBE_EVERY}
INPUTS = ("clean", "scaled", "correlated", "outliers", "shift")
# (inputs, preprocessing) per arm; the plain network trains the first six, the BN network the rest
PLAIN_ARMS = (
    ("clean", "standardizer"),
    ("scaled", "raw"),
    ("scaled", "standardizer"),
    ("correlated", "standardizer"),
    ("outliers", "standardizer"),
    ("shift", "standardizer"),
)
BN_ARMS = tuple((inputs, "bn") for inputs in INPUTS[1:])
LABELS = {
    "clean": "clean",
    "scaled": "badly scaled",
    "correlated": "correlated",
    "outliers": "1 % outlier rows",
    "shift": "train/test shift",
    "raw": "raw",
    "standardizer": "Standardizer",
    "bn": "BN (inputs and hidden layers)",
}


def _orthogonal(n: int, g: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def distorted(data: Dataset, inputs: str, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(x_train, x_test)`` of ``data`` distorted as ``inputs`` (fixed by ``seed``):

    * ``clean`` — unchanged;
    * ``scaled`` — per feature ``s_j·x_j + o_j`` (:func:`normlab.lab.data.distort`): a positive
      affine map per feature, which the Standardizer undoes exactly;
    * ``correlated`` — ``(x − x̄)·Q·diag(10^u)·Qᵀ`` with ``Q`` a random rotation and ``u`` spread
      evenly over ``[−2, 1]``: the features mix, the covariance's scales span six decades
      (it needs whitening; per-feature scaling cannot undo a rotation);
    * ``outliers`` — a fixed 1 % of the rows (train and test alike) multiplied by 100;
    * ``shift`` — the test inputs only become ``0.7·x + 0.3`` (contrast and brightness change).
    """
    xtr, xte = data.x_train, data.x_test
    g = torch.Generator().manual_seed(seed)
    if inputs == "clean":
        return xtr, xte
    if inputs == "scaled":
        return distort(xtr, seed=seed), distort(xte, seed=seed)
    if inputs == "correlated":
        f = xtr.shape[1]
        q = _orthogonal(f, g)
        mix = q * 10.0 ** torch.linspace(-2, 1, f) @ q.T
        mean = xtr.mean(0)
        return (xtr - mean) @ mix, (xte - mean) @ mix
    if inputs == "outliers":

        def corrupt(x: Tensor) -> Tensor:
            rows = torch.rand(x.shape[0], generator=g) < 0.01
            return torch.where(rows.unsqueeze(1), x * 100.0, x)

        return corrupt(xtr), corrupt(xte)
    if inputs == "shift":
        return xtr, 0.7 * xte + 0.3
    raise ValueError(f"unknown inputs {inputs!r}; expected one of {', '.join(INPUTS)}")


def arm_data(data: Dataset, inputs: str, prep: str) -> Dataset:
    """The dataset one arm trains on: ``inputs`` distorted, then standardized when ``prep`` says so."""
    xtr, xte = distorted(data, inputs)
    if prep == "standardizer":
        std = Standardizer().fit(xtr)
        xtr, xte = std(xtr), std(xte)
    return Dataset(
        data.name,
        xtr.contiguous(),
        data.y_train,
        xte.contiguous(),
        data.y_test,
        data.image_shape,
        data.num_classes,
        f"{data.checksum}-{inputs}-{prep}",
    )


@register
class InputNormalization(Experiment):
    name = "input_normalization"
    paper = "LeCun et al. 1998 (Efficient BackProp, §4.3); Ioffe & Szegedy 2015, §2"
    summary = (
        "Standardizing badly scaled inputs recovers the clean accuracy, but the hidden layers' input "
        "distributions still drift during training (BN holds them), and per-feature standardization "
        "cannot fix correlated features, outliers or a train/test shift."
    )
    setup = (
        "Taken from the papers: LeCun et al.'s advice (zero mean, equal variance per input, and "
        "decorrelated inputs) and Ioffe & Szegedy's point that normalizing the inputs alone leaves the "
        "hidden layers' distributions moving. Ours: an MLP with 3 hidden layers of 100 sigmoid units "
        f"(PyTorch's default init), SGD lr {LR}, batch {BATCH}, {STEPS} steps. Inputs (fixed "
        "distortions of the dataset): clean; badly scaled (per feature 10^U(−2, 2)·x + offset, undone "
        "exactly by a per-feature affine map); correlated (a random rotation with scales over six "
        "decades); 1 % outlier rows (×100); a train/test shift (test inputs 0.7·x + 0.3). Arms: raw, the "
        "Standardizer (fitted on the training inputs; the reference is the clean inputs standardized, "
        "as pixels in [0, 1] are not zero-mean inputs either), or BN (a BatchNorm on the inputs and in every "
        "hidden layer, on the raw distorted inputs). Hidden-layer drift: the net movement of the last "
        "hidden layer's sigmoid-input percentiles (15/50/85 %) from 10 % of training to the end, in "
        "units of their 85−15 % spread (the `convergence` measure; inference network, test set, every "
        f"{PROBE_EVERY} steps). All plain arms train as one batched ensemble (each member its own "
        "inputs), the BN arms as another."
    )
    paper_numbers = (
        "LeCun et al. 1998 (§4.3): inputs should have zero mean, similar variances and be decorrelated "
        "(whitened) for fast convergence; no numbers for MLPs on images. Ioffe & Szegedy 2015 (§2): "
        "whitening only the inputs leaves the internal layers' distributions changing; BN normalizes "
        "every layer."
    )
    minutes_quick = 0.9
    minutes_full = 1.3
    claims = (
        Claim(
            "standardizing_helps",
            "Standardized inputs train better than badly scaled raw ones at the same lr",
            "LeCun et al. 1998, §4.3",
            "accuracy(badly scaled + Standardizer) − accuracy(badly scaled, raw), paired by seed",
            ">",
            0.0,
            "§4.3: convergence is faster when every input has zero mean and the same variance; no "
            "number",
            threshold_origin="paper",
        ),
        Claim(
            "standardizer_undoes_scaling",
            "On badly scaled inputs the Standardizer gives the clean inputs' accuracy",
            "LeCun et al. 1998, §4.3",
            "accuracy(badly scaled + Standardizer) − accuracy(clean + Standardizer), paired by seed",
            "within",
            0.01,
            "by construction: the distortion is a positive per-feature affine map the Standardizer "
            "undoes exactly",
            kind="sanity",
        ),
        Claim(
            "hidden_drift",
            "With the Standardizer alone, the hidden layer's inputs drift ≥ 2× as much as with BN",
            "Ioffe & Szegedy 2015, §2",
            "net percentile drift in spreads, last hidden layer: Standardizer / BN (badly scaled "
            "inputs), per seed",
            ">=",
            2.0,
            "§2: normalizing only the inputs leaves internal covariate shift; no number",
            scale="log",
        ),
        Claim(
            "correlated_limit",
            "On correlated inputs BN is more accurate than the Standardizer",
            "LeCun et al. 1998, §4.3",
            "accuracy(BN) − accuracy(Standardizer), correlated inputs, paired by seed",
            ">",
            0.0,
            "§4.3: correlated inputs need decorrelation (whitening), which per-feature scaling is not",
        ),
        Claim(
            "outliers_limit",
            "With 1 % outlier rows BN is more accurate than the Standardizer",
            "our test of the Standardizer's limits",
            "accuracy(BN) − accuracy(Standardizer), outlier inputs, paired by seed",
            ">",
            0.0,
            "none: the papers do not test outliers",
        ),
        Claim(
            "shift_limit",
            "Under a train/test shift BN is more accurate than the Standardizer",
            "our test of the Standardizer's limits",
            "accuracy(BN) − accuracy(Standardizer), shifted test inputs, paired by seed",
            ">",
            0.0,
            "none: the papers do not test a train/test shift",
        ),
    )

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        return [
            {
                "network": net,
                "arms": [list(a) for a in arms],
                "seeds": seeds,
                "steps": STEPS,
                "setup": SETUP,
            }
            for net, arms in (("plain", PLAIN_ARMS), ("bn", BN_ARMS))
        ]

    def run(
        self, config: dict[str, Any], data: Dataset, *, progress: bool = False
    ) -> dict[str, Any]:
        bn = config["network"] == "bn"
        arms = [tuple(a) for a in config["arms"]]
        datasets = {arm: arm_data(data, *arm) for arm in arms}
        combos = [(arm, s) for arm in arms for s in config["seeds"]]
        models = []
        for _, s in combos:
            m = mlp(
                data.in_features,
                3,
                100,
                data.num_classes,
                activation="sigmoid",
                norm="bn" if bn else "none",
                seed=s,
            )
            models.append(nn.Sequential(nlnn.BatchNorm1d(data.in_features), *m) if bn else m)
        cfg = TrainConfig(
            optimizer="sgd",
            lr=LR,
            batch_size=BATCH,
            steps=config["steps"],
            eval_every=EVAL_EVERY,
            eval_samples=2000,
        )
        per_member = [datasets[arm] for arm, _ in combos]
        x_probe = torch.stack([d.x_test[:PROBE_SAMPLES] for d in per_member])  # (K, n, F)
        results, _ = train_ensemble(
            models,
            per_member,
            cfg,
            seeds=[s for _, s in combos],
            probe=quantile_probe(x_probe),
            probe_every=PROBE_EVERY,
            progress=progress,
        )
        return {
            "members": [
                {
                    "inputs": arm[0],
                    "prep": arm[1],
                    "seed": s,
                    "final_test_acc": r.final_test_acc,
                    "diverged": r.diverged,
                    "steps": r.steps,
                    "test_acc": r.test_acc,
                    "drift": quantile_drift(r.probe_steps, r.probes["act_input"])
                    if len(r.probe_steps) > 1
                    else None,
                }
                for (arm, s), r in zip(combos, results)
            ]
        }

    def _by(self, results: Results) -> dict[tuple[str, str], list[dict[str, Any]]]:
        return grouped(members(results), lambda r: (r["inputs"], r["prep"]))

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        by = self._by(results)

        def acc(inputs: str, prep: str) -> list[float]:
            return as_floats([r["final_test_acc"] for r in by[(inputs, prep)]])

        def diff(a: list[float], b: list[float]) -> list[float]:
            return [x - y for x, y in zip(a, b)]

        drift = [
            s["drift"] / b["drift"] if s["drift"] and b["drift"] else None
            for s, b in zip(by[("scaled", "standardizer")], by[("scaled", "bn")])
        ]
        return [
            self.claim("standardizing_helps").check(
                diff(acc("scaled", "standardizer"), acc("scaled", "raw"))
            ),
            self.claim("standardizer_undoes_scaling").check(
                diff(acc("scaled", "standardizer"), acc("clean", "standardizer"))
            ),
            self.claim("hidden_drift").check(drift),
            *(
                self.claim(f"{inputs}_limit").check(
                    diff(acc(inputs, "bn"), acc(inputs, "standardizer"))
                )
                for inputs in ("correlated", "outliers", "shift")
            ),
        ]

    def table(self, results: Results) -> str:
        rows = [
            [
                LABELS[inputs],
                LABELS[prep],
                fmt([r["final_test_acc"] for r in recs]),
                fmt([r["drift"] for r in recs]),
            ]
            for (inputs, prep), recs in self._by(results).items()
        ]
        return md_table(
            ["inputs", "preprocessing", "final test accuracy", "hidden-layer drift (spreads)"], rows
        )

    def plot(self, results: Results, out_dir: Path) -> list[Path]:
        from ..plots import new_figure, save, seed_dots

        by = self._by(results)
        fig, axes = new_figure(1, 3, width=19)
        for inputs, prep in (
            ("clean", "standardizer"),
            ("scaled", "raw"),
            ("scaled", "standardizer"),
            ("scaled", "bn"),
        ):
            recs = by[(inputs, prep)]
            band(
                axes[0],
                recs[0]["steps"],
                [r["test_acc"] for r in recs],
                label=f"{LABELS[inputs]}, {LABELS[prep]}",
            )
        axes[0].set(
            title="Test accuracy while training",
            xlabel="training step",
            ylabel="test accuracy",
            ylim=(0, 1.02),
        )
        axes[0].legend(fontsize=7)
        seed_dots(
            axes[1],
            [
                (
                    f"{LABELS[i]}\n{'Std.' if p == 'standardizer' else p.upper()}",
                    [r["final_test_acc"] for r in by[(i, p)]],
                )
                for i in INPUTS[2:]
                for p in ("standardizer", "bn")
            ],
        )
        axes[1].set(title="The Standardizer's limits: accuracy per seed", ylabel="test accuracy")
        axes[1].tick_params(axis="x", labelsize=7)
        seed_dots(
            axes[2],
            [
                ("Standardizer", [r["drift"] for r in by[("scaled", "standardizer")]]),
                ("BN", [r["drift"] for r in by[("scaled", "bn")]]),
            ],
        )
        axes[2].set(
            title="Hidden-layer drift, badly scaled inputs (per seed)",
            ylabel="net percentile drift / spread",
        )
        path = out_dir / "input_normalization.png"
        save(fig, path)
        return [path]
