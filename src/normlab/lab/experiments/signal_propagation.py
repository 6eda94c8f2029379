"""``signal_propagation`` — Glorot & Bengio 2010, Figs. 6–7: activations and gradients through a tanh net at init."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ... import init as ni
from ..data import Dataset
from ..models import mlp
from . import Claim, ClaimResult, Experiment, Results, register
from ._common import grouped, md_table, members, num

DEPTH, WIDTH = 5, 256
BAND = math.log(1.25)  # [0.8, 1.25] is |log ratio| <= log 1.25
SETUP = {"depth": DEPTH, "width": WIDTH}


def _init(model: nn.Sequential, scheme: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for layer in model:
        if isinstance(layer, nn.Linear):
            if (
                scheme == "standard"
            ):  # U[-1/sqrt(fan_in), 1/sqrt(fan_in)], the heuristic Glorot & Bengio start from
                ni.variance_scaling_(layer.weight, 1.0 / 3.0, "fan_in", "uniform", generator=gen)
            else:  # normalized init: U[±sqrt(6 / (fan_in + fan_out))]
                ni.xavier_uniform_(layer.weight, 1.0, generator=gen)
            nn.init.zeros_(layer.bias)


def propagate(
    model: nn.Sequential, x: torch.Tensor, y: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per hidden layer: the tanh outputs, and the back-propagated gradients ∂loss/∂(pre-activation)."""
    acts: list[torch.Tensor] = []
    pres: list[torch.Tensor] = []
    h = x
    for layer in model:
        h = layer(h)
        if isinstance(layer, nn.Linear) and len(pres) < DEPTH:
            h.retain_grad()
            pres.append(h)
        elif isinstance(layer, nn.Tanh):
            acts.append(h)
    F.cross_entropy(h, y).backward()
    return [a.detach() for a in acts], [p.grad.detach() for p in pres if p.grad is not None]


def _max_log_ratio(stds: list[float]) -> float:
    return max(abs(math.log(b / a)) for a, b in itertools.pairwise(stds))


@register
class SignalPropagation(Experiment):
    name = "signal_propagation"
    paper = "Glorot & Bengio 2010, Figs. 6-7"
    summary = (
        "Normalized (Glorot) init keeps activation and gradient scales constant across tanh layers."
    )
    setup = (
        f"Taken from the paper: a tanh MLP with {DEPTH} hidden layers at initialization, 'standard' init "
        "U[−1/√fan_in, 1/√fan_in] vs normalized (Glorot) init U[±√(6/(fan_in+fan_out))], biases 0, "
        "histograms of activations and back-propagated gradients per layer. Changed: width "
        f"{WIDTH} (the paper: 1000), the test set of digits as input. Gradients are "
        "∂(cross-entropy)/∂(pre-activation). Ratios compare consecutive hidden layers (std of layer l+1 / "
        "std of layer l); a band claim's statistic is max over layers of |ln(ratio)|, so ≤ ln 1.25 = "
        "0.223 means every ratio is in [0.8, 1.25]. All four are sanity checks: at initialization they "
        "follow from the variance arithmetic of the two schemes (Glorot & Bengio's derivation), not from "
        "training."
    )
    paper_numbers = (
        "Glorot & Bengio (Fig. 6): with the standard init the activation values shrink layer by layer, with "
        "normalized init they keep their spread; (Fig. 7) back-propagated gradients get smaller toward the "
        "input with the standard init and stay similar with normalized init."
    )
    minutes_quick = 0.01
    minutes_full = 0.01
    claims = (
        Claim(
            "glorot_activation_band",
            "Glorot: every hidden-to-hidden activation-std ratio is in [0.8, 1.25]",
            paper,
            "max over layers of |ln(std ratio)|, consecutive hidden layers (≤ ln 1.25 = 0.223)",
            "<=",
            BAND,
            "Fig. 6: with normalized init the activation histograms keep their spread; no number",
            kind="sanity",
        ),
        Claim(
            "standard_activation_decay",
            "Standard init: last/first hidden activation std < 0.5",
            paper,
            "std(tanh output, layer 5) / std(layer 1)",
            "<",
            0.5,
            "Fig. 6: with the standard init activations shrink layer by layer; no number",
            kind="sanity",
            scale="log",
        ),
        Claim(
            "standard_gradient_shrink",
            "Standard init: gradients shrink toward the input (first/last < 0.5)",
            paper,
            "std(gradient, layer 1) / std(gradient, layer 5)",
            "<",
            0.5,
            "Fig. 7: with the standard init gradients get smaller toward the input; no number",
            kind="sanity",
            scale="log",
        ),
        Claim(
            "glorot_gradient_band",
            "Glorot: every hidden-to-hidden gradient-std ratio is in [0.8, 1.25]",
            paper,
            "max over layers of |ln(std ratio)| of back-propagated gradients (≤ 0.223)",
            "<=",
            BAND,
            "Fig. 7: with normalized init gradients stay similar across layers; no number",
            kind="sanity",
        ),
    )

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        return [{"init": init, "seeds": seeds, "setup": SETUP} for init in ("standard", "glorot")]

    def run(
        self, config: dict[str, Any], data: Dataset, *, progress: bool = False
    ) -> dict[str, Any]:
        out = []
        for seed in config["seeds"]:
            model = mlp(
                data.in_features, DEPTH, WIDTH, data.num_classes, activation="tanh", seed=seed
            )
            _init(model, config["init"], seed)
            acts, grads = propagate(model, data.x_test, data.y_test)
            record: dict[str, Any] = {
                "seed": seed,
                "act_std": [float(a.std()) for a in acts],
                "grad_std": [float(g.std()) for g in grads],
            }
            if seed == config["seeds"][0]:  # histograms for the figure
                record["act_hist"] = [
                    np.histogram(a.numpy(), bins=40, range=(-1, 1))[0].tolist() for a in acts
                ]
                lim = max(float(g.abs().max()) for g in grads)
                record["grad_hist"] = [
                    np.histogram(g.numpy(), bins=40, range=(-lim, lim))[0].tolist() for g in grads
                ]
                record["grad_lim"] = lim
            out.append(record)
        return {"members": out}

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        g = grouped(members(results), lambda r: r["config"]["init"])
        return [
            self.claim("glorot_activation_band").check(
                [_max_log_ratio(r["act_std"]) for r in g["glorot"]]
            ),
            self.claim("standard_activation_decay").check(
                [r["act_std"][-1] / r["act_std"][0] for r in g["standard"]]
            ),
            self.claim("standard_gradient_shrink").check(
                [r["grad_std"][0] / r["grad_std"][-1] for r in g["standard"]]
            ),
            self.claim("glorot_gradient_band").check(
                [_max_log_ratio(r["grad_std"]) for r in g["glorot"]]
            ),
        ]

    def table(self, results: Results) -> str:
        rows = []
        for init, recs in grouped(members(results), lambda r: r["config"]["init"]).items():
            act = np.mean([r["act_std"] for r in recs], axis=0)
            grad = np.mean([r["grad_std"] for r in recs], axis=0)
            act_ratios = act[1:] / act[:-1]
            grad_ratios = grad[1:] / grad[:-1]
            rows.append(
                [
                    init,
                    " ".join(num(float(v)) for v in act),
                    f"{num(float(act_ratios.min()))}–{num(float(act_ratios.max()))}",
                    " ".join(num(float(v)) for v in grad),
                    f"{num(float(grad_ratios.min()))}–{num(float(grad_ratios.max()))}",
                ]
            )
        return md_table(
            [
                "init",
                "activation std, layers 1→5 (seed mean)",
                "activation ratios",
                "gradient std, layers 1→5",
                "gradient ratios",
            ],
            rows,
        )

    def plot(self, results: Results, out_dir: Path) -> list[Path]:
        from ..plots import new_figure, same_ylim, save

        fig, axes = new_figure(2, 2, width=12, height=7)
        for col, (init, recs) in enumerate(
            grouped(members(results), lambda r: r["config"]["init"]).items()
        ):
            r = recs[0]
            centers = np.linspace(-1, 1, 41)[:-1] + 1 / 40
            for layer, counts in enumerate(r["act_hist"], 1):
                axes[col].plot(centers, counts, label=f"layer {layer}")
            axes[col].set(
                title=f"Activation values, {init} init (Fig. 6)",
                xlabel="tanh output",
                ylabel="count (test set × units)",
            )
            lim = r["grad_lim"]
            gcenters = np.linspace(-lim, lim, 41)[:-1] + lim / 40
            for layer, counts in enumerate(r["grad_hist"], 1):
                axes[2 + col].plot(gcenters, counts, label=f"layer {layer}")
            axes[2 + col].set_yscale("log")
            axes[2 + col].set(
                title=f"Back-propagated gradients, {init} init (Fig. 7)",
                xlabel="∂loss/∂pre-activation",
                ylabel="count (log scale)",
            )
        for ax in axes:
            ax.legend(fontsize=7)
        same_ylim(axes[0], axes[1])
        same_ylim(axes[2], axes[3])
        path = out_dir / "signal_propagation.png"
        save(fig, path)
        return [path]
