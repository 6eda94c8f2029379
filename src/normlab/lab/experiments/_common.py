"""Helpers shared by the experiments: grouping results, number formatting, tables, curves, activation stats."""

from __future__ import annotations

import math
import statistics
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "MODELS",
    "activation_stats",
    "band",
    "by_model",
    "fmt",
    "grouped",
    "md_table",
    "members",
    "model_units",
    "num",
]

#: The lab's two networks: its MLPs and its ConvNet (:func:`normlab.lab.models.convnet`).
MODELS = ("mlp", "cnn")
MODEL_LABELS = {"mlp": "MLP", "cnn": "ConvNet"}


def by_model(
    results: Iterable[tuple[dict[str, Any], Any]], model: str
) -> list[tuple[dict[str, Any], Any]]:
    """The units of ``model`` (a unit whose config has no ``"model"`` is an MLP's)."""
    return [(cfg, m) for cfg, m in results if cfg.get("model", "mlp") == model]


def model_units(configs: list[dict[str, Any]], dataset: str, **setup: Any) -> list[dict[str, Any]]:
    """``configs`` again as ConvNet units (``"model": "cnn"``; their ``setup`` names the ConvNet's
    version and holds ``setup``'s items), or none when ``dataset`` has no images."""
    from ..data import IMAGE_DATASETS
    from ..models import CONVNET

    if dataset not in IMAGE_DATASETS:
        return []
    return [
        {**cfg, "model": "cnn", "setup": {**cfg.get("setup", {}), "convnet": CONVNET, **setup}}
        for cfg in configs
    ]


def members(
    results: Iterable[tuple[dict[str, Any], dict[str, Any]]], key: str = "members"
) -> list[dict[str, Any]]:
    """Every member record of every unit, each with its unit's config merged in (under ``config``)."""
    out = []
    for cfg, metrics in results:
        for m in metrics[key]:
            out.append({**m, "config": cfg})
    return out


def grouped(
    records: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], Any]
) -> dict[Any, list[dict[str, Any]]]:
    """Records grouped by ``key(record)``, keys in first-seen order."""
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[key(r)].append(r)
    return dict(groups)


def num(x: float | None) -> str:
    """One number, formatted the same way everywhere in the lab: three significant digits
    (``0.953``, ``12.3``, ``1.00``), thousands as integers (``1,600``), tiny or huge values
    in scientific notation; ``n/a`` for a missing value, ``∞`` for an infinite one."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    x = float(x)
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    ax = abs(x)
    if ax == 0:
        return "0"
    if ax >= 1000:
        return f"{x:,.0f}" if ax < 1e7 else f"{x:.2e}"
    if ax < 1e-3:
        return f"{x:.2e}"
    text = f"{x:#.3g}"
    return text[:-1] if text.endswith(".") else text


def fmt(values: Sequence[float | None]) -> str:
    """``mean ± sd (n=…)`` over the seeds that have a value; one seed shows its value alone;
    missing ones (diverged runs) are counted."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    missing = len(values) - len(vals)
    if not vals:
        return "n/a (no seed has a value)"
    if len(vals) == 1:
        text = f"{num(vals[0])} (one seed)"
    else:
        text = f"{num(statistics.fmean(vals))} ± {num(statistics.stdev(vals))}"
    return text + (f" ({missing} of {len(values)} seeds have no value)" if missing else "")


def md_table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def band(
    ax: Any,
    x: Sequence[float],
    curves: Sequence[Sequence[float | None]],
    *,
    label: str,
    color: str | None = None,
) -> None:
    """Every seed's curve (thin) and their mean (thick); a curve that stopped early (a diverged
    run) is padded with NaN."""
    width = max((len(c) for c in curves), default=0)
    arr = np.full((len(curves), width), np.nan)
    for i, c in enumerate(curves):
        arr[i, : len(c)] = [np.nan if v is None else v for v in c]
    n = min(len(x), width)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns after every seed diverged
        mean = np.nanmean(arr[:, :n], axis=0)
    line = ax.plot(x[:n], mean, label=f"{label} (mean of {len(curves)} seeds)", color=color, lw=2)[
        0
    ]
    for row in arr:
        ax.plot(x[:n], row[:n], color=line.get_color(), lw=0.6, alpha=0.35)


@torch.no_grad()
def activation_stats(model: nn.Sequential, x: torch.Tensor) -> dict[str, list[float]]:
    """Per hidden layer (one entry per activation module): std of the activation's input and output."""
    pre, post = [], []
    h = x
    for layer in model:
        if isinstance(
            layer, nn.Linear | nn.modules.batchnorm._BatchNorm | nn.LayerNorm | nn.GroupNorm
        ) or hasattr(layer, "running_mean"):
            h = layer(h)
            continue
        pre.append(float(h.std()))
        h = layer(h)
        post.append(float(h.std()))
    return {"pre_std": pre, "post_std": post}
