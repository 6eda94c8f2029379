"""``convergence`` — Ioffe & Szegedy 2015, Fig. 1: BN trains faster and keeps activations stable.

MLP 64-100-100-100-10 with sigmoids, PyTorch's default init, plain SGD with one
learning rate for both; plain vs BN (bias-free Linear → BN → sigmoid).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import Dataset
from ..ensemble import EnsembleMLP, TrainConfig, train_ensemble
from ..models import mlp
from . import Claim, ClaimResult, Experiment, Results, accuracy_level, mean_std, register

__all__ = ["Convergence", "quantile_drift", "quantile_probe", "steps_to_reach"]

QUANTILES = (0.15, 0.50, 0.85)
PROBE_SAMPLES = 2000  # quantiles on the first 2000 test samples (digits: all 500)


def _hidden_inputs(ens: EnsembleMLP, x: torch.Tensor, layer: int, train_mode: bool) -> torch.Tensor:
    """Activation inputs at hidden ``layer`` ``(K, N, C)``; in train mode (batch statistics) the
    running buffers are restored afterwards, so measuring never changes the model."""
    was = ens.training
    saved = [b.clone() for b in ens.buffers()] if train_mode else []
    ens.train(train_mode)
    with torch.no_grad():
        _, pre, _ = ens.forward_hidden(x)
        for b, s in zip(ens.buffers(), saved):
            b.copy_(s)
    ens.train(was)
    return pre[layer]


def quantile_probe(x_eval: torch.Tensor, layer: int = -1) -> Any:
    """A ``train_ensemble`` probe: per member, the 15/50/85 % quantiles of each neuron's
    activation *input* at hidden ``layer`` over ``x_eval``, as ``(3, C)`` lists:

    * ``"quantiles"`` — the network as it trains (BatchNorm with the batch statistics of
      ``x_eval``): the distribution Ioffe & Szegedy's Fig. 1(b, c) follows;
    * ``"quantiles_eval"`` — the inference network (BatchNorm with running statistics).
    """
    q = torch.tensor(QUANTILES)

    def probe(step: int, ens: EnsembleMLP) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{} for _ in range(ens.k)]
        for key, train_mode in (("quantiles", True), ("quantiles_eval", False)):
            values = torch.quantile(
                _hidden_inputs(ens, x_eval, layer, train_mode), q, dim=1
            )  # (3, K, C)
            for k in range(ens.k):
                out[k][key] = values[:, k].tolist()
        return out

    return probe


def quantile_drift(history: list[Any]) -> float:
    """Mean |Δ| of every neuron's 15/50/85 % quantiles between consecutive evaluations.

    ``history``: one ``(3, C)`` array per evaluation point. A number for how much the
    distribution feeding the activation moves during training (Ioffe & Szegedy's
    Fig. 1(b, c) as a single value).
    """
    arr = np.asarray(history, dtype=np.float64)  # (T, 3, C)
    if arr.shape[0] < 2:
        raise ValueError("quantile drift needs at least two evaluation points")
    return float(np.abs(np.diff(arr, axis=0)).mean())


def steps_to_reach(steps: list[int], accuracy: list[float], level: float, budget: int) -> int:
    """First evaluated step with accuracy ≥ ``level``; ``budget`` when it is never reached."""
    for s, a in zip(steps, accuracy):
        if a >= level:
            return int(s)
    return int(budget)


@register
class Convergence(Experiment):
    name = "convergence"
    paper = "Ioffe & Szegedy 2015, Fig. 1"
    summary = "BN reaches a given accuracy in far fewer steps and keeps each layer's input distribution stable."
    setup = (
        "Quantile drift is measured on the network as it trains (BatchNorm uses the batch statistics of the "
        "test set; running buffers untouched); the drift of the inference network (running statistics) is "
        "reported beside it. "
        "MLP 64-100-100-100-10 (784 inputs on (Fashion-)MNIST), sigmoid, PyTorch default init, inputs in [0, 1], "
        "batch 60, plain SGD lr 0.5 for both, 5000 steps, evaluation every 20 steps; plain vs "
        "BN (bias-free Linear → BatchNorm1d → sigmoid). Quantiles of the last hidden layer's sigmoid input on "
        "the test set (its first 2000 samples on the larger datasets)."
    )
    paper_numbers = (
        "Ioffe & Szegedy (MNIST, 3×100 sigmoid, batch 60, 50k steps): the BN network reaches higher test "
        "accuracy faster (Fig. 1a), and the 15/50/85th percentiles of a last-layer sigmoid input stay "
        "stable with BN while they drift without (Fig. 1b, c). On ImageNet, BN-Inception matched Inception's "
        "72.2% in 13.3% of the steps (BN-x5: 2.1M vs 31.0M steps)."
    )
    minutes_quick = 0.3
    minutes_full = 0.6
    claims = (
        Claim(
            "steps_ratio",
            "BN reaches {pct:0.90} test accuracy in ≤ 1/3 of the steps plain needs",
            paper,
            "steps to {pct:0.90} (BN) / steps to {pct:0.90} (plain); never reached = full budget",
            "<=",
            1 / 3,
        ),
        Claim(
            "drift_ratio",
            "BN's quantile drift is ≤ 0.5× plain's",
            paper,
            "mean |Δ quantile| between evaluations, BN / plain",
            "<=",
            0.5,
        ),
    )

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        return [
            {
                "norm": norm,
                "seeds": seeds,
                "steps": 5000,
                "lr": 0.5,
                "batch_size": 60,
                "eval_every": 20,
                "dataset": dataset,
            }
            for norm in ("none", "bn")
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
                seed=s,
            )
            for s in seeds
        ]
        cfg = TrainConfig(
            optimizer="sgd",
            lr=config["lr"],
            batch_size=config["batch_size"],
            steps=config["steps"],
            eval_every=config["eval_every"],
        )
        results, _ = train_ensemble(
            models,
            data,
            cfg,
            seeds=seeds,
            probe=quantile_probe(data.x_test[:PROBE_SAMPLES]),
            progress=f"convergence {config['norm']}" if progress else False,
        )
        members = []
        for r in results:
            history = r.probes["quantiles"]
            members.append(
                {
                    "seed": r.seed,
                    "steps": r.steps,
                    "test_acc": r.test_acc,
                    "final_test_acc": r.final_test_acc,
                    "diverged": r.diverged,
                    "drift": quantile_drift(history),
                    "drift_eval_mode": quantile_drift(r.probes["quantiles_eval"]),
                    # one neuron's quantile trajectory, for the paper's Fig. 1(b, c)
                    "neuron0_quantiles": [
                        [h_t[q][0] for q in range(len(QUANTILES))] for h_t in history
                    ],
                }
            )
        return {"members": members}

    def _by_norm(self, results: Results) -> dict[str, list[dict[str, Any]]]:
        return {cfg["norm"]: metrics["members"] for cfg, metrics in results}

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        by = self._by_norm(results)
        level = accuracy_level(0.90, dataset)
        budget = int(next(cfg for cfg, _ in results)["steps"])
        ratios, drifts = [], []
        for plain, bn in zip(by["none"], by["bn"]):  # paired by seed
            s_plain = steps_to_reach(plain["steps"], plain["test_acc"], level, budget)
            s_bn = steps_to_reach(bn["steps"], bn["test_acc"], level, budget)
            ratios.append(s_bn / max(s_plain, 1))
            drifts.append(bn["drift"] / plain["drift"])
        return [
            self.claim("steps_ratio", dataset).check(ratios),
            self.claim("drift_ratio").check(drifts),
        ]

    def table(self, results: Results) -> str:
        by = self._by_norm(results)
        first = next(cfg for cfg, _ in results)
        budget, level = int(first["steps"]), accuracy_level(0.90, first["dataset"])
        rows = [
            f"| model | final test accuracy | steps to {level:.0%} | quantile drift (training) | "
            "quantile drift (inference) |",
            "|---|---|---|---|---|",
        ]
        for norm, label in (("none", "plain"), ("bn", "BN")):
            members = by[norm]
            acc = mean_std([m["final_test_acc"] for m in members])
            steps = mean_std(
                [steps_to_reach(m["steps"], m["test_acc"], level, budget) for m in members]
            )
            drift = mean_std([m["drift"] for m in members])
            drift_eval = mean_std([m["drift_eval_mode"] for m in members])
            rows.append(
                f"| {label} | {acc[0]:.3f} ± {acc[1]:.3f} | {steps[0]:.0f} ± {steps[1]:.0f} | "
                f"{drift[0]:.4f} ± {drift[1]:.4f} | {drift_eval[0]:.4f} ± {drift_eval[1]:.4f} |"
            )
        return "\n".join(rows)

    def plot(self, results: Results, out_dir: Path) -> list[Path]:
        from ..plots import new_figure, save

        by = self._by_norm(results)
        colors = {"none": "tab:red", "bn": "tab:blue"}
        labels = {"none": "plain", "bn": "BN"}
        fig, axes = new_figure(1, 3, width=15)
        for norm, members in by.items():
            for i, m in enumerate(members):
                axes[0].plot(
                    m["steps"],
                    m["test_acc"],
                    color=colors[norm],
                    alpha=0.8,
                    label=labels[norm] if i == 0 else None,
                )
        axes[0].set(
            title="(a) test accuracy", xlabel="training step", ylabel="test accuracy", ylim=(0, 1)
        )
        axes[0].legend()
        for ax, norm, tag in ((axes[1], "none", "(b) plain"), (axes[2], "bn", "(c) BN")):
            m = by[norm][0]
            q = np.asarray(m["neuron0_quantiles"])  # (T, 3)
            for j, name in enumerate(("15%", "50%", "85%")):
                ax.plot(
                    m["steps"], q[:, j], color=colors[norm], alpha=0.4 + 0.3 * (j == 1), label=name
                )
            ax.set(
                title=f"{tag}: one neuron's sigmoid input (seed {m['seed']})",
                xlabel="training step",
                ylabel="quantile of the sigmoid input",
            )
            ax.legend(title="quantile")
        path = out_dir / "convergence.png"
        save(fig, path)
        return [path]
