"""``xavier_vs_he`` — He et al. 2015: Glorot's init stalls a deep ReLU net that He's init trains."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data import Dataset
from ..ensemble import TrainConfig, train_ensemble
from ..models import mlp
from . import Claim, ClaimResult, Experiment, Results, accuracy_level, register
from ._common import activation_stats, band, fmt, grouped, md_table, members

__all__ = ["ESCAPE", "XavierVsHe", "escape_step"]

DEPTH, WIDTH, BATCH, LR, MOMENTUM, BUDGET, EVERY = 30, 64, 64, 0.003, 0.9, 3000, 20
SHALLOW = 22  # He et al.'s Fig. 2: at 22 layers both inits converge, He's earlier (full runs)
ESCAPE = 0.9 * math.log(10)  # training loss below 90 % of chance level (ln 10 for 10 classes)
INITS = {"he": "He", "xavier": "Glorot"}
SETUP = {"depth": DEPTH, "width": WIDTH, "batch": BATCH, "every": EVERY}


def escape_step(
    steps: Sequence[int], train_loss: Sequence[float | None], level: float
) -> int | None:
    """The first evaluation step whose training loss (mean over the preceding window) is below
    ``level``; ``None`` when it never is (or the run diverged first)."""
    for s, loss in zip(steps, train_loss):
        if loss is not None and math.isfinite(loss) and loss < level:
            return int(s)
    return None


@register
class XavierVsHe(Experiment):
    name = "xavier_vs_he"
    paper = "He et al. 2015, §2.2 and Figs. 2–3"
    summary = (
        "In a 30-layer ReLU net, He's variance 2/fan_in trains while Glorot's 2/(fan_in+fan_out) stalls "
        "for far longer; at 22 layers both train, He's earlier (full runs)."
    )
    setup = (
        f"Taken from the paper (Fig. 3): {DEPTH} ReLU layers without normalization, zero-mean Gaussian "
        "weights (He: N(0, 2/fan_in); Glorot: N(0, 2/(fan_in+fan_out))), zero biases, SGD with momentum "
        f"{MOMENTUM}. Changed: an MLP of width {WIDTH} instead of a 30-layer ConvNet on ImageNet (the "
        "per-layer variance factor, ½ for Glorot's ReLU net, does not depend on the width); lr "
        f"{LR}, batch {BATCH}; one budget of {BUDGET} steps for every dataset. A net *escapes* chance "
        f"when its training loss (mean over {EVERY} steps) falls below 0.9·ln 10 = {ESCAPE:.2f}; a run "
        "that never escapes counts as the budget, so its ratio is a lower bound. Full runs add He's "
        f"{SHALLOW}-layer case (Fig. 2; the same setup at depth {SHALLOW}) and the Glorot net trained with "
        "Adam (lr 1e-3), a finding, not a claim; in quick runs the 22-layer claims are inconclusive "
        "(not run)."
    )
    paper_numbers = (
        "He et al. 2015 (Fig. 3): the 30-layer net with their init converges, while with Glorot's init it "
        "'completely stalls' and does not learn within the plotted epochs; at 22 layers both converge, "
        "theirs earlier."
    )
    minutes_quick = 0.9
    minutes_full = 3.8
    claims = (
        Claim(
            "escape_ratio",
            "Glorot's net needs ≥ 5× as many steps as He's to escape chance",
            paper,
            f"steps until the training loss < {ESCAPE:.2f}: Glorot / He, per seed "
            f"(never within {BUDGET} = the budget, a lower bound)",
            ">=",
            5.0,
            "Fig. 3: Glorot's 30-layer net does not escape within the plotted epochs (ratio ∞)",
            scale="log",
        ),
        Claim(
            "glorot_stalls",
            f"Glorot's net stalls: most seeds never escape chance within {BUDGET} steps",
            paper,
            f"rate of Glorot seeds whose training loss falls below {ESCAPE:.2f} within {BUDGET} steps",
            "<",
            0.5,
            "Fig. 3: 'completely stalls' (rate 0 within the plotted epochs)",
        ),
        Claim(
            "he_trains",
            "He init trains the 30-layer ReLU net to ≥ {pct:0.90} test accuracy",
            paper,
            "final test accuracy (He)",
            ">=",
            0.90,
            "Fig. 3: the 30-layer net with He's init converges",
        ),
        Claim(
            "glorot_converges_22",
            f"At {SHALLOW} layers Glorot's net converges too: most seeds escape chance within "
            f"{BUDGET} steps",
            "He et al. 2015, Fig. 2",
            f"rate of Glorot seeds ({SHALLOW} layers) whose training loss falls below {ESCAPE:.2f} "
            f"within {BUDGET} steps (full runs only)",
            ">",
            0.5,
            "Fig. 2: at 22 layers both inits converge (rate 1)",
        ),
        Claim(
            "he_earlier_22",
            f"At {SHALLOW} layers He's net escapes chance earlier than Glorot's",
            "He et al. 2015, Fig. 2",
            f"steps until the training loss < {ESCAPE:.2f}: Glorot / He at {SHALLOW} layers, per seed "
            "(full runs only)",
            ">",
            1.0,
            "Fig. 2: He's init 'starts reducing error earlier'; no ratio",
            threshold_origin="paper",
            scale="log",
        ),
    )

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        sgd = {
            "optimizer": "sgd",
            "lr": LR,
            "momentum": MOMENTUM,
            "inits": list(INITS),
            "seeds": seeds,
            "steps": BUDGET,
            "setup": SETUP,
        }
        units = [sgd]
        if not quick:
            units.append({**sgd, "depth": SHALLOW})
            units.append(
                {
                    "optimizer": "adam",
                    "lr": 1e-3,
                    "momentum": 0.0,
                    "inits": ["xavier"],
                    "seeds": seeds,
                    "steps": BUDGET,
                    "setup": SETUP,
                }
            )
        return units

    def run(
        self, config: dict[str, Any], data: Dataset, *, progress: bool = False
    ) -> dict[str, Any]:
        depth = int(config.get("depth", DEPTH))
        combos = [(init, s) for init in config["inits"] for s in config["seeds"]]
        models = [
            mlp(data.in_features, depth, WIDTH, data.num_classes, init=init, seed=s)
            for init, s in combos
        ]
        stats = [activation_stats(m, data.x_test[:256])["post_std"] for m in models]
        cfg = TrainConfig(
            optimizer=config["optimizer"],
            lr=config["lr"],
            momentum=config["momentum"],
            batch_size=BATCH,
            steps=config["steps"],
            eval_every=EVERY,
            eval_samples=2000,
        )
        results, _ = train_ensemble(
            models, data, cfg, seeds=[s for _, s in combos], progress=progress
        )
        return {
            "members": [
                {
                    "init": init,
                    "seed": s,
                    "final_test_acc": r.final_test_acc,
                    "diverged": r.diverged,
                    "steps": r.steps,
                    "test_acc": r.test_acc,
                    "train_loss": r.train_loss,
                    "escape": escape_step(r.steps, r.train_loss, ESCAPE),
                    "init_activation_std": st,
                }
                for (init, s), r, st in zip(combos, results, stats)
            ]
        }

    def _groups(self, results: Results) -> dict[tuple[int, str, str], list[dict[str, Any]]]:
        """Members by ``(depth, optimizer, init)``."""
        return grouped(
            members(results),
            lambda r: (int(r["config"].get("depth", DEPTH)), r["config"]["optimizer"], r["init"]),
        )

    @staticmethod
    def _escape_ratios(
        he: list[dict[str, Any]], xavier: list[dict[str, Any]], budget: int
    ) -> tuple[list[float | None], list[Any]]:
        """Per seed, Glorot's escape step / He's, with a run that never escapes counted as the budget
        (so the ratio is a bound: ``censored``)."""
        ratios: list[float | None] = []
        censored: list[Any] = []
        for h, x in zip(he, xavier):  # paired by seed
            if h["escape"] is None and x["escape"] is None:
                ratios.append(None)
                censored.append(None)
                continue
            ratios.append((x["escape"] or budget) / max(h["escape"] or budget, 1))
            censored.append(
                "lower" if x["escape"] is None else "upper" if h["escape"] is None else None
            )
        return ratios, censored

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        g = self._groups(results)
        budget = int(results[0][0]["steps"])
        he, xavier = g[(DEPTH, "sgd", "he")], g[(DEPTH, "sgd", "xavier")]
        ratios, censored = self._escape_ratios(he, xavier, budget)
        out = [
            self.claim("escape_ratio").check(ratios, censored=censored),
            self.claim("glorot_stalls").check_rate([x["escape"] is not None for x in xavier]),
            self.claim("he_trains", dataset).check(
                [h["final_test_acc"] for h in he], threshold=accuracy_level(0.90, dataset)
            ),
        ]
        he22, xavier22 = g.get((SHALLOW, "sgd", "he"), []), g.get((SHALLOW, "sgd", "xavier"), [])
        if not he22:
            note = f"the {SHALLOW}-layer nets train in full runs only"
            return [
                *out,
                self.claim("glorot_converges_22").check_rate([], note=note),
                self.claim("he_earlier_22").check([], note=note),
            ]
        ratios22, censored22 = self._escape_ratios(he22, xavier22, budget)
        return [
            *out,
            self.claim("glorot_converges_22").check_rate(
                [x["escape"] is not None for x in xavier22]
            ),
            self.claim("he_earlier_22").check(ratios22, censored=censored22),
        ]

    def table(self, results: Results) -> str:
        rows = []
        for (depth, opt, init), recs in self._groups(results).items():
            escaped = [r["escape"] for r in recs if r["escape"] is not None]
            last = [r["init_activation_std"][-1] for r in recs]
            rows.append(
                [
                    str(depth),
                    f"{INITS[init]} + {opt.upper()}" + (" (finding)" if opt == "adam" else ""),
                    f"{len(escaped)} of {len(recs)}",
                    fmt(escaped) if escaped else "never",
                    fmt([r["final_test_acc"] for r in recs]),
                    fmt(last),
                ]
            )
        return md_table(
            [
                "layers",
                "init + optimizer",
                f"seeds that escape chance (loss < {ESCAPE:.2f})",
                "escape step (those that escape)",
                "final test accuracy",
                "ReLU output std at the last layer, at init",
            ],
            rows,
        )

    def plot(self, results: Results, out_dir: Path) -> list[Path]:
        from ..plots import new_figure, save

        fig, axes = new_figure(1, 3, width=18)
        for (depth, opt, init), recs in self._groups(results).items():
            label = f"{depth} layers, {INITS[init]}, {opt.upper()}"
            style = "-" if depth == DEPTH else "--"
            band(axes[0], recs[0]["steps"], [r["train_loss"] for r in recs], label=label)
            band(axes[1], recs[0]["steps"], [r["test_acc"] for r in recs], label=label)
            axes[0].lines[-len(recs) - 1].set_linestyle(style)
            axes[1].lines[-len(recs) - 1].set_linestyle(style)
            if opt == "sgd":
                stds = recs[0]["init_activation_std"]
                axes[2].plot(
                    range(1, len(stds) + 1),
                    stds,
                    "o" + style,
                    label=f"{depth} layers, {INITS[init]} (seed {recs[0]['seed']})",
                )
        axes[0].axhline(ESCAPE, color="gray", ls=":", lw=1)
        axes[0].set(
            title="Training loss (every seed; dotted: escape level)",
            xlabel="training step",
            ylabel="training loss (20-step mean)",
        )
        axes[1].set(
            title="Test accuracy", xlabel="training step", ylabel="test accuracy", ylim=(0, 1.02)
        )
        axes[2].set_yscale("log")
        axes[2].set(
            title="ReLU output std per layer at init",
            xlabel="hidden layer",
            ylabel="std (log scale)",
        )
        for ax in axes:
            ax.legend(fontsize=8)
        path = out_dir / "xavier_vs_he.png"
        save(fig, path)
        return [path]
