"""``xavier_vs_he`` — He et al. 2015: Glorot's init stalls a deep ReLU net that He's init trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data import Dataset
from ..ensemble import TrainConfig, train_ensemble
from ..models import mlp
from . import Claim, ClaimResult, Experiment, Results, accuracy_level, register
from ._common import activation_stats, band, fmt, grouped, md_table, members

DEPTH, WIDTH = 30, 100


@register
class XavierVsHe(Experiment):
    name = "xavier_vs_he"
    paper = "He et al. 2015, §2.2 and Fig. 3"
    summary = (
        "In a 30-layer ReLU net, He's variance 2/fan_in trains while Glorot's 1/fan_avg stalls."
    )
    setup = (
        f"MLP with {DEPTH} hidden layers of {WIDTH} ReLU units, no normalization, normal init (He: N(0, 2/fan_in); "
        "Glorot: N(0, 2/(fan_in+fan_out))), biases 0, SGD momentum 0.9, lr 0.003, batch 64, 40 epochs. "
        "Finding, not a claim: the same Glorot network trained with Adam (lr 1e-3)."
    )
    paper_numbers = (
        "He et al. 2015 (Fig. 3): a 30-layer ReLU net with their init converges, while with Glorot's init "
        "it 'completely stalls' and does not learn; at 22 layers both converge, theirs faster."
    )
    minutes_quick = 0.3
    minutes_full = 0.5
    claims = (
        Claim(
            "he_acc",
            "He init trains the 30-layer ReLU net to ≥ {pct:0.90} test accuracy",
            paper,
            "final test accuracy (He)",
            ">=",
            0.90,
        ),
        Claim(
            "xavier_acc",
            "Glorot init stays below 50% test accuracy",
            paper,
            "final test accuracy (Glorot, SGD)",
            "<",
            0.50,
        ),
    )

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        return [
            {
                "optimizer": "sgd",
                "lr": 0.003,
                "momentum": 0.9,
                "inits": ["he", "xavier"],
                "seeds": seeds,
                "epochs": 40,
            },
            {
                "optimizer": "adam",
                "lr": 1e-3,
                "momentum": 0.0,
                "inits": ["xavier"],
                "seeds": seeds,
                "epochs": 40,
            },
        ]

    def run(
        self, config: dict[str, Any], data: Dataset, *, progress: bool = False
    ) -> dict[str, Any]:
        combos = [(init, s) for init in config["inits"] for s in config["seeds"]]
        models = [
            mlp(data.in_features, DEPTH, WIDTH, data.num_classes, init=init, seed=s)
            for init, s in combos
        ]
        stats = [activation_stats(m, data.x_test[:256])["post_std"] for m in models]
        cfg = TrainConfig(
            optimizer=config["optimizer"],
            lr=config["lr"],
            momentum=config["momentum"],
            batch_size=64,
            epochs=config["epochs"],
            eval_every=40,
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
                    "init_activation_std": st,
                }
                for (init, s), r, st in zip(combos, results, stats)
            ]
        }

    def _groups(self, results: Results) -> dict[tuple[str, str], list[dict[str, Any]]]:
        return grouped(members(results), lambda r: (r["config"]["optimizer"], r["init"]))

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        g = self._groups(results)
        he = [r["final_test_acc"] for r in g[("sgd", "he")]]
        xavier = [r["final_test_acc"] for r in g[("sgd", "xavier")]]
        return [
            self.claim("he_acc", dataset).check(he, threshold=accuracy_level(0.90, dataset)),
            self.claim("xavier_acc").check(xavier),
        ]

    def table(self, results: Results) -> str:
        rows = []
        for (opt, init), recs in self._groups(results).items():
            last = [r["init_activation_std"][-1] for r in recs]
            rows.append(
                [
                    f"{'He' if init == 'he' else 'Glorot'} + {opt.upper()}"
                    + (" (finding)" if opt == "adam" else ""),
                    fmt([r["final_test_acc"] for r in recs]),
                    f"{sum(last) / len(last):.3g}",
                ]
            )
        return md_table(
            ["init + optimizer", "final test accuracy", f"activation std at layer {DEPTH} at init"],
            rows,
        )

    def plot(self, results: Results, out_dir: Path) -> list[Path]:
        from ..plots import new_figure, save

        fig, axes = new_figure(1, 2, width=13)
        for (opt, init), recs in self._groups(results).items():
            label = f"{'He' if init == 'he' else 'Glorot'}, {opt.upper()}"
            band(axes[0], recs[0]["steps"], [r["test_acc"] for r in recs], label=label)
            if opt == "sgd":
                stds = recs[0]["init_activation_std"]
                axes[1].plot(
                    range(1, len(stds) + 1),
                    stds,
                    "o-",
                    label=f"{label.split(',')[0]} (seed {recs[0]['seed']})",
                )
        axes[0].set(
            title="Test accuracy while training (mean ± std over seeds)",
            xlabel="training step",
            ylabel="test accuracy",
            ylim=(0, 1.02),
        )
        axes[0].legend()
        axes[1].set_yscale("log")
        axes[1].set(
            title="ReLU output std per layer at init",
            xlabel="hidden layer",
            ylabel="std (log scale)",
        )
        axes[1].legend()
        path = out_dir / "xavier_vs_he.png"
        save(fig, path)
        return [path]
