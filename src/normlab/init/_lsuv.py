"""LSUV (Mishkin & Matas 2016): orthogonal init, then rescale each layer to unit output variance."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ._core import orthogonal_

__all__ = ["lsuv_"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _first_tensor(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, tuple | list) else batch


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

    Every Conv/Linear gets an orthogonal weight (zero bias); then, in forward order,
    its weight is divided by the standard deviation of its output on ``data`` (a
    tensor or an ``(x, …)`` batch) until ``|Var - 1| <= tol`` or ``max_iters``.
    The model's training flag is restored afterwards (BN layers run in eval mode
    during the passes, so their running statistics are untouched).
    """
    x = _first_tensor(data)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _LAYERS)]
    if not layers:
        raise ValueError("lsuv_ found no Conv/Linear layer to initialize")
    for _, m in layers:
        orthogonal_(m.weight, generator=generator)
        if m.bias is not None:
            m.bias.zero_()
    was_training = model.training
    model.eval()
    result: dict[str, float] = {}
    try:
        for name, layer in layers:
            captured: list[Tensor] = []
            handle = layer.register_forward_hook(lambda _m, _i, out, c=captured: c.append(out))
            try:
                for _ in range(max_iters):
                    captured.clear()
                    model(x)
                    var = float(captured[0].var())
                    if abs(var - 1.0) <= tol or var == 0.0:
                        break
                    layer.weight.div_(var**0.5)
                captured.clear()
                model(x)
                result[name] = float(captured[0].var())
                if abs(result[name] - 1.0) > tol:
                    warnings.warn(
                        f"lsuv_: layer {name!r} reached output variance {result[name]:.3g} after {max_iters} "
                        f"iterations (tol={tol}); a later nonlinearity or normalization may fight the rescaling",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            finally:
                handle.remove()
    finally:
        model.train(was_training)
    return result
