r"""``covariate_shift`` — Santurkar et al. 2018, Definition 2.1 and Fig. 3: BN does not reduce
internal covariate shift, measured as the change of a layer's gradient after the earlier layers' update.

Definition 2.1: at step :math:`t`, for layer :math:`i`,

.. math::
    G = \nabla_{W_i} L(W_1, …, W_k; x, y), \qquad
    G' = \nabla_{W_i} L(W'_1, …, W'_{i-1}, W_i, …, W_k; x, y),

where :math:`W'_j = W_j - \eta\, \nabla_{W_j} L(W; x, y)` are the earlier layers after this step's
update; internal covariate shift is :math:`\lVert G - G'\rVert_2` (ideally 0) and
:math:`\cos(G, G')` (ideally 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import Dataset
from ..ensemble import Ensemble, Probe, StackedLinear, TrainConfig, train_ensemble
from . import Claim, ClaimResult, Experiment, Results, register
from ._common import band, fmt, grouped, md_table, members
from .noisy_bn import ARMS, DEPTH, LABELS, LR_LOW, WIDTH
from .noisy_bn import model as arm_model

__all__ = ["CovariateShift", "gradient_shift", "shift_probe"]

LR, BATCH, EVERY, PROBE_SEED = LR_LOW, 64, 25, 0
QUICK_STEPS, FULL_STEPS = 200, 800
SHOWN = (2, DEPTH)  # the Linear layers (1-based) whose curves the figure shows
SETUP = {
    "depth": DEPTH,
    "width": WIDTH,
    "batch": BATCH,
    "lr": LR,
    "every": EVERY,
    "probe_seed": PROBE_SEED,
}


def _layer_index(name: str) -> int:
    """``"layers.3.norm.weight"`` → 3: the ensemble layer a parameter belongs to."""
    return int(name.split(".")[1])


def gradient_shift(ens: Ensemble, x: Tensor, y: Tensor, lr: float) -> dict[str, Tensor]:
    """Santurkar et al.'s Definition 2.1 for every member and every Linear layer after the first.

    On the batch ``(x, y)`` (``x`` ``(N, F)``, shared by the members), in training mode: ``G`` the
    gradient of each member's loss with respect to Linear ``i``'s weight; ``G'`` the same gradient
    after every parameter of the layers *before* Linear ``i`` took its SGD step ``W − lr·∇W`` on this
    batch (the layers from Linear ``i`` on as they were). Random layers (noise injection) see the same
    draws in every pass; running statistics, random generators and parameters are left as they were.

    The weights are written into the ensemble's own parameters for each pass and restored
    afterwards.

    Returns
    -------
    dict of str to Tensor
        ``"l2"`` ‖G − G'‖₂, ``"cos"`` cos(G, G'), ``"norm"`` ‖G‖₂: each ``(K, L)`` for the
        ``L`` Linear layers after the first, in forward order.
    """
    k = ens.k
    live = dict(ens.named_parameters())
    params = {n: p.detach().clone() for n, p in live.items()}
    buffers = [(b, b.detach().clone()) for b in ens.buffers()]
    gens = [
        g for m in ens.modules() if isinstance(g := getattr(m, "generator", None), torch.Generator)
    ]
    states = [g.get_state() for g in gens]
    linears = [i for i, layer in enumerate(ens.layers) if isinstance(layer, StackedLinear)]
    targets = y.expand(k, -1)  # (K, N)
    was = ens.training
    ens.train()

    def load(values: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for n, p in live.items():
                p.copy_(values[n])
            for b, saved in buffers:
                b.copy_(saved)
        for g, s in zip(gens, states):
            g.set_state(s)

    def grad(values: dict[str, Tensor], wrt: list[str]) -> list[Tensor]:
        load(values)
        logits = ens(x)  # (K, N, classes)
        loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1).sum()
        return list(torch.autograd.grad(loss, [live[n] for n in wrt]))

    try:
        names = list(params)
        full = dict(zip(names, grad(params, names)))
        moved = {
            n: (p.reshape(k, -1) - lr * full[n].reshape(k, -1)).view_as(p)  # member-major rows
            for n, p in params.items()
        }
        l2, cos, norm = [], [], []
        for j in linears[1:]:
            w = f"layers.{j}.weight"
            mixed = {n: moved[n] if _layer_index(n) < j else p for n, p in params.items()}
            g, g2 = full[w].reshape(k, -1), grad(mixed, [w])[0].reshape(k, -1)
            l2.append((g - g2).norm(dim=1))
            cos.append(F.cosine_similarity(g, g2, dim=1))
            norm.append(g.norm(dim=1))
    finally:
        load(params)
        ens.train(was)
    return {key: torch.stack(v, dim=1) for key, v in (("l2", l2), ("cos", cos), ("norm", norm))}


def shift_probe(data: Dataset, lr: float, batch: int = BATCH, seed: int = 0) -> Probe:
    """A ``train_ensemble`` probe: :func:`gradient_shift` on a fresh random training batch each time
    (the same sequence of batches for every run with the same ``seed``: paired across arms)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(data.y_train)

    def probe(step: int, ens: Ensemble) -> list[dict[str, Any]]:
        idx = torch.randint(n, (batch,), generator=gen)
        out = gradient_shift(ens, data.x_train[idx], data.y_train[idx], lr)
        return [{key: v[m].tolist() for key, v in out.items()} for m in range(ens.k)]

    return probe


def _mean(record: dict[str, Any], key: str) -> float | None:
    """The mean over probes and layers of one measure; None for a diverged run."""
    if record["diverged"] or not record[key]:
        return None
    value = float(np.mean(record[key]))
    return value if np.isfinite(value) else None


def _train_loss(record: dict[str, Any]) -> float | None:
    """The training loss averaged over the run (the area under the curve: how fast it trains)."""
    vals = [v for v in record["train_loss"] if v is not None and np.isfinite(v)]
    return None if record["diverged"] or not vals else float(np.mean(vals))


@register
class CovariateShift(Experiment):
    name = "covariate_shift"
    paper = "Santurkar et al. 2018, Definition 2.1 and Fig. 3"
    summary = (
        "Measured as the change of each layer's gradient after the earlier layers' update, BN does not "
        "reduce internal covariate shift (similar or larger), although it trains better."
    )
    setup = (
        "Taken from the paper (Definition 2.1, Fig. 3): for each layer i, G = ∂L/∂W_i on a batch and "
        "G' = the same gradient on the same batch after the layers before i took this step's SGD update; "
        "the ℓ2 distance ‖G − G'‖ (ideally 0) and the cosine cos(G, G') (ideally 1) over training, "
        "plain vs BN; plain SGD. Changed: the networks of `noisy_bn` (an MLP with "
        f"{DEPTH} hidden layers of {WIDTH} ReLU units, He init; plain, BN, and BN followed by Santurkar's "
        "noise, a third arm the paper's Fig. 3 does not have) instead of VGG and a 25-layer deep linear "
        f"network on CIFAR-10; lr {LR} (where plain trains best on digits, see `noisy_bn`), batch {BATCH}, "
        f"{QUICK_STEPS} steps quick, {FULL_STEPS} full. Every {EVERY} steps (and at step 0) the measure "
        f"is taken on a fresh random batch of {BATCH} training samples, the same sequence of batches for "
        "every arm, training mode (batch statistics; the noise drawn once and reused for G and G'), "
        "for every Linear layer after the first (the first has no earlier layer); the update of the "
        "earlier layers is the SGD step on that batch (all their parameters: weights, biases, BN's γ "
        "and β). Per seed, a measure is averaged over the probes and layers. 'Not smaller' is a "
        "non-inferiority claim with our margin (BN/plain > 0.8); 'trains better' compares the training "
        "loss averaged over the run. Santurkar's gradient predictiveness (Fig. 4) is a claim of "
        "`landscape`."
    )
    paper_numbers = (
        "Santurkar et al. (Fig. 3, VGG and DLN on CIFAR-10; caption): 'Models with BatchNorm have "
        "similar, or even worse, internal covariate shift, despite performing better in terms of accuracy "
        "and loss'; in the deep linear network BN's ℓ2 differences are far larger and its cosines near 0. "
        "No numbers are given beside the curves."
    )
    minutes_quick = 0.15
    minutes_full = 1.2
    claims = (
        Claim(
            "bn_shift_not_smaller",
            "BN does not reduce covariate shift: BN's ‖G − G'‖ is not below 0.8× plain's",
            paper,
            "‖G − G'‖₂ averaged over probes and layers: BN / plain, per seed (non-inferiority, margin 0.8)",
            ">",
            0.8,
            "Fig. 3: BN's ℓ2 difference is similar to or larger than plain's; no number",
            scale="log",
        ),
        Claim(
            "bn_cosine_not_higher",
            "BN's gradients do not stay more aligned: cos(G, G') with BN is at most 0.05 above plain's",
            paper,
            "cos(G, G') averaged over probes and layers: BN − plain, per seed",
            "<",
            0.05,
            "Fig. 3: BN's cosines are similar to or lower than plain's (near 0 in the DLN); no number",
        ),
        Claim(
            "bn_trains_better",
            "BN trains better: its training loss over the run is lower than plain's",
            paper,
            "training loss averaged over the run: BN / plain, per seed",
            "<",
            1.0,
            "Fig. 3 caption: BN models perform 'better in terms of accuracy and loss'; no number",
            threshold_origin="paper",
            scale="log",
        ),
    )

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        steps = QUICK_STEPS if quick else FULL_STEPS
        return [{"arm": arm, "seeds": seeds, "steps": steps, "setup": SETUP} for arm in ARMS]

    def run(
        self, config: dict[str, Any], data: Dataset, *, progress: bool = False
    ) -> dict[str, Any]:
        seeds = config["seeds"]
        models = [arm_model(data, config["arm"], s) for s in seeds]
        cfg = TrainConfig(
            optimizer="sgd",
            lr=LR,
            batch_size=BATCH,
            steps=config["steps"],
            eval_every=EVERY,
            eval_samples=2000,
        )
        results, _ = train_ensemble(
            models,
            data,
            cfg,
            seeds=seeds,
            probe=shift_probe(data, LR, BATCH, PROBE_SEED),
            probe_every=EVERY,
            progress=progress,
        )
        return {
            "members": [
                {
                    "seed": s,
                    "final_test_acc": r.final_test_acc,
                    "diverged": r.diverged,
                    "steps": r.steps,
                    "train_loss": r.train_loss,
                    "test_acc": r.test_acc,
                    "probe_steps": r.probe_steps,
                    **{key: r.probes.get(key, []) for key in ("l2", "cos", "norm")},  # (T, L)
                }
                for s, r in zip(seeds, results)
            ]
        }

    def _by(self, results: Results) -> dict[str, list[dict[str, Any]]]:
        return grouped(members(results), lambda r: r["config"]["arm"])

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        by = self._by(results)
        plain, bn = by["plain"], by["bn"]

        def ratio(key: Any) -> list[float | None]:
            out: list[float | None] = []
            for p, b in zip(plain, bn):
                vp, vb = key(p), key(b)
                out.append(vb / vp if vp and vb is not None else None)
            return out

        cos: list[float | None] = []
        for p, b in zip(plain, bn):
            cp, cb = _mean(p, "cos"), _mean(b, "cos")
            cos.append(None if cp is None or cb is None else cb - cp)
        return [
            self.claim("bn_shift_not_smaller").check(ratio(lambda r: _mean(r, "l2"))),
            self.claim("bn_cosine_not_higher").check(cos),
            self.claim("bn_trains_better").check(ratio(_train_loss)),
        ]

    def table(self, results: Results) -> str:
        rows = []
        for arm, recs in self._by(results).items():
            rel = [
                None
                if r["diverged"]
                else float(np.mean(np.asarray(r["l2"]) / np.maximum(np.asarray(r["norm"]), 1e-30)))
                for r in recs
            ]
            rows.append(
                [
                    LABELS[arm],
                    fmt([_mean(r, "l2") for r in recs]),
                    fmt(rel),
                    fmt([_mean(r, "cos") for r in recs]),
                    fmt([_train_loss(r) for r in recs]),
                    fmt([r["final_test_acc"] for r in recs]),
                ]
            )
        return md_table(
            [
                "model",
                "‖G − G'‖₂ (mean over probes, layers)",
                "‖G − G'‖ / ‖G‖",
                "cos(G, G')",
                "training loss over the run",
                "final test accuracy",
            ],
            rows,
        )

    def plot(self, results: Results, out_dir: Path) -> list[Path]:
        from ..plots import new_figure, save, seed_dots

        by = self._by(results)
        fig, axes = new_figure(2, 4, width=22, height=9)
        for arm, recs in by.items():
            label = LABELS[arm]
            band(axes[0], recs[0]["steps"], [r["train_loss"] for r in recs], label=label)
            band(axes[4], recs[0]["steps"], [r["test_acc"] for r in recs], label=label)
            steps = recs[0]["probe_steps"]
            for col, layer in enumerate(SHOWN, 1):
                at = layer - 2  # the measures start at the second Linear
                band(axes[col], steps, [[v[at] for v in r["l2"]] for r in recs], label=label)
                band(axes[4 + col], steps, [[v[at] for v in r["cos"]] for r in recs], label=label)
        axes[0].set_yscale("log")
        axes[0].set(title="Training loss", xlabel="training step", ylabel="loss (log scale)")
        axes[4].set(title="Test accuracy", xlabel="training step", ylabel="test accuracy")
        for col, layer in enumerate(SHOWN, 1):
            axes[col].set_yscale("log")
            axes[col].set(
                title=f"Layer #{layer}: ℓ2 difference ‖G − G'‖ (ideally 0)",
                xlabel="training step",
                ylabel="‖G − G'‖₂ (log scale)",
            )
            axes[4 + col].set(
                title=f"Layer #{layer}: cos(G, G') (ideally 1)",
                xlabel="training step",
                ylabel="cosine",
            )
        for ax in (*axes[:3], *axes[4:7]):
            ax.legend(fontsize=7)
        evaluated = {c.claim.name: c for c in self.evaluate(results, dataset="")}
        seed_dots(axes[3], [("‖G − G'‖: BN / plain", evaluated["bn_shift_not_smaller"].values)])
        axes[3].axhline(1.0, color="gray", ls=":", lw=1)
        axes[3].axhline(0.8, color="gray", ls="--", lw=0.8)
        axes[3].set_yscale("log")
        axes[3].set(title="Per seed: ℓ2 ratio (dashed: the 0.8 margin)", ylabel="ratio (log scale)")
        seed_dots(axes[7], [("cos: BN − plain", evaluated["bn_cosine_not_higher"].values)])
        axes[7].axhline(0.0, color="gray", ls=":", lw=1)
        axes[7].axhline(0.05, color="gray", ls="--", lw=0.8)
        axes[7].set(title="Per seed: cosine difference (dashed: +0.05)", ylabel="difference")
        path = out_dir / "covariate_shift.png"
        save(fig, path)
        return [path]
