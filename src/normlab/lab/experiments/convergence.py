"""``convergence`` — Ioffe & Szegedy 2015, Fig. 1: BN trains faster and keeps the inference network's
activation inputs stable."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import Dataset
from ..ensemble import Ensemble, StackedLinear, TrainConfig, train_ensemble
from ..models import mlp
from . import Claim, ClaimResult, Experiment, Results, accuracy_level, register
from ._common import fmt, grouped, md_table, members

__all__ = [
    "Convergence",
    "inputs_of",
    "quantile_drift",
    "quantile_probe",
    "steps_to_reach",
]

QUANTILES = (0.15, 0.50, 0.85)
PROBE_SAMPLES = 2000  # quantiles on the first 2000 test samples (digits: all 500)
STEPS, EVAL_EVERY, PROBE_EVERY, LR, BATCH, INIT_STD = 5000, 20, 100, 0.5, 60, 0.1
ARMS = ("none", "bn")
LABELS = {"none": "plain", "bn": "BN"}
SETUP = {
    "lr": LR,
    "batch": BATCH,
    "init_std": INIT_STD,
    "eval_every": EVAL_EVERY,
    "probe_every": PROBE_EVERY,
}


def inputs_of(
    ens: Ensemble, outputs: Sequence[torch.Tensor], kind: type[nn.Module]
) -> list[torch.Tensor]:
    """The inputs ``(K, N, C)`` of every layer of type ``kind``, from :meth:`Ensemble.outputs`."""
    return [outputs[i - 1] for i, layer in enumerate(ens.layers) if i and isinstance(layer, kind)]


def quantile_probe(x_eval: torch.Tensor, kind: type[nn.Module] = nn.Sigmoid) -> Any:
    """A ``train_ensemble`` probe: per member, the 15/50/85 % quantiles of each neuron of the last
    hidden layer over ``x_eval``, as ``(3, C)`` lists, measured on the *inference* network (batch norm
    with its running statistics, as the trained network is used):

    * ``"act_input"`` — the input of the last ``kind`` activation (Ioffe & Szegedy's Fig. 1(b, c));
    * ``"pre_norm"`` — the last hidden Linear's output (before any normalization).
    """
    q = torch.tensor(QUANTILES)

    def probe(step: int, ens: Ensemble) -> list[dict[str, Any]]:
        outputs = ens.outputs(x_eval)
        act = inputs_of(ens, outputs, kind)[-1]
        linear = [i for i, layer in enumerate(ens.layers) if isinstance(layer, StackedLinear)]
        pre = outputs[linear[-2]]  # the last hidden Linear (the last one is the output layer)
        values = {
            key: torch.quantile(h, q, dim=1) for key, h in (("act_input", act), ("pre_norm", pre))
        }
        return [{key: v[:, k].tolist() for key, v in values.items()} for k in range(ens.k)]

    return probe


def quantile_drift(steps: Sequence[int], history: Sequence[Any], *, start: float = 0.10) -> float:
    r"""Scale-free net drift of every neuron's 15/50/85 % quantiles from ``start`` of training to the end.

    With :math:`q_{j}(t)` a neuron's quantiles at the first probe at or after ``start`` of the steps
    (:math:`t_0`) and at the last (:math:`T`), and :math:`s_j` the mean of its 85−15 % spreads at
    :math:`t_0` and :math:`T`:

    .. math:: \text{drift} = \operatorname{mean}_{j,q} |q_j(T) - q_j(t_0)| / s_j

    A systematic movement of the distribution, in units of its own width: SGD's step-to-step
    jitter, which cancels over time, and the activations' scale do not enter.
    """
    arr = np.asarray(history, dtype=np.float64)  # (T, 3, C)
    if arr.shape[0] < 2:
        raise ValueError("quantile drift needs at least two probes")
    first = next(i for i, s in enumerate(steps) if s >= start * steps[-1])
    if first >= arr.shape[0] - 1:
        first = 0
    a, b = arr[first], arr[-1]
    spread = 0.5 * ((a[2] - a[0]) + (b[2] - b[0]))  # (C,)
    with np.errstate(all="ignore"):
        rel = np.abs(b - a) / spread
    rel = rel[:, np.isfinite(rel).all(axis=0) & (spread > 0)]
    return float(rel.mean()) if rel.size else float("nan")


def steps_to_reach(steps: Sequence[int], accuracy: Sequence[float], level: float) -> int | None:
    """First evaluated step with accuracy ≥ ``level``; ``None`` when it is never reached."""
    for s, a in zip(steps, accuracy):
        if a >= level:
            return int(s)
    return None


@register
class Convergence(Experiment):
    name = "convergence"
    paper = "Ioffe & Szegedy 2015, Fig. 1"
    summary = (
        "BN reaches a given accuracy in fewer steps, and the distribution feeding each sigmoid moves "
        "less during training."
    )
    setup = (
        f"Taken from the paper (Fig. 1): an MLP with 3 hidden layers of 100 sigmoid units, weights from a "
        f"small Gaussian (std {INIT_STD}: the paper gives no value; the TensorFlow MNIST tutorials of "
        "the time used 0.1, and with 0.01 the plain net sits at chance for thousands of steps, which "
        f"the paper's Fig. 1a does not show) and zero biases, batch {BATCH}, plain SGD "
        f"with one learning rate for both arms, plain vs BN (bias-free Linear → BatchNorm1d → sigmoid), the "
        "15/50/85th percentiles of a last-hidden-layer sigmoid input over training. Changed: digits instead "
        f"of MNIST; {STEPS} steps instead of 50k (lr {LR}, our choice, for the shorter budget); the "
        f"percentiles are those of the inference network (running statistics) on the test set's first "
        f"{PROBE_SAMPLES} samples every {PROBE_EVERY} steps, and drift is the net movement of every "
        "neuron's percentiles from 10 % of training to the end in units of its 85−15 % spread (scale-free; "
        "the batch-normalized training network would hold its mean and spread fixed by construction). "
        f"Test accuracy every {EVAL_EVERY} steps on up to 2,000 test samples; a run that never reaches the "
        "level counts as the full budget (a bound)."
    )
    paper_numbers = (
        "Ioffe & Szegedy (MNIST, 3×100 sigmoid, batch 60, 50k steps): the BN network reaches higher test "
        "accuracy faster (Fig. 1a), and the percentiles of a sigmoid input stay steady with BN while they "
        "move without (Fig. 1b, c; no numbers). ImageNet (Fig. 3): BN-Baseline reached Inception's best "
        "72.2 % in 13.3·10⁶ steps against Inception's 31.0·10⁶ (0.43×) at the same learning rate."
    )
    minutes_quick = 0.9
    minutes_full = 2.6
    claims = (
        Claim(
            "steps_ratio",
            "BN reaches {pct:0.90} test accuracy in ≤ 0.43× the steps plain needs",
            paper,
            "steps to {pct:0.90} (BN) / steps to {pct:0.90} (plain), per seed",
            "<=",
            13.3 / 31.0,
            "Fig. 3 (ImageNet): BN-Baseline reached Inception's 72.2 % in 13.3·10⁶ vs 31.0·10⁶ steps = 0.43×",
            threshold_origin="paper",
            scale="log",
        ),
        Claim(
            "drift_ratio",
            "BN's inference-network sigmoid inputs drift ≤ 0.5× as much as plain's",
            paper,
            "net percentile drift, 10 % of training → end, in spreads (last hidden layer): BN / plain",
            "<=",
            0.5,
            "Fig. 1(b, c) (MNIST): percentiles move without BN and stay steady with BN; no number",
            scale="log",
        ),
    )

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        return [
            {"norm": norm, "seeds": seeds, "steps": STEPS, "dataset": dataset, "setup": SETUP}
            for norm in ARMS
        ]

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
                activation="sigmoid",
                norm=config["norm"],
                init=INIT_STD,
                seed=s,
            )
            for s in seeds
        ]
        cfg = TrainConfig(
            optimizer="sgd",
            lr=LR,
            batch_size=BATCH,
            steps=config["steps"],
            eval_every=EVAL_EVERY,
            eval_samples=2000,
        )
        results, _ = train_ensemble(
            models,
            data,
            cfg,
            seeds=seeds,
            probe=quantile_probe(data.x_test[:PROBE_SAMPLES]),
            probe_every=PROBE_EVERY,
            progress=f"convergence {config['norm']}" if progress else False,
        )
        out = []
        for r in results:
            act, pre = r.probes["act_input"], r.probes["pre_norm"]
            out.append(
                {
                    "seed": r.seed,
                    "steps": r.steps,
                    "test_acc": r.test_acc,
                    "final_test_acc": r.final_test_acc,
                    "diverged": r.diverged,
                    "probe_steps": r.probe_steps,
                    "drift": quantile_drift(r.probe_steps, act) if len(act) > 1 else None,
                    "drift_pre_norm": quantile_drift(r.probe_steps, pre) if len(pre) > 1 else None,
                    # one neuron's percentile trajectory, for the paper's Fig. 1(b, c)
                    "neuron0": [[h_t[q][0] for q in range(len(QUANTILES))] for h_t in act],
                }
            )
        return {"members": out}

    def _by(self, results: Results) -> dict[str, list[dict[str, Any]]]:
        return grouped(members(results), lambda r: r["config"]["norm"])

    @staticmethod
    def _steps(m: dict[str, Any], level: float) -> int | None:
        return None if m["diverged"] else steps_to_reach(m["steps"], m["test_acc"], level)

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        by = self._by(results)
        level = accuracy_level(0.90, dataset)
        budget = int(results[0][0]["steps"])
        ratios: list[float | None] = []
        censored: list[Any] = []
        for plain, bn in zip(by["none"], by["bn"]):  # paired by seed
            s_plain, s_bn = self._steps(plain, level), self._steps(bn, level)
            if s_plain is None and s_bn is None:
                ratios.append(None)  # neither reached the level: no ratio
                censored.append(None)
                continue
            ratios.append(max(s_bn or budget, 1) / max(s_plain or budget, 1))
            # plain never reached: its count is a lower bound, so the ratio an upper bound
            censored.append("upper" if s_plain is None else "lower" if s_bn is None else None)
        drifts = [
            b["drift"] / p["drift"] if b["drift"] and p["drift"] else None
            for p, b in zip(by["none"], by["bn"])
        ]
        return [
            self.claim("steps_ratio", dataset).check(ratios, censored=censored),
            self.claim("drift_ratio").check(drifts),
        ]

    def table(self, results: Results) -> str:
        by = self._by(results)
        level = accuracy_level(0.90, results[0][0]["dataset"])
        rows = []
        for norm, recs in by.items():
            reached = [self._steps(m, level) for m in recs]
            rows.append(
                [
                    LABELS[norm],
                    fmt([m["final_test_acc"] for m in recs]),
                    fmt([s for s in reached if s is not None])
                    + f" ({sum(s is not None for s in reached)} of {len(recs)} reached it)",
                    fmt([m["drift"] for m in recs]),
                    fmt([m["drift_pre_norm"] for m in recs]),
                ]
            )
        return md_table(
            [
                "model",
                "final test accuracy",
                f"steps to {level:.0%}",
                "drift of the sigmoid input (inference network)",
                "drift of the Linear output (before BN)",
            ],
            rows,
        )

    def plot(self, results: Results, out_dir: Path) -> list[Path]:
        from ..plots import new_figure, same_ylim, save, seed_dots

        by = self._by(results)
        colors = {"none": "tab:red", "bn": "tab:blue"}
        fig, axes = new_figure(1, 4, width=20)
        for norm, recs in by.items():
            for i, m in enumerate(recs):
                axes[0].plot(
                    m["steps"],
                    m["test_acc"],
                    color=colors[norm],
                    alpha=0.6,
                    lw=0.8,
                    label=f"{LABELS[norm]} ({len(recs)} seeds)" if i == 0 else None,
                )
        axes[0].set(
            title="(a) test accuracy, every seed",
            xlabel="training step",
            ylabel="test accuracy",
            ylim=(0, 1),
        )
        axes[0].legend()
        for ax, norm, tag in ((axes[1], "none", "(b) plain"), (axes[2], "bn", "(c) BN")):
            m = by[norm][0]
            q = np.asarray(m["neuron0"])  # (T, 3)
            for j, name in enumerate(("15%", "50%", "85%")):
                ax.plot(
                    m["probe_steps"][: len(q)],
                    q[:, j],
                    color=colors[norm],
                    alpha=0.4 + 0.3 * (j == 1),
                    label=name,
                )
            ax.set(
                title=f"{tag}: one sigmoid input, inference network (seed {m['seed']})",
                xlabel="training step",
                ylabel="percentile of the sigmoid input",
            )
            ax.legend(title="percentile")
        same_ylim(axes[1], axes[2])
        seed_dots(
            axes[3],
            [(LABELS[n], [m["drift"] for m in recs]) for n, recs in by.items()],
            colors=[colors[n] for n in by],
        )
        axes[3].set(
            title="(d) drift per seed (dots), mean and 95 % interval",
            ylabel="net percentile drift / spread",
        )
        path = out_dir / "convergence.png"
        save(fig, path)
        return [path]
