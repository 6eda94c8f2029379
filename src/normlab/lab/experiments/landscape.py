"""``landscape`` — Santurkar et al. 2018, Fig. 4: BN makes the loss landscape smoother."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ...diagnostics import landscape_probe
from ..data import Dataset
from ..ensemble import Ensemble, TrainConfig, train_ensemble
from ..models import convnet, mlp
from . import Claim, ClaimResult, Experiment, Results, register
from ._common import MODEL_LABELS, band, by_model, fmt, grouped, md_table, model_units

DEPTH, WIDTH, LR, EPOCHS, EVERY = 6, 100, 0.1, 8, 10
STEP_SIZES = tuple(LR * f for f in (0.5, 1.0, 2.0, 4.0))
SETUP = {"depth": DEPTH, "width": WIDTH, "lr": LR, "every": EVERY}
CNN_EVERY = 20  # the ConvNet's probes (the suite's time budget)


def landscape_hook(
    x: torch.Tensor, y: torch.Tensor, every: int, results: list[list[dict[str, Any]]]
) -> Any:
    """A ``train_ensemble`` step hook probing every member's landscape every ``every`` steps on ``(x, y)``."""

    def hook(step: int, ens: Ensemble) -> None:
        if step % every:
            return
        for k, model in enumerate(ens.to_models()):
            p = landscape_probe(model, F.cross_entropy, (x, y), STEP_SIZES)
            results[k].append(
                {
                    "step": step,
                    "loss_range": p.loss_range,
                    "grad_diff": max(p.grad_diffs),
                    "beta": p.beta_smoothness,
                    "losses": p.losses,
                }
            )

    return hook


def _mean_grad_diff(record: dict[str, Any]) -> float:
    """The gradient change along the step (max over step sizes), averaged over every probe of the run."""
    vals = [p["grad_diff"] for p in record["probes"]]
    return float(np.mean(vals)) if vals else float("nan")


@register
class Landscape(Experiment):
    name = "landscape"
    paper = "Santurkar et al. 2018, Fig. 4"
    summary = "With BN the loss changes less along the gradient, gradients stay predictive and β-smoothness is lower."
    setup = (
        "Taken from the paper (§3.1, Fig. 4): at points along training, move along the gradient with a "
        "few step sizes and measure the loss variation, the change of the gradient (predictiveness) and "
        "the effective β-smoothness, plain vs BN. Changed: an MLP with "
        f"{DEPTH} hidden layers of {WIDTH} ReLU units (He init) instead of VGG on CIFAR-10; SGD lr {LR}, "
        f"batch 64, {EPOCHS} epochs; every {EVERY} steps `normlab.diagnostics.landscape_probe` on a fixed "
        f"batch of 256 training samples (train mode) with step sizes {list(STEP_SIZES)}. The claims compare "
        "β averaged over the first 25 % of training, and the gradient change (predictiveness) averaged "
        "over the whole run, per seed. The ConvNet track (closer to the paper's "
        "VGG) measures the same on `normlab.lab.models.convnet` (plain vs BN; 2 stages on digits, 3 on "
        f"28×28 images average-pooled to 14×14), same schedule, probed every {CNN_EVERY} steps (the suite's time budget)."
    )
    paper_numbers = (
        "Santurkar et al. (VGG, CIFAR-10, Fig. 4): with BN the variation of the loss along the gradient, the "
        "change of the gradient and the effective β-smoothness are all markedly smaller throughout training, "
        "most visibly early on."
    )
    minutes_quick = 0.18  # MLP as before + ConvNet units (their share of a run)
    minutes_full = 0.3
    claims: ClassVar[tuple[Claim, ...]] = (
        Claim(
            "beta_ratio",
            "BN's effective β-smoothness is ≤ 0.7× plain's over the first 25 % of training",
            paper,
            "mean β (BN) / mean β (plain), first 25 % of the steps, per seed",
            "<=",
            0.7,
            "Fig. 4(c): BN's effective β-smoothness is markedly lower throughout training; no ratio",
            scale="log",
        ),
        Claim(
            "gradient_predictiveness",
            "BN's gradients stay more predictive along the step: they change less than plain's",
            paper,
            "max over step sizes of ‖∇L(θ) − ∇L(θ − ηg)‖₂, averaged over the run: BN / plain, per seed",
            "<",
            1.0,
            "Fig. 4(b): BN's gradient change along the step is markedly smaller throughout training; "
            "no ratio",
            threshold_origin="paper",
            scale="log",
        ),
    )
    claims = (*claims, *(c.for_model("cnn") for c in claims))

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        units = [
            {"norm": norm, "seeds": seeds, "epochs": EPOCHS, "setup": SETUP}
            for norm in ("none", "bn")
        ]
        return units + [
            {**cfg, "setup": {**cfg["setup"], "every": CNN_EVERY}}
            for cfg in model_units(units, dataset)
        ]

    def run(
        self, config: dict[str, Any], data: Dataset, *, progress: bool = False
    ) -> dict[str, Any]:
        seeds = config["seeds"]
        norm = config["norm"]
        models = [
            convnet(data.image_shape, data.num_classes, norm=norm, init="he", seed=s)
            if config.get("model", "mlp") == "cnn"
            else mlp(data.in_features, DEPTH, WIDTH, data.num_classes, norm=norm, init="he", seed=s)
            for s in seeds
        ]
        cfg = TrainConfig(
            optimizer="sgd", lr=LR, batch_size=64, epochs=config["epochs"], eval_every=None
        )
        total = cfg.total_steps(len(data.y_train))
        idx = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))[:256]
        probes: list[list[dict[str, Any]]] = [[] for _ in seeds]
        results, _ = train_ensemble(
            models,
            data,
            cfg,
            seeds=seeds,
            progress=progress,
            step_hook=landscape_hook(
                data.x_train[idx], data.y_train[idx], config["setup"]["every"], probes
            ),
        )
        return {
            "total_steps": total,
            "members": [
                {
                    "seed": r.seed,
                    "final_test_acc": r.final_test_acc,
                    "diverged": r.diverged,
                    "probes": p,
                }
                for r, p in zip(results, probes)
            ],
        }

    def _early_beta(self, record: dict[str, Any]) -> float:
        total = record["total_steps"]
        early = [p["beta"] for p in record["probes"] if p["step"] <= 0.25 * total]
        return float(np.mean(early)) if early else float("nan")

    def _by(self, results: Results) -> dict[str, list[dict[str, Any]]]:
        recs = [
            {**m, "total_steps": metrics["total_steps"], "config": cfg}
            for cfg, metrics in results
            for m in metrics["members"]
        ]
        return grouped(recs, lambda r: r["config"]["norm"])

    def _ratios(self, results: Results) -> list[float]:
        by = self._by(results)
        pairs = list(zip(by.get("none", []), by.get("bn", [])))
        return [self._early_beta(b) / self._early_beta(p) for p, b in pairs]

    def _changes(self, results: Results) -> list[float]:
        by = self._by(results)
        pairs = zip(by.get("none", []), by.get("bn", []))
        return [_mean_grad_diff(b) / _mean_grad_diff(p) for p, b in pairs]

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        checks = []
        for model in ("mlp", "cnn"):
            mine = by_model(results, model)
            checks.append(self.claim("beta_ratio", model=model).check(self._ratios(mine)))
            checks.append(
                self.claim("gradient_predictiveness", model=model).check(self._changes(mine))
            )
        return checks

    def table(self, results: Results) -> str:
        rows = []
        for model in ("mlp", "cnn"):
            for norm, recs in self._by(by_model(results, model)).items():
                rows.append([MODEL_LABELS[model], *self._row(norm, recs)])
        return md_table(
            [
                "network",
                "model",
                "β-smoothness, first 25%",
                "loss variation (mean)",
                "gradient change (mean)",
                "final test accuracy",
            ],
            rows,
        )

    def _row(self, norm: str, recs: list[dict[str, Any]]) -> list[str]:
        return [
            "BN" if norm == "bn" else "plain",
            fmt([self._early_beta(r) for r in recs]),
            fmt([float(np.mean([p["loss_range"] for p in r["probes"]])) for r in recs]),
            fmt([float(np.mean([p["grad_diff"] for p in r["probes"]])) for r in recs]),
            fmt([r["final_test_acc"] for r in recs]),
        ]

    def plot(self, results: Results, out_dir: Path) -> list[Path]:
        return [
            self._plot(by_model(results, model), model, out_dir)
            for model in ("mlp", "cnn")
            if by_model(results, model)
        ]

    def _plot(self, results: Results, model: str, out_dir: Path) -> Path:
        from ..plots import new_figure, save, seed_dots

        fig, axes = new_figure(1, 4, width=21)
        for norm, recs in self._by(results).items():
            steps = [p["step"] for p in recs[0]["probes"]]
            label = "BN" if norm == "bn" else "plain"
            for ax, key in zip(axes, ("loss_range", "grad_diff", "beta")):
                band(ax, steps, [[p[key] for p in r["probes"]] for r in recs], label=label)
        titles = (
            "(a) loss variation along the gradient",
            "(b) gradient predictiveness",
            "(c) effective β-smoothness",
        )
        ylabels = ("max − min of L(θ − ηg)", "max ‖∇L(θ) − ∇L(θ − ηg)‖₂", "max ‖Δ∇L‖ / ‖ηg‖")
        for ax, title, ylabel in zip(axes, titles, ylabels):
            ax.set_yscale("log")
            ax.set(
                title=f"{MODEL_LABELS[model]}: {title}",
                xlabel="training step",
                ylabel=f"{ylabel} (log scale)",
            )
            ax.legend(fontsize=8)
        ratios = self._ratios(results)
        seed_dots(axes[3], [("β(BN) / β(plain)", ratios)])
        axes[3].axhline(0.7, color="gray", ls=":", lw=1)
        axes[3].set_yscale("log")
        axes[3].set(title="(d) per seed: early β ratio (dotted: 0.7)", ylabel="ratio (log scale)")
        path = out_dir / ("landscape.png" if model == "mlp" else f"landscape_{model}.png")
        save(fig, path)
        return path
