"""``noisy_bn`` — Santurkar et al. 2018, Fig. 2: BN still works when noise *creates* covariate shift after it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data import Dataset
from ..ensemble import EnsembleMLP, TrainConfig, train_ensemble
from ..models import mlp
from . import Claim, ClaimResult, Experiment, Results, register
from ._common import band, fmt, grouped, md_table, members

DEPTH, WIDTH, LR = 8, 100, 0.3
ARMS = ("plain", "bn", "noisy_bn")
LABELS = {"plain": "plain", "bn": "BN", "noisy_bn": "BN + noise"}


class _NoiseState:
    """The current noise of every member: per-unit shift ``m_t`` and scale ``s_t``, ``(K, C)`` each.

    Member ``k`` draws its noise from its own generator (seeded with its run seed), so seeds differ
    in their noise as in their initialization. Deep copies return the same object: the ensemble's
    copy of :class:`NoiseInjection` sees every resample.
    """

    def __init__(self, width: int, seeds: Sequence[int]) -> None:
        self.gens = [torch.Generator().manual_seed(10_000 + int(s)) for s in seeds]
        self.width = width
        self.resample()

    def resample(self) -> None:
        """Draw a new non-zero mean m_t ~ N(0, 0.5²) and non-unit scale s_t = exp(U(−0.7, 0.7)) per unit."""
        w = self.width
        self.shift = torch.stack([torch.randn(w, generator=g) * 0.5 for g in self.gens])
        self.scale = torch.stack(
            [torch.exp(torch.empty(w).uniform_(-0.7, 0.7, generator=g)) for g in self.gens]
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> _NoiseState:
        return self


class NoiseInjection(nn.Module):
    """``y ↦ s_t ⊙ y + m_t`` in training mode, identity in eval mode (Santurkar et al. 2018, §2.1).

    ``y`` is ``(K, N, C)`` inside an ensemble (member ``k`` gets row ``k`` of the noise) or ``(N, C)``
    for a single model (row 0). The noise changes whenever :meth:`_NoiseState.resample` runs (every
    step, from the trainer's ``step_hook``), so the distribution the next layer sees moves over time.
    """

    def __init__(self, state: _NoiseState) -> None:
        super().__init__()
        self.state = state

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        scale, shift = self.state.scale.to(x.dtype), self.state.shift.to(x.dtype)  # (K, C)
        if x.dim() == 3:  # (K, N, C)
            if x.shape[0] != scale.shape[0]:
                raise ValueError(
                    f"NoiseInjection holds noise for {scale.shape[0]} members, got {x.shape[0]}"
                )
            return x * scale.unsqueeze(1) + shift.unsqueeze(1)
        return x * scale[0] + shift[0]


def _model(data: Dataset, arm: str, seed: int, state: _NoiseState | None) -> nn.Sequential:
    base = mlp(
        data.in_features,
        DEPTH,
        WIDTH,
        data.num_classes,
        norm="none" if arm == "plain" else "bn",
        init="he",
        seed=seed,
    )
    if arm != "noisy_bn":
        return base
    layers: list[nn.Module] = []
    for layer in base:
        layers.append(layer)
        if hasattr(layer, "running_mean"):
            assert state is not None
            layers.append(NoiseInjection(state))
    return nn.Sequential(*layers)


def relu_inputs(ens: EnsembleMLP, x: Tensor) -> list[Tensor]:
    """The input of every ReLU, ``(K, N, C)``, as the network computes it in training (noise included);
    running statistics are restored afterwards."""
    saved = [b.clone() for b in ens.buffers()]
    was = ens.training
    ens.train()
    out, h = [], ens._input(x)
    with torch.no_grad():
        for layer in ens.layers:
            if isinstance(layer, nn.ReLU):
                out.append(h)
            h = layer(h)
        for b, s in zip(ens.buffers(), saved):
            b.copy_(s)
    ens.train(was)
    return out


QUANTILES = (0.05, 0.15, 0.5, 0.85, 0.95)
TRACKED = (DEPTH // 2, 0)  # (hidden layer, unit) whose ReLU-input distribution is plotted over time


def instability_probe(x: Tensor) -> Any:
    """Per member: each unit's mean and std of its ReLU input over ``x`` (every layer), and the
    :data:`QUANTILES` of the :data:`TRACKED` unit's ReLU input (the histograms of Santurkar et al.'s Fig. 2)."""
    q = torch.tensor(QUANTILES)

    def probe(step: int, ens: EnsembleMLP) -> list[dict[str, Any]]:
        hs = relu_inputs(ens, x)  # per layer (K, N, C)
        stats = [(h.mean(1), h.std(1)) for h in hs]  # per layer: (K, C) each
        layer, unit = TRACKED
        quant = torch.quantile(hs[layer][:, :, unit], q, dim=1).T  # (K, len(QUANTILES))
        return [
            {
                "moments": [[m[k].tolist(), s[k].tolist()] for m, s in stats],
                "quantiles": quant[k].tolist(),
            }
            for k in range(ens.k)
        ]

    return probe


def instability(history: list[Any]) -> float:
    """Mean over layers, units and consecutive evaluations of |Δmean| + |Δstd| (Santurkar et al.'s Fig. 2
    histograms as one number)."""
    arr = np.asarray(history, dtype=np.float64)  # (T, L, 2, C)
    diff = np.abs(np.diff(arr, axis=0))  # (T-1, L, 2, C)
    return float(diff.sum(axis=2).mean())


@register
class NoisyBN(Experiment):
    name = "noisy_bn"
    paper = "Santurkar et al. 2018, Fig. 2"
    summary = (
        "BN's benefit is not from reducing 'internal covariate shift': injecting noise that makes the "
        "layer inputs' distributions jump at every step barely hurts BN, which still beats plain training."
    )
    setup = (
        f"MLP with {DEPTH} hidden layers of {WIDTH} ReLU units, He init, SGD lr {LR} (a high rate), batch 64, "
        "10 epochs; plain vs BN vs BN + noise: after every BN, y ↦ s_t ⊙ y + m_t with a new per-unit scale "
        "s_t = exp(U(−0.7, 0.7)) and shift m_t ~ N(0, 0.5²) at every step (each seed its own noise "
        "sequence; off in eval mode). Distributional instability: mean over layers, units and consecutive "
        "evaluations (every 20 steps, the test set, network as it trains) of |Δmean| + |Δstd| of each ReLU's "
        "input. A run that diverges counts as accuracy 0."
    )
    paper_numbers = (
        "Santurkar et al. (VGG, CIFAR-10): 'noisy' BN networks reach essentially the same accuracy as standard "
        "BN networks and both outperform the unnormalized network, although the noisy network's activation "
        "distributions are far less stable (Fig. 2)."
    )
    minutes_quick = 0.1
    minutes_full = 0.15
    claims = (
        Claim(
            "noisy_matches_bn",
            "Noisy BN's final accuracy is within 0.02 of BN's",
            paper,
            "|accuracy(BN) − accuracy(BN + noise)|",
            "<=",
            0.02,
        ),
        Claim(
            "noisy_unstable",
            "Noisy BN's distributional instability is ≥ 3× plain's",
            paper,
            "instability(BN + noise) / instability(plain)",
            ">=",
            3.0,
        ),
        Claim(
            "both_beat_plain",
            "Both BN and noisy BN beat plain at this high learning rate",
            paper,
            "min(accuracy(BN), accuracy(BN + noise)) − accuracy(plain)",
            ">",
            0.0,
        ),
    )

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        return [{"arm": arm, "seeds": seeds, "epochs": 10} for arm in ARMS]

    def run(
        self, config: dict[str, Any], data: Dataset, *, progress: bool = False
    ) -> dict[str, Any]:
        arm = config["arm"]
        state = _NoiseState(WIDTH, config["seeds"]) if arm == "noisy_bn" else None
        models = [_model(data, arm, s, state) for s in config["seeds"]]
        cfg = TrainConfig(
            optimizer="sgd", lr=LR, batch_size=64, epochs=config["epochs"], eval_every=20
        )
        hook = (lambda step, ens: state.resample()) if state is not None else None
        results, _ = train_ensemble(
            models,
            data,
            cfg,
            seeds=config["seeds"],
            probe=instability_probe(data.x_test[:2000]),
            step_hook=hook,
            progress=progress,
        )
        return {
            "members": [
                {
                    "seed": r.seed,
                    "final_test_acc": 0.0 if r.diverged else r.final_test_acc,
                    "diverged": r.diverged,
                    "steps": r.steps,
                    "test_acc": r.test_acc,
                    "instability": instability(r.probes["moments"]) if not r.diverged else None,
                    "unit_quantiles": r.probes["quantiles"],  # (T, len(QUANTILES))
                }
                for r in results
            ]
        }

    def _by(self, results: Results) -> dict[str, list[dict[str, Any]]]:
        return grouped(members(results), lambda r: r["config"]["arm"])

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        by = self._by(results)
        acc = {arm: [r["final_test_acc"] for r in recs] for arm, recs in by.items()}
        gap = [abs(b - n) for b, n in zip(acc["bn"], acc["noisy_bn"])]
        # over the seeds where plain training did not diverge (a diverged run has no distribution to measure)
        ratio = [
            n["instability"] / p["instability"]
            for n, p in zip(by["noisy_bn"], by["plain"])
            if p["instability"] and n["instability"]
        ]
        margin = [min(b, n) - p for b, n, p in zip(acc["bn"], acc["noisy_bn"], acc["plain"])]
        return [
            self.claim("noisy_matches_bn").check(gap),
            self.claim("noisy_unstable").check(ratio),
            self.claim("both_beat_plain").check(margin),
        ]

    def table(self, results: Results) -> str:
        rows = []
        for arm, recs in self._by(results).items():
            div = sum(r["diverged"] for r in recs)
            rows.append(
                [
                    LABELS[arm],
                    fmt([r["final_test_acc"] for r in recs])
                    + (f" ({div} diverged)" if div else ""),
                    fmt([r["instability"] for r in recs], 3),
                ]
            )
        return md_table(["model", "final test accuracy", "distributional instability"], rows)

    def plot(self, results: Results, out_dir: Path) -> list[Path]:
        from ..plots import new_figure, save

        by = self._by(results)
        fig, axes = new_figure(2, 2, width=12, height=8)
        for arm, recs in by.items():
            band(axes[0], recs[0]["steps"], [r["test_acc"] for r in recs], label=LABELS[arm])
        axes[0].set(
            title=f"Test accuracy at lr {LR} (mean ± std over seeds)",
            xlabel="training step",
            ylabel="test accuracy",
            ylim=(0, 1.02),
        )
        axes[0].legend()
        layer, unit = TRACKED
        for ax, (arm, recs) in zip(axes[1:], by.items()):
            q = np.asarray(recs[0]["unit_quantiles"], dtype=float)  # (T, 5): first seed
            steps = recs[0]["steps"][: len(q)]
            ax.fill_between(steps, q[:, 0], q[:, 4], alpha=0.2, color="C0", label="5–95 %")
            ax.fill_between(steps, q[:, 1], q[:, 3], alpha=0.4, color="C0", label="15–85 %")
            ax.plot(steps, q[:, 2], color="C0", label="median")
            ax.set(
                title=f"{LABELS[arm]}: ReLU input of layer {layer + 1}, unit {unit} (seed {recs[0]['seed']})\n"
                f"instability over seeds: {fmt([r['instability'] for r in recs], 2)}",
                xlabel="training step",
                ylabel="ReLU input (quantiles)",
            )
            ax.legend(fontsize=8)
        path = out_dir / "noisy_bn.png"
        save(fig, path)
        return [path]
