"""``small_batch`` — BN fails on micro-batches; Batch Renorm recovers much of it; per-sample norms do not
care (Ioffe 2017; Wu & He 2018)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..data import Dataset
from ..ensemble import TrainConfig, train_ensemble
from ..models import convnet, mlp
from . import Claim, ClaimResult, Experiment, Results, as_floats, register
from ._common import MODEL_LABELS, by_model, fmt, grouped, md_table, members, model_units

__all__ = ["CNN_UNITS", "MICRO", "SmallBatch", "renorm_schedule"]

BATCH = 32  # the gradient batch, fixed
MICRO = (2, 4, 8, 32)  # samples per normalization
QUICK_STEPS, FULL_STEPS = 800, 2000
CNN_QUICK_STEPS, CNN_FULL_STEPS = 400, 1000  # the ConvNet's (the suite's time budget)
MOMENTUM_STATS = 0.1  # α, the running averages' rate (BN and Renorm alike)
WARMUP = round(5 / MOMENTUM_STATS)  # plain BN for 5/α steps
D_END, R_END = 5 * WARMUP, 8 * WARMUP  # Ioffe's 25k and 40k for a 5k warm-up, scaled
LR, MOMENTUM = 0.01, 0.9
SETUP = {"batch": BATCH, "lr": LR, "momentum": MOMENTUM, "alpha": MOMENTUM_STATS, "warmup": WARMUP}
LABELS = {
    "bn": "BatchNorm",
    "renorm": "Batch Renorm",
    "layer": "LayerNorm",
    "group": "GroupNorm",
}
UNITS = (
    *((m, b) for m in ("bn", "renorm") for b in MICRO),
    *((m, b) for m in ("layer", "group") for b in (MICRO[0], MICRO[-1])),
)
PER_SAMPLE = dict.fromkeys(("layer", "group"), "— (as at every size)")
# The ConvNet's units: what its claims need (GroupNorm is per-sample: one micro-batch size is all)
CNN_UNITS = (("bn", MICRO[0]), ("bn", MICRO[-1]), ("renorm", MICRO[0]), ("group", MICRO[0]))
CNN_GROUPS = 4  # 2 and 4 channels per group at 8 and 16 channels
CNN_SETUP = {**SETUP, "groups": CNN_GROUPS}
# Papers' points for the figure, error in % at each micro-batch size.
WU_HE = {  # Wu & He 2018, Table 3 (ResNet-50, ImageNet), images per worker
    "BN (Wu & He)": {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7},
    "GN (Wu & He)": {32: 24.1, 16: 24.2, 8: 24.0, 4: 24.2, 2: 24.1},
}
IOFFE = {  # Ioffe 2017, §4.2 (Inception, micro-batches of 4; the baseline normalizes 32)
    "BN (Ioffe)": {32: 100 - 78.3, 4: 100 - 74.2},
    "Renorm (Ioffe)": {4: 100 - 76.5},
}


def ramp(start: int, end: int, start_value: float, end_value: float) -> Callable[[int], float]:
    """``start_value`` until step ``start``, then linear to ``end_value`` at step ``end``."""

    def value(step: int) -> float:
        t = min(1.0, max(0.0, (step - start) / (end - start)))
        return start_value + t * (end_value - start_value)

    return value


def renorm_schedule() -> tuple[Callable[[int], float], Callable[[int], float]]:
    """``(r_max, d_max)`` of ``num_batches_tracked`` (one per step): Ioffe 2017's schedule in steps,
    scaled so that the plain-BN warm-up lasts 5/α steps."""
    return ramp(WARMUP, R_END, 1.0, 3.0), ramp(WARMUP, D_END, 0.0, 5.0)


def paired(
    acc: dict[tuple[str, int], list[float]], a: tuple[str, int], b: tuple[str, int]
) -> list[float]:
    """Per-seed differences ``acc[a] − acc[b]`` (units share their seed list)."""
    return [x - y for x, y in zip(acc.get(a, []), acc.get(b, []))]


@register
class SmallBatch(Experiment):
    name = "small_batch"
    paper = "Ioffe 2017, §4.2; Wu & He 2018, Table 3"
    summary = (
        "BN's accuracy drops when it normalizes over micro-batches of 2; Batch Renorm recovers much of "
        "the loss; LayerNorm and GroupNorm do not depend on the batch."
    )
    setup = (
        f"Taken from Ioffe 2017 (§4.2): a fixed gradient batch ({BATCH}) whose normalization runs over "
        f"micro-batches of {', '.join(map(str, MICRO))} samples (`normlab.lab.models.MicroBatch`: each "
        "micro-batch normalized on its own, running statistics averaged over micro-batches once per step), "
        "so every arm sees the same gradient noise and learning rate; Renorm starts as plain BN and its "
        f"r_max/d_max rise in steps. Changed: an MLP with 3 hidden layers of 100 ReLU units (He init) "
        f"instead of Inception; SGD momentum {MOMENTUM}, lr {LR}; running averages with α = "
        f"{MOMENTUM_STATS} for BN and Renorm; Ioffe's schedule (plain BN for 5k steps, d_max → 5 by 25k, "
        f"r_max → 3 by 40k) scaled to a warm-up of 5/α = {WARMUP} steps: d_max 0 → 5 by step {D_END}, "
        f"r_max 1 → 3 by step {R_END}; {QUICK_STEPS} steps quick, {FULL_STEPS} full. LayerNorm and "
        "GroupNorm (10 groups) are per-sample: at a fixed gradient batch they compute the same thing at "
        "every micro-batch size, so their flatness is a sanity check (trained at micro-batches 2 and 32). "
        "Accuracy in eval mode (running statistics). A diverged run has no accuracy and makes the claims "
        "it enters inconclusive. The ConvNet track (Wu & He's and Ioffe's own setting: convolutions, "
        "where a micro-batch of 2 images still gives each channel 2·H·W values) runs the same schedule "
        "on `normlab.lab.models.convnet` (digits: conv3×3-8 → BN → ReLU → max-pool → conv3×3-16 → BN → "
        "ReLU → max-pool → linear; 28×28 images are average-pooled to 14×14 first and get a third stage of 32 channels), He init, GroupNorm "
        "with 4 groups (2–8 channels per group; Wu & He use 32 groups of 2–64 channels), half the MLP's steps "
        f"({CNN_QUICK_STEPS} quick, {CNN_FULL_STEPS} full; Renorm's schedule is complete by step "
        f"{R_END}), for the suite's time budget, and only the units its claims need: BN at "
        "micro-batches 2 and 32, Renorm and GroupNorm at 2."
    )
    paper_numbers = (
        "Wu & He 2018 (Table 3, ResNet-50 on ImageNet, images per worker 32/16/8/4/2): BN's error 23.6, "
        "23.7, 24.8, 27.3, 34.7 %; GroupNorm's 24.1, 24.2, 24.0, 24.2, 24.1 %. Ioffe 2017 (§4.2, Inception, "
        "micro-batches of 4): BN 74.2 %, Batch Renorm 76.5 %, BN on batches of 32: 78.3 % — Renorm "
        "recovers (76.5 − 74.2)/(78.3 − 74.2) = 0.56 of BN's loss."
    )
    _GN = Claim(
        "groupnorm_beats_bn",
        "GroupNorm is more accurate than BN normalizing micro-batches of 2",
        "Wu & He 2018, Table 3",
        "accuracy(GN, micro 2) − accuracy(BN, micro 2), paired by seed",
        ">",
        0.0,
        "Table 3: at 2 images per worker GN's error is 24.1 %, BN's 34.7 % (GN better by 10.6 points)",
        threshold_origin="paper",
    )
    minutes_quick = 0.85  # MLP as before + ConvNet units (their share of a run)
    minutes_full = 3.1
    claims: ClassVar[tuple[Claim, ...]] = (
        Claim(
            "bn_drop",
            "BN normalizing micro-batches of 2 is less accurate than BN over the batch of 32",
            "Wu & He 2018, Table 3",
            "accuracy(BN, micro 32) − accuracy(BN, micro 2), paired by seed",
            ">",
            0.0,
            "Table 3: BN's error 23.6 % at 32 → 34.7 % at 2 images per worker (+11.1 points)",
            threshold_origin="paper",
        ),
        Claim(
            "renorm_recovery",
            "Batch Renorm recovers ≥ 50 % of BN's micro-batch-2 loss",
            "Ioffe 2017, §4.2",
            "mean(Renorm₂ − BN₂) / mean(BN₃₂ − BN₂), paired by seed",
            ">=",
            0.5,
            "§4.2 (micro-batches of 4): (76.5 − 74.2)/(78.3 − 74.2) = 0.56",
        ),
        Claim(
            "layernorm_flat",
            "LayerNorm's accuracy is the same at micro-batches 2 and 32",
            "Wu & He 2018",
            "|accuracy(LN, micro 2) − accuracy(LN, micro 32)| per seed",
            "<=",
            0.002,
            "Fig. 1/Table 3: per-sample normalizers are independent of the batch (by construction)",
            kind="sanity",
        ),
        Claim(
            "groupnorm_flat",
            "GroupNorm's accuracy is the same at micro-batches 2 and 32",
            "Wu & He 2018",
            "|accuracy(GN, micro 2) − accuracy(GN, micro 32)| per seed",
            "<=",
            0.002,
            "Table 3: GN's error 24.0–24.2 % at every batch size",
            kind="sanity",
        ),
        _GN,
    )
    claims = (
        *claims,
        *(c.for_model("cnn") for c in claims[:2]),  # bn_drop, renorm_recovery
        _GN.for_model("cnn"),
    )

    def configs(self, *, quick: bool, seeds: list[int], dataset: str) -> list[dict[str, Any]]:
        steps = QUICK_STEPS if quick else FULL_STEPS
        cnn_steps = CNN_QUICK_STEPS if quick else CNN_FULL_STEPS
        cnn = [
            {"method": m, "micro": b, "seeds": seeds, "steps": cnn_steps, "setup": CNN_SETUP}
            for m, b in CNN_UNITS
        ]
        return [
            {"method": m, "micro": b, "seeds": seeds, "steps": steps, "setup": SETUP}
            for m, b in UNITS
        ] + model_units(cnn, dataset)

    def run(
        self, config: dict[str, Any], data: Dataset, *, progress: bool = False
    ) -> dict[str, Any]:
        method, micro = config["method"], int(config["micro"])
        kwargs: dict[str, Any] = {}
        if method in ("bn", "renorm"):
            kwargs["momentum"] = MOMENTUM_STATS
        if method == "renorm":
            kwargs["r_max"], kwargs["d_max"] = renorm_schedule()
        micro_batch = micro if micro < BATCH else None
        if config.get("model", "mlp") == "cnn":
            if method == "group":
                kwargs["num_groups"] = CNN_GROUPS
            models = [
                convnet(
                    data.image_shape,
                    data.num_classes,
                    norm=method,
                    init="he",
                    seed=s,
                    norm_kwargs=kwargs,
                    micro_batch=micro_batch,
                )
                for s in config["seeds"]
            ]
        else:
            if method == "group":
                kwargs["num_groups"] = 10
            models = [
                mlp(
                    data.in_features,
                    3,
                    100,
                    data.num_classes,
                    norm=method,
                    init="he",
                    seed=s,
                    norm_kwargs=kwargs,
                    micro_batch=micro_batch,
                )
                for s in config["seeds"]
            ]
        cfg = TrainConfig(
            optimizer="sgd",
            lr=LR,
            momentum=MOMENTUM,
            batch_size=BATCH,
            steps=config["steps"],
            eval_every=None,
            final_train_acc=True,
        )
        results, _ = train_ensemble(models, data, cfg, seeds=config["seeds"], progress=progress)
        return {
            "members": [
                {
                    "seed": r.seed,
                    "final_test_acc": r.final_test_acc,
                    "final_train_acc": r.final_train_acc,
                    "diverged": r.diverged,
                }
                for r in results
            ]
        }

    @staticmethod
    def _acc(results: Results) -> dict[tuple[str, int], list[float]]:
        """Final test accuracy per (method, micro-batch), per seed; NaN where a seed diverged."""
        by = grouped(members(results), lambda r: (r["config"]["method"], int(r["config"]["micro"])))
        return {k: as_floats([r["final_test_acc"] for r in v]) for k, v in by.items()}

    def evaluate(self, results: Results, *, dataset: str) -> list[ClaimResult]:
        found: dict[str, ClaimResult] = {}
        for model in ("mlp", "cnn"):
            found.update(self._evaluate_model(by_model(results, model), model, dataset))
        return [found[c.name] for c in self.claims]

    def _evaluate_model(self, results: Results, model: str, dataset: str) -> dict[str, ClaimResult]:
        """The claims of ``model`` from its units (no units, e.g. no images: no values, inconclusive)."""
        acc = self._acc(results)
        small, large = MICRO[0], MICRO[-1]
        gain = np.asarray(paired(acc, ("renorm", small), ("bn", small)))
        gap = np.asarray(paired(acc, ("bn", large), ("bn", small)))

        def claim(name: str) -> Claim:
            return self.claim(name, dataset, model)

        def recovery(idx: np.ndarray) -> float:
            denominator = float(gap[idx].mean())
            return float(gain[idx].mean()) / denominator if denominator > 0 else float("nan")

        n = len(gap)
        missing = int(np.isnan(gain).sum() + np.isnan(gap).sum())
        recovery_result = (
            claim("renorm_recovery").check_bootstrap(n, recovery, values=list(gain))
            if not missing and n
            else claim("renorm_recovery").check(
                [None] * n, note="a seed diverged" if n else "no units"
            )
        )
        out = [
            claim("bn_drop").check(gap.tolist()),
            recovery_result,
            claim("groupnorm_beats_bn").check(paired(acc, ("group", small), ("bn", small))),
        ]
        if model == "mlp":
            flat = {
                m: [abs(d) for d in paired(acc, (m, small), (m, large))] for m in ("layer", "group")
            }
            out += [
                claim("layernorm_flat").check(flat["layer"]),
                claim("groupnorm_flat").check(flat["group"]),
            ]
        return {c.claim.name: c for c in out}

    def table(self, results: Results) -> str:
        parts = []
        for model in ("mlp", "cnn"):
            acc = self._acc(by_model(results, model))
            if acc:
                groups = 10 if model == "mlp" else CNN_GROUPS
                parts.append(f"**{MODEL_LABELS[model]}**\n\n" + self._table(acc, groups))
        return "\n\n".join(parts)

    @staticmethod
    def _table(acc: dict[tuple[str, int], list[float]], groups: int) -> str:
        rows = [
            [LABELS[m]]
            + [
                fmt(acc[(m, b)]) if (m, b) in acc else PER_SAMPLE.get(m, "— (not run)")
                for b in MICRO
            ]
            for m in LABELS
            if any(k[0] == m for k in acc)
        ]
        small, large = MICRO[0], MICRO[-1]
        gains = [
            f"micro-batch {b}: {fmt(paired(acc, ('renorm', b), ('bn', b)))}"
            for b in MICRO[:-1]
            if ("renorm", b) in acc
        ]
        return (
            md_table(["method"] + [f"micro-batch {b}" for b in MICRO], rows)
            + f"\n\nTest accuracy, eval mode, gradient batch {BATCH}; GroupNorm with {groups} groups. "
            + "Batch Renorm's gain over BN per seed, "
            + "; ".join(gains)
            + f". BN's loss from micro-batch {large} to {small}: "
            + fmt(paired(acc, ("bn", large), ("bn", small)))
            + "."
        )

    def plot(self, results: Results, out_dir: Path) -> list[Path]:
        paths = []
        for model in ("mlp", "cnn"):
            acc = self._acc(by_model(results, model))
            if acc:
                paths.append(self._plot(acc, model, out_dir))
        return paths

    @staticmethod
    def _plot(acc: dict[tuple[str, int], list[float]], model: str, out_dir: Path) -> Path:
        from ..plots import new_figure, save

        fig, (ax,) = new_figure(1, 1, width=9, height=5.5)
        rng = np.random.default_rng(0)
        for i, m in enumerate(LABELS):
            color = f"C{i}"
            sizes = [b for b in MICRO if (m, b) in acc]
            if not sizes:
                continue
            err = [100 * (1 - float(np.nanmean(acc[(m, b)]))) for b in sizes]
            ax.plot(sizes, err, "o-", color=color, lw=2, label=f"{LABELS[m]} (ours, seed mean)")
            for b in sizes:
                vals = 100 * (1 - np.asarray(acc[(m, b)]))
                ax.scatter(
                    b * 2 ** rng.uniform(-0.08, 0.08, len(vals)), vals, s=10, color=color, alpha=0.5
                )
        for (label, points), marker in zip({**WU_HE, **IOFFE}.items(), ("s", "D", "^", "v")):
            xs = sorted(points)
            ax.plot(
                xs,
                [points[x] for x in xs],
                marker=marker,
                ls="--",
                lw=1,
                mfc="none",
                color="gray",
                label=f"{label}, ImageNet",
            )
        ticks = [2, 4, 8, 16, 32]
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(b) for b in ticks])
        ax.invert_xaxis()  # Wu & He's Fig. 1: the batch shrinks to the right
        ax.set(
            title=f"{MODEL_LABELS[model]}: test error vs samples per normalization "
            f"(gradient batch {BATCH}; dots: seeds)",
            xlabel="samples per normalization",
            ylabel="error (%)",
        )
        ax.legend(fontsize=7, ncol=2)
        path = out_dir / ("small_batch.png" if model == "mlp" else f"small_batch_{model}.png")
        save(fig, path)
        return path
