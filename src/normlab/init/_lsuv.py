"""LSUV (Mishkin & Matas 2016): orthogonal init, then rescale each layer to unit output variance.

All or nothing: the data is checked before any weight changes, and any error on
the way (a non-finite output variance, a failing forward, Ctrl-C) restores every
weight and bias it touched before it propagates.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ._core import orthogonal_
from ._initialize import require_materialized

__all__ = ["lsuv_"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _input(data: Any) -> Tensor:
    """The batch's input tensor, checked: non-empty and (for floats) finite."""
    x = data[0] if isinstance(data, tuple | list) and data else data
    if not isinstance(x, Tensor):
        raise TypeError(
            f"lsuv_ takes a tensor or an (x, ...) batch, got {type(data).__name__} "
            "(pass one batch, e.g. next(iter(loader)))"
        )
    if x.numel() == 0:
        raise ValueError(f"lsuv_ needs a non-empty batch, got shape {tuple(x.shape)}")
    if x.is_floating_point() or x.is_complex():
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            nan = int(torch.isnan(x).sum())
            raise ValueError(
                f"lsuv_: the data contains {nan} NaN and {int(bad.sum()) - nan} infinite "
                "value(s); clean it first (no weight was changed)"
            )
    return x


def _variance(out: Tensor, name: str, step: int) -> float:
    """The unbiased variance of a layer's output over all its values, checked finite."""
    if out.numel() < 2:
        raise ValueError(
            f"lsuv_: layer {name!r} gave {out.numel()} output value(s), a variance needs at "
            "least 2: use a larger batch (the weights were restored)"
        )
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    var = float(out.detach().to(acc).var())
    if not math.isfinite(var):
        raise ValueError(
            f"lsuv_: layer {name!r} has output variance {var} after {step} rescaling(s): its "
            "input overflows or is not finite (the weights were restored)"
        )
    return var


def _layers_that_run(model: nn.Module, x: Tensor, layers: list[tuple[str, nn.Module]]) -> set[str]:
    """Names of the layers that one forward pass on ``x`` calls (the weights are not touched)."""
    ran: set[str] = set()
    handles = [
        m.register_forward_hook(lambda _m, _i, _o, name=name: ran.add(name)) for name, m in layers
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return ran


def _rescale(
    model: nn.Module, x: Tensor, name: str, layer: nn.Module, tol: float, max_iters: int
) -> float:
    """Divide ``layer``'s weight by its output std until ``|Var - 1| <= tol``; the final Var."""
    captured: list[Tensor] = []  # the layer's first output in each pass (a shared layer runs twice)
    handle = layer.register_forward_hook(
        lambda _m, _i, out: captured.append(out) if not captured else None
    )
    try:
        for step in range(max_iters + 1):
            captured.clear()
            model(x)
            var = _variance(captured[0], name, step)
            if abs(var - 1.0) <= tol or var == 0.0 or step == max_iters:
                return var
            weight = layer.weight
            assert isinstance(weight, Tensor)
            weight.div_(math.sqrt(var))
    finally:
        handle.remove()
    raise AssertionError("unreachable")  # pragma: no cover


@torch.no_grad()
def lsuv_(
    model: nn.Module,
    data: Any,
    *,
    tol: float = 0.1,
    max_iters: int = 10,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Layer-sequential unit-variance init, in place; returns each layer's final output variance.

    Every Conv/Linear that runs on ``data`` gets an orthogonal weight (zero bias); then,
    in forward order, its weight is divided by the standard deviation of its output
    until ``|Var - 1| <= tol`` or ``max_iters`` rescalings. BN layers run in eval mode
    during the passes (their running statistics are untouched); the model's training
    flag is restored afterwards.

    Parameters
    ----------
    model : nn.Module
        The model, initialized in place.
    data : Tensor or tuple
        One batch (or ``(x, ...)``); it must be finite and non-empty.
    tol : float, default 0.1
        Accepted distance of each layer's output variance from 1.
    max_iters : int, default 10
        Rescalings per layer; a layer still outside ``tol`` then gets a warning.
    generator : torch.Generator, optional
        For the orthogonal matrices.

    Returns
    -------
    dict[str, float]
        Each initialized layer's name and final output variance.

    Raises
    ------
    ValueError
        On non-finite or empty data, or a layer output whose variance is not finite
        or has fewer than 2 values; every weight is then as it was before the call.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from normlab.init import lsuv_
    >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> variances = lsuv_(model, torch.randn(256, 16), generator=torch.Generator().manual_seed(0))
    >>> all(abs(v - 1) <= 0.1 for v in variances.values())
    True
    """
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 < tol < math.inf:
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be an int >= 1, got {max_iters!r}")
    x = _input(data)
    layers: list[tuple[str, nn.Module]] = [
        (name, m) for name, m in model.named_modules() if isinstance(m, _LAYERS)
    ]
    if not layers:
        raise ValueError("lsuv_ found no Conv/Linear layer to initialize")
    require_materialized(layers, "lsuv_")
    saved = [(p, p.detach().clone()) for _, m in layers for p in m.parameters(recurse=False)]
    was_training = model.training
    model.eval()
    result: dict[str, float] = {}
    try:
        ran = _layers_that_run(model, x, layers)
        skipped = [name for name, _ in layers if name not in ran]
        if skipped:
            warnings.warn(
                f"lsuv_: layer(s) {skipped} did not run on the data and were left as they were",
                RuntimeWarning,
                stacklevel=3,
            )
        layers = [(name, m) for name, m in layers if name in ran]
        for _, m in layers:
            orthogonal_(m.weight, generator=generator)  # type: ignore[arg-type]
            if m.bias is not None:
                m.bias.zero_()  # type: ignore[operator]
        for name, layer in layers:
            result[name] = _rescale(model, x, name, layer, tol, max_iters)
    except BaseException:
        for p, value in saved:
            p.copy_(value)
        raise
    finally:
        model.train(was_training)
    for name, var in result.items():
        if abs(var - 1.0) > tol:
            warnings.warn(
                f"lsuv_: layer {name!r} reached output variance {var:.3g} after {max_iters} "
                f"iterations (tol={tol}); a later nonlinearity or normalization may fight the "
                "rescaling",
                RuntimeWarning,
                stacklevel=3,
            )
    return result
