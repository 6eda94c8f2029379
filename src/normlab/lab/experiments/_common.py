"""Helpers shared by the experiments: grouping results, mean ± std, bands, tables, activation stats."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from . import mean_std

__all__ = [
    "activation_stats",
    "band",
    "fmt",
    "grouped",
    "md_table",
    "members",
    "nanmean",
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


def nanmean(values: Sequence[float | None]) -> float:
    """Plain mean (NaN if any value is missing or there are none)."""
    vals = [float("nan") if v is None else float(v) for v in values]
    return float(np.mean(vals)) if vals else float("nan")


def fmt(values: Sequence[float | None], digits: int = 3) -> str:
    """``mean ± std`` over the seeds that have a value; missing ones (diverged runs) are counted."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    missing = len(values) - len(vals)
    if not vals:
        return "n/a (diverged)"
    mean, std = mean_std(vals)
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    return text + (f" ({missing} of {len(values)} seeds diverged)" if missing else "")


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
    """Mean curve with a ±1 std band over seeds (NaN-aware; a curve that stopped early — a diverged run —
    is padded with NaN)."""
    width = max((len(c) for c in curves), default=0)
    arr = np.full((len(curves), width), np.nan)
    for i, c in enumerate(curves):
        arr[i, : len(c)] = [np.nan if v is None else v for v in c]
    n = min(len(x), width)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns after every seed diverged
        mean, std = np.nanmean(arr[:, :n], axis=0), np.nanstd(arr[:, :n], axis=0)
    line = ax.plot(x[:n], mean, label=label, color=color)[0]
    ax.fill_between(x[:n], mean - std, mean + std, color=line.get_color(), alpha=0.2)


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
