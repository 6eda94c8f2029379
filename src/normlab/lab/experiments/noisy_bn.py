"""``noisy_bn`` — Santurkar et al. 2018, §2.1 and Fig. 2: BN still works when noise *creates*
covariate shift after it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..data import Dataset
from ..ensemble import Ensemble, StackedLayer, TrainConfig, train_ensemble
from ..models import convnet, mlp
from . import Claim, ClaimResult, Experiment, Results, register
from ._common import MODEL_LABELS, band, by_model, fmt, grouped, md_table, members, model_units
from .convergence import inputs_of

__all__ = ["NoiseInjection", "NoisyBN", "StackedNoise", "instability", "instability_probe"]

DEPTH, WIDTH, BATCH, STEPS, EVERY = 8, 100, 64, 800, 40
LR_LOW, LR_HIGH = 0.1, 0.3
ARMS = ("plain", "bn", "noisy_bn")
LABELS = {"plain": "plain", "bn": "BN", "noisy_bn": "BN + noise"}
MEAN_RANGE, SCALE_RANGE, SPREAD = 0.5, (0.5, 1.5), 0.1
SETUP = {
    "depth": DEPTH,
    "width": WIDTH,
    "batch": BATCH,
    "every": EVERY,
    "noise": [MEAN_RANGE, *SCALE_RANGE, SPREAD],
    "stacked_noise": 2,
}


def _noise(gen: torch.Generator, k: int, n: int, width: int) -> tuple[Tensor, Tensor]:
    """``(scale, shift)``, ``(k, n, width)`` each, on the CPU: the distribution's parameters ``(k, 1,
    width)`` drawn first, then the per-sample noise around them (module docstring of
    :class:`NoiseInjection`); a unit is a feature, or an image's channel."""
    params = torch.rand(2, k, 1, width, generator=gen)
    mu = (params[0] * 2 - 1) * MEAN_RANGE
    sigma = SCALE_RANGE[0] + params[1] * (SCALE_RANGE[1] - SCALE_RANGE[0])
    noise = torch.randn(2, k, n, width, generator=gen) * SPREAD
    return sigma + noise[0], mu + noise[1]


def _apply(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x·scale + shift`` with ``(…, N, C)`` noise, the same at every position of an image."""
    if x.dim() == 4:
        scale, shift = scale[..., None, None], shift[..., None, None]
    return x * scale.to(x) + shift.to(x)


class NoiseInjection(nn.Module):
    """Time-varying noise after a batch norm (Santurkar et al. 2018, §2.1), identity in eval mode.

    In training, every activation of every sample gets ``y ↦ s·y + m`` with ``s ~ N(σ_t, 0.1²)``
    and ``m ~ N(μ_t, 0.1²)`` drawn i.i.d. per sample and unit (a feature of ``(N, C)``; a channel
    of ``(N, C, H, W)``, the same for all its positions), where the distribution's parameters
    ``μ_t ~ U(−0.5, 0.5)`` and ``σ_t ~ U(0.5, 1.5)`` are drawn anew per unit at every training
    forward (every step): a non-zero mean and non-unit variance that change all the time. The
    draws come from the layer's own generator (``seed``). Opts into stacking with :meth:`stack`.
    """

    def __init__(self, width: int, seed: int) -> None:
        super().__init__()
        self.width, self.seed = width, int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def forward(self, x: Tensor) -> Tensor:  # (N, C) or (N, C, H, W)
        if not self.training:
            return x
        scale, shift = _noise(self.generator, 1, x.shape[0], self.width)
        return _apply(x, scale[0], shift[0])

    @classmethod
    def stack(cls, layers: Sequence[NoiseInjection]) -> StackedNoise:
        return StackedNoise(layers)


class StackedNoise(StackedLayer):
    """K :class:`NoiseInjection` layers on ``(K, N, C)``: every member its own noise, drawn for all
    members at once from one generator seeded by the members' seeds (two draws per step instead of
    two per member). A member's noise sequence therefore depends on its companions — seeds are
    random draws — and the members' own generators are left as they were."""

    def __init__(self, layers: Sequence[NoiseInjection]) -> None:
        super().__init__()
        self.width, self.k = layers[0].width, len(layers)
        seed = hash(tuple(layer.seed for layer in layers)) % (2**62)  # ints hash the same every run
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: Tensor) -> Tensor:  # (K, N, C), or images (N, K·C, H, W)
        if not self.training:
            return x
        if x.dim() == 3:
            scale, shift = _noise(self.generator, x.shape[0], x.shape[1], self.width)
            return _apply(x, scale, shift)
        n = x.shape[0]
        drawn = _noise(self.generator, self.k, n, self.width)  # (K, N, C)
        scale, shift = (t.transpose(0, 1).reshape(n, self.k * self.width) for t in drawn)
        return _apply(x, scale, shift)  # (N, K·C, H, W)


def model(data: Dataset, arm: str, seed: int, net: str = "mlp") -> nn.Sequential:
    """The arm's network (``net``: the MLP or the ConvNet): plain (Linear or Conv → ReLU), BN, or BN
    followed by :class:`NoiseInjection`."""
    norm = "none" if arm == "plain" else "bn"
    base = (
        convnet(data.image_shape, data.num_classes, norm=norm, init="he", seed=seed)
        if net == "cnn"
        else mlp(data.in_features, DEPTH, WIDTH, data.num_classes, norm=norm, init="he", seed=seed)
    )
    if arm != "noisy_bn":
        return base
    layers: list[nn.Module] = []
    for layer in base:
        layers.append(layer)
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            width = int(layer.num_features)
            layers.append(NoiseInjection(width, 10_000 * (seed + 1) + len(layers)))
    return nn.Sequential(*layers)


QUANTILES = (0.05, 0.15, 0.5, 0.85, 0.95)
TRACKED = (DEPTH // 2, 0)  # (hidden layer, unit) whose ReLU-input distribution is plotted over time
CNN_TRACKED = (1, 0)  # the ConvNet's second stage, channel 0
CNN_STEPS = (
    200  # the ConvNet's budget: 10 epochs on digits (the suite's time budget; see the setup)
)


def instability_probe(x: Tensor, tracked: tuple[int, int] = TRACKED) -> Any:
    """Per member: each unit's mean and std of its ReLU input over ``x`` (every layer), measured on the
    network as it trains (batch statistics, noise included; buffers restored), and the
    :data:`QUANTILES` of the :data:`TRACKED` unit's ReLU input (Santurkar et al.'s Fig. 2 histograms).
    In a ConvNet a unit is a channel, its values those of every sample and position."""
    q = torch.tensor(QUANTILES)

    def units(h: Tensor) -> Tensor:  # (K, N, C) as it is; (K, N, C, H, W) -> (K, N·H·W, C)
        return h if h.dim() == 3 else h.movedim(2, -1).reshape(h.shape[0], -1, h.shape[2])

    def probe(step: int, ens: Ensemble) -> list[dict[str, Any]]:
        outputs = ens.outputs(x, train=True)
        hs = [units(h) for h in inputs_of(ens, outputs, nn.ReLU)]  # per layer (K, N, C)
        stats = [(h.mean(1), h.std(1)) for h in hs]  # per layer: (K, C) each
        layer, unit = tracked
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
    """Mean over layers, units and consecutive probes of |Δmean| + |Δstd| of the ReLU inputs
    (Santurkar et al.'s Fig. 2 histograms as one number); every unit weighs the same when layers differ
    in width (the ConvNet's)."""
    moves = []
    for layer in range(len(history[0])):
        arr = np.asarray([h[layer] for h in history], dtype=np.float64)  # (T, 2, C)
        moves.append(np.abs(np.diff(arr, axis=0)).sum(axis=1).ravel())
    return float(np.concatenate(moves).mean())


@register
class NoisyBN(Experiment):
    name = "noisy_bn"
    paper = "Santurkar et al. 2018, §2.1 and Fig. 2"
    summary = (
        "BN's benefit does not come from reducing 'internal covariate shift': noise that makes every "
        "layer's input distribution jump at every step barely hurts BN, which still beats plain training."
    )
    setup = (
        "Taken from the paper (§2.1, Fig. 2): plain vs BN vs 'noisy' BN, whose noise after every BN is "
        "i.i.d. per sample and unit, with a non-zero mean and a non-unit variance whose parameters are "
        "redrawn at every step (our reading of the paper's description; the magnitudes are ours: "
        "y ↦ s·y + m, s ~ N(σ_t, 0.1²), m ~ N(μ_t, 0.1²), μ_t ~ U(−0.5, 0.5), σ_t ~ U(0.5, 1.5) per unit "
        "and step; off in eval mode). Changed: an MLP with 8 hidden layers of 100 ReLU units (He init) "
        f"instead of VGG on CIFAR-10; plain SGD, batch {BATCH}, {STEPS} steps (40 epochs on digits, by which "
        f"BN's training loss has flattened below 0.02: the training set is nearly fit); two learning rates: {LR_LOW}, where plain trains "
        "best within the noise (a sweep of plain on digits at this budget, 5 seeds: seed-mean accuracy "
        "0.960, 0.966, 0.969, 0.972, 0.976 at lr 0.01, 0.02, 0.05, 0.1, 0.2; two of five seeds diverge at "
        f"0.3), and {LR_HIGH}, a high rate. Distributional instability: "
        f"every {EVERY} steps each unit's mean and std of its ReLU input on the test set (network as it "
        "trains, noise included), mean |Δmean| + |Δstd| over layers, units and consecutive probes. A "
        "diverged run scores chance accuracy (1/classes). Both learning rates of an arm train as one "
        "batched ensemble. The ConvNet track runs the same arms, noise and learning rates on "
        "`normlab.lab.models.convnet` (Santurkar et al.'s own setting is a VGG: conv → BN → ReLU; ours "
        "has 2 stages on digits, 3 on 28×28 images average-pooled to 14×14), a unit being a channel: its noise drawn per sample "
        "and channel, the same at all its positions (the paper perturbs every activation i.i.d.; one "
        "draw per channel keeps the noise's cost small), its instability over every sample and "
        f"position; {CNN_STEPS} steps "
        "(a quarter of the MLP's, 10 epochs on digits, for the suite's time budget; the learning rates were not swept for it)."
    )
    paper_numbers = (
        "Santurkar et al. (VGG, CIFAR-10, Fig. 2): the 'noisy' BN network's accuracy curves lie on "
        "standard BN's and both beat the unnormalized network, although the noisy network's activation "
        "histograms are far less stable (no numbers given)."
    )
    minutes_quick = 0.9  # MLP as before + ConvNet units (their share of a run)
    minutes_full = 1.7
    claims: ClassVar[tuple[Claim, ...]] = (
        Claim(
            "noisy_matches_bn",
            f"At lr {LR_LOW}, noisy BN's accuracy is within ±0.02 of BN's",
            paper,
            f"accuracy(BN) − accuracy(BN + noise) at lr {LR_LOW}, paired by seed (equivalence: the "
            "interval inside ±0.02)",
            "within",
            0.02,
            "Fig. 2: the noisy network's accuracy curves lie on standard BN's; no number",
        ),
        Claim(
            "noisy_less_stable",
            f"At lr {LR_LOW}, noisy BN's layer inputs are less stable than plain's",
            paper,
            f"instability(BN + noise) / instability(plain) at lr {LR_LOW}, per seed",
            ">",
            1.0,
            "Fig. 2 (right): the noisy network's histograms move far more than the plain network's",
            threshold_origin="paper",
            scale="log",
        ),
        Claim(
            "bn_beats_plain_high_lr",
            f"At lr {LR_HIGH}, BN is more accurate than plain",
            paper,
            f"accuracy(BN) − accuracy(plain) at lr {LR_HIGH}, paired by seed",
            ">",
            0.0,
            "Fig. 2 (left): BN trains faster and better than the unnormalized network",
            threshold_origin="paper",
        ),
        Claim(
            "noisy_beats_plain_high_lr",
            f"At lr {LR_HIGH}, noisy BN is more accurate than plain",
            paper,
            f"accuracy(BN + noise) − accuracy(plain) at lr {LR_HIGH}, paired by seed",
            ">",
            0.0,
            "Fig. 2 (left): the noisy BN network also beats the unnormalized one",
            threshold_origin="paper",
        ),
    )

    claims = (*claims, *(c.for_model("cnn") for c in claims))

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        def units(steps: int) -> list[dict[str, Any]]:
            return [
                {
                    "arm": arm,
                    "seeds": seeds,
                    "lrs": [LR_LOW, LR_HIGH],
                    "steps": steps,
                    "setup": SETUP,
                }
                for arm in ARMS
            ]

        return units(STEPS) + model_units(units(CNN_STEPS), dataset, noise="per sample and channel")

    def run(
        self, config: dict[str, Any], data: Dataset, *, progress: bool = False
    ) -> dict[str, Any]:
        net = config.get("model", "mlp")
        combos = [(lr, s) for lr in config["lrs"] for s in config["seeds"]]
        models = [model(data, config["arm"], s, net) for _, s in combos]
        cfg = TrainConfig(
            optimizer="sgd",
            lr=[lr for lr, _ in combos],
            batch_size=BATCH,
            steps=config["steps"],
            eval_every=EVERY,
            eval_samples=2000,
        )
        results, _ = train_ensemble(
            models,
            data,
            cfg,
            seeds=[s for _, s in combos],
            probe=instability_probe(data.x_test[:2000], TRACKED if net == "mlp" else CNN_TRACKED),
            probe_every=EVERY,
            progress=progress,
        )
        chance = 1.0 / data.num_classes
        return {
            "members": [
                {
                    "lr": lr,
                    "seed": s,
                    "final_test_acc": chance if r.diverged else r.final_test_acc,
                    "diverged": r.diverged,
                    "steps": r.steps,
                    "test_acc": r.test_acc,
                    "train_loss": r.train_loss,
                    "instability": None if r.diverged else instability(r.probes["moments"]),
                    "probe_steps": r.probe_steps,
                    "unit_quantiles": r.probes["quantiles"],  # (T, len(QUANTILES))
                }
                for (lr, s), r in zip(combos, results)
            ],
            "tracked": list(TRACKED if net == "mlp" else CNN_TRACKED),
        }

    def _by(self, results: Results) -> dict[tuple[str, float], list[dict[str, Any]]]:
        """Member records by (arm, lr), of one model's units (:func:`._common.by_model`)."""
        return grouped(members(results), lambda r: (r["config"]["arm"], float(r["lr"])))

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        found = {
            c.claim.name: c
            for model in ("mlp", "cnn")
            for c in self._evaluate_model(by_model(results, model), model)
        }
        return [found[c.name] for c in self.claims]

    def _evaluate_model(self, results: Results, model: str) -> list[ClaimResult]:
        """``model``'s claims from its units (none, e.g. no images: no values, inconclusive)."""
        by = self._by(results)

        def acc(arm: str, lr: float) -> list[float]:
            return [r["final_test_acc"] for r in by.get((arm, lr), [])]

        def diff(a: list[float], b: list[float]) -> list[float]:
            return [x - y for x, y in zip(a, b)]

        ratio = [
            n["instability"] / p["instability"] if n["instability"] and p["instability"] else None
            for n, p in zip(by.get(("noisy_bn", LR_LOW), []), by.get(("plain", LR_LOW), []))
        ]
        return [
            self.claim("noisy_matches_bn", model=model).check(
                diff(acc("bn", LR_LOW), acc("noisy_bn", LR_LOW))
            ),
            self.claim("noisy_less_stable", model=model).check(ratio),
            self.claim("bn_beats_plain_high_lr", model=model).check(
                diff(acc("bn", LR_HIGH), acc("plain", LR_HIGH))
            ),
            self.claim("noisy_beats_plain_high_lr", model=model).check(
                diff(acc("noisy_bn", LR_HIGH), acc("plain", LR_HIGH))
            ),
        ]

    def table(self, results: Results) -> str:
        rows = []
        for model in ("mlp", "cnn"):
            for (arm, lr), recs in self._by(by_model(results, model)).items():
                rows.append(self._row(MODEL_LABELS[model], arm, lr, recs))
        return md_table(
            ["network", "model", "lr", "final test accuracy", "distributional instability"], rows
        )

    @staticmethod
    def _row(network: str, arm: str, lr: float, recs: list[dict[str, Any]]) -> list[str]:
        div = sum(r["diverged"] for r in recs)
        accuracy = fmt([r["final_test_acc"] for r in recs]) + (f" ({div} diverged)" if div else "")
        return [network, LABELS[arm], str(lr), accuracy, fmt([r["instability"] for r in recs])]

    def plot(self, results: Results, out_dir: Path) -> list[Path]:
        paths = []
        for model in ("mlp", "cnn"):
            units = by_model(results, model)
            if units:
                tracked = units[0][1].get("tracked", TRACKED)
                paths.append(self._plot(self._by(units), model, tuple(tracked), out_dir))
        return paths

    def _plot(
        self,
        by: dict[tuple[str, float], list[dict[str, Any]]],
        model: str,
        tracked: tuple[int, ...],
        out_dir: Path,
    ) -> Path:
        from ..plots import new_figure, same_ylim, save, seed_dots

        fig, axes = new_figure(2, 4, width=22, height=9)
        for col, lr in enumerate((LR_LOW, LR_HIGH)):
            groups = [(LABELS[a], [r["final_test_acc"] for r in by[(a, lr)]]) for a in ARMS]
            seed_dots(axes[col], groups)
            axes[col].set(
                title=f"{MODEL_LABELS[model]}: final test accuracy at lr {lr} (dots: seeds)",
                ylabel="test accuracy",
            )
        same_ylim(axes[0], axes[1])

        def diff(a: str, b: str, lr: float) -> list[float]:
            return [
                x["final_test_acc"] - y["final_test_acc"] for x, y in zip(by[(a, lr)], by[(b, lr)])
            ]

        seed_dots(
            axes[2],
            [
                (f"BN − noisy\nlr {LR_LOW}", diff("bn", "noisy_bn", LR_LOW)),
                (f"BN − plain\nlr {LR_HIGH}", diff("bn", "plain", LR_HIGH)),
                (f"noisy − plain\nlr {LR_HIGH}", diff("noisy_bn", "plain", LR_HIGH)),
            ],
            zero_line=True,
        )
        for bound in (-0.02, 0.02):
            axes[2].axhline(bound, color="gray", ls="--", lw=0.8)
        axes[2].set(title="Paired by seed (dashed: ±0.02)", ylabel="accuracy difference")
        seed_dots(axes[3], [(LABELS[a], [r["instability"] for r in by[(a, LR_LOW)]]) for a in ARMS])
        axes[3].set(
            title=f"Distributional instability at lr {LR_LOW}", ylabel="mean |Δmean| + |Δstd|"
        )
        layer, unit = tracked
        for ax, arm in zip(axes[4:7], ARMS):
            r = by[(arm, LR_LOW)][0]
            q = np.asarray(r["unit_quantiles"], dtype=float)  # (T, 5): the first seed
            steps = r["probe_steps"][: len(q)]
            ax.fill_between(steps, q[:, 0], q[:, 4], alpha=0.2, color="C0", label="5–95 %")
            ax.fill_between(steps, q[:, 1], q[:, 3], alpha=0.4, color="C0", label="15–85 %")
            ax.plot(steps, q[:, 2], color="C0", label="median")
            ax.set(
                title=f"{LABELS[arm]}, lr {LR_LOW}: ReLU input, layer {layer + 1}, "
                f"{'unit' if model == 'mlp' else 'channel'} {unit} "
                f"(seed {r['seed']})",
                xlabel="training step",
                ylabel="ReLU input (percentiles)",
            )
            ax.legend(fontsize=8)
        same_ylim(*axes[4:7])
        for arm in ARMS:
            recs = by[(arm, LR_LOW)]
            band(axes[7], recs[0]["steps"], [r["train_loss"] for r in recs], label=LABELS[arm])
        axes[7].set_yscale("log")
        axes[7].set(
            title=f"Training loss at lr {LR_LOW}",
            xlabel="training step",
            ylabel="training loss (log scale)",
        )
        axes[7].legend(fontsize=8)
        path = out_dir / ("noisy_bn.png" if model == "mlp" else f"noisy_bn_{model}.png")
        save(fig, path)
        return path
