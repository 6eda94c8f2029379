r"""Probes of the optimization landscape at one point (Santurkar et al. 2018; Bjorck et al. 2018).

Conventions shared by every probe:

* ``batch = (x, y)`` and the loss is ``loss_fn(model(x), y)`` (a scalar);
* the model is evaluated with :func:`torch.func.functional_call` on detached
  copies of its parameters and fresh clones of its buffers for every forward,
  so its parameters, buffers (BN running statistics), ``.grad`` and training
  flags are left bit-exactly as they were, and every forward sees the same
  buffers;
* every forward starts from the same RNG state (same dropout masks), and the
  global RNG is restored afterwards;
* "layer" = a module that owns trainable parameters directly, in the order the
  forward first calls it; its gradient is the concatenation of those parameters'.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "GradientReport",
    "LandscapeProbe",
    "LayerShift",
    "gradient_report",
    "internal_covariate_shift",
    "landscape_probe",
]

LossFn = Callable[[Any, Any], Tensor]
Params = dict[str, Tensor]


class _Evaluator:
    """Loss and gradients of ``model`` at given parameter values, without touching the model."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batch: Any) -> None:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"batch must be a pair (x, y), got {type(batch).__name__}")
        self.model, self.loss_fn = model, loss_fn
        self.x, self.y = batch
        self.params: Params = {
            n: p.detach() for n, p in model.named_parameters() if p.requires_grad
        }
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        devices = {p.device for p in self.params.values()}
        self.cuda = sorted(d.index or 0 for d in devices if d.type == "cuda")
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = [torch.cuda.get_rng_state(i) for i in self.cuda]
        self.order: list[str] = []  # layers in forward order, filled by the first call
        owners = {}
        for name, module in model.named_modules():
            own = [f"{name}.{n}" if name else n for n, _ in module.named_parameters(recurse=False)]
            own = [n for n in own if n in self.params]
            if own:
                owners[name] = own
        self.layers: dict[str, list[str]] = owners

    def _restore_rng(self) -> None:
        torch.set_rng_state(self.cpu_rng)
        for i, state in zip(self.cuda, self.cuda_rng):
            torch.cuda.set_rng_state(state, i)

    def loss_and_grad(self, params: Params) -> tuple[float, Params]:
        """``(L(θ), ∇L(θ))`` at ``θ = params`` (same buffers and RNG state every call)."""
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        state = {**leaves, **{n: b.clone() for n, b in self.buffers.items()}}
        handles = []
        if not self.order:
            modules = dict(self.model.named_modules())
            for name in self.layers:

                def hook(module: nn.Module, args: Any, name: str = name) -> None:
                    if name not in self.order:
                        self.order.append(name)

                handles.append(modules[name].register_forward_pre_hook(hook))
        self._restore_rng()
        try:
            with torch.enable_grad():
                loss = self.loss_fn(functional_call(self.model, state, (self.x,)), self.y)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise ValueError("loss_fn(model(x), y) must return a scalar tensor")
                grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        out = {
            n: (g if g is not None else torch.zeros_like(leaves[n])) for n, g in zip(leaves, grads)
        }
        return float(loss.detach()), out

    def run(self, fn: Callable[[], Any]) -> Any:
        with torch.random.fork_rng(devices=self.cuda):
            return fn()

    def layer_vector(self, layer: str, tensors: Params) -> Tensor:
        return torch.cat([tensors[n].flatten().double() for n in self.layers[layer]])


def _norm(tensors: Sequence[Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def _display(name: str) -> str:
    return name or "<model>"


@dataclass(frozen=True)
class LayerShift:
    """Santurkar et al.'s internal covariate shift of one layer.

    ``l2`` = ‖G − G′‖₂ and ``cosine`` = cos(G, G′), where
    G is the layer's gradient and G′ its gradient after every earlier layer took
    the SGD step ``θ ← θ − lr·∇θ`` (:func:`internal_covariate_shift`).

    Parameters
    ----------
    l2 : float
        ‖G − G′‖₂.
    cosine : float
        cos(G, G′) (NaN if either is zero).
    grad_norm : float
        ‖G‖₂.

    Examples
    --------
    >>> from normlab.diagnostics import LayerShift
    >>> LayerShift(l2=0.0, cosine=1.0, grad_norm=2.5).cosine
    1.0
    """

    l2: float
    cosine: float
    grad_norm: float


def internal_covariate_shift(
    model: nn.Module, loss_fn: LossFn, batch: Any, lr: float
) -> dict[str, LayerShift]:
    r"""Per-layer internal covariate shift (Santurkar et al. 2018, Definition 2.1).

    .. math::
        G_i = \nabla_{W_i} L(W_1, …, W_k),\qquad
        G'_i = \nabla_{W_i} L(W_1 - \eta G_1, …, W_{i-1} - \eta G_{i-1}, W_i, …, W_k)

    reported as ``‖G_i − G′_i‖₂`` and ``cos(G_i, G′_i)``: how much a layer's
    gradient changes because the layers before it moved. One backward pass per
    layer. See the module docstring for conventions (state restored bit-exactly).

    Parameters
    ----------
    model : nn.Module
        The model at θ; left bit-exactly as it was.
    loss_fn : callable
        ``loss_fn(model(x), y)`` → a scalar tensor, e.g. ``nn.functional.cross_entropy``.
    batch : tuple
        ``(x, y)``.
    lr : float
        The SGD step size η, ``> 0``.

    Returns
    -------
    dict of str to LayerShift
        ``{layer path: LayerShift}`` in forward order (the first layer has ``l2 = 0``,
        ``cosine = 1``).

    Raises
    ------
    ValueError
        ``lr`` is not a positive finite number.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
    >>> batch = (torch.randn(64, 10), torch.randint(0, 3, (64,)))
    >>> from normlab.diagnostics import internal_covariate_shift
    >>> shifts = internal_covariate_shift(model, nn.functional.cross_entropy, batch, lr=0.1)
    >>> list(shifts), shifts["0"].l2
    (['0', '1', '3'], 0.0)
    """
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    ev = _Evaluator(model, loss_fn, batch)

    def probe() -> dict[str, LayerShift]:
        _, grads = ev.loss_and_grad(ev.params)
        result: dict[str, LayerShift] = {}
        earlier: set[str] = set()
        for layer in ev.order:
            g = ev.layer_vector(layer, grads)
            if earlier:
                stepped = {
                    n: (p - lr * grads[n] if n in earlier else p) for n, p in ev.params.items()
                }
                _, grads_after = ev.loss_and_grad(stepped)
                g_after = ev.layer_vector(layer, grads_after)
            else:
                g_after = g
            denom = float(g.norm() * g_after.norm())
            cosine = float(g @ g_after) / denom if denom > 0 else math.nan
            result[_display(layer)] = LayerShift(
                float((g - g_after).norm()), cosine, float(g.norm())
            )
            earlier.update(ev.layers[layer])
        return result

    out: dict[str, LayerShift] = ev.run(probe)
    return out


@dataclass(frozen=True)
class LandscapeProbe:
    """Loss landscape along the gradient (Santurkar et al. 2018, Fig. 4), at one point θ.

    :func:`landscape_probe` returns one.

    Parameters
    ----------
    loss : float
        L(θ).
    grad_norm : float
        ‖g‖₂, g = ∇L(θ).
    step_sizes : list of float
        The η probed.
    losses : list of float
        L(θ − η g) per η.
    grad_diffs : list of float
        ‖∇L(θ) − ∇L(θ − η g)‖₂ per η ("gradient predictiveness").
    loss_range : float
        max − min of ``losses`` ("variation in loss").
    beta_smoothness : float
        max over η of ‖∇L(θ) − ∇L(θ − η g)‖ / ‖η g‖ ("effective β-smoothness").

    Examples
    --------
    >>> from normlab.diagnostics import LandscapeProbe
    >>> LandscapeProbe(loss=1.0, grad_norm=2.0).as_dict()["step_sizes"]
    []
    """

    loss: float
    grad_norm: float
    step_sizes: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    grad_diffs: list[float] = field(default_factory=list)
    loss_range: float = math.nan
    beta_smoothness: float = math.nan

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict.

        Returns
        -------
        dict
        """
        return asdict(self)


def landscape_probe(
    model: nn.Module, loss_fn: LossFn, batch: Any, step_sizes: Sequence[float]
) -> LandscapeProbe:
    r"""Loss variation, gradient predictiveness and effective β-smoothness along the gradient.

    With :math:`g = \nabla L(\theta)`, for each step size η: :math:`L(\theta - \eta g)`
    and :math:`\lVert g - \nabla L(\theta - \eta g)\rVert_2`; the effective
    β-smoothness is :math:`\max_\eta \lVert g - \nabla L(\theta - \eta g)\rVert / (\eta \lVert g\rVert)`
    (Santurkar et al. 2018, §3.1 and Fig. 4: BN makes all three smaller). One
    backward pass per step size. See the module docstring for conventions.

    Parameters
    ----------
    model : nn.Module
        The model at θ; left bit-exactly as it was.
    loss_fn : callable
        ``loss_fn(model(x), y)`` → a scalar tensor, e.g. ``nn.functional.cross_entropy``.
    batch : tuple
        ``(x, y)``.
    step_sizes : sequence of float
        The η to probe, each ``> 0``.

    Returns
    -------
    LandscapeProbe

    Raises
    ------
    ValueError
        ``step_sizes`` is empty or holds a value that is not a positive finite number.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
    >>> batch = (torch.randn(64, 10), torch.randint(0, 3, (64,)))
    >>> from normlab.diagnostics import landscape_probe
    >>> probe = landscape_probe(model, nn.functional.cross_entropy, batch, [0.05, 0.1, 0.2])
    >>> len(probe.losses), probe.beta_smoothness > 0
    (3, True)
    """
    steps = [float(s) for s in step_sizes]
    if not steps or not all(math.isfinite(s) and s > 0 for s in steps):
        raise ValueError(
            f"step_sizes must be a non-empty sequence of positive numbers, got {step_sizes!r}"
        )
    ev = _Evaluator(model, loss_fn, batch)

    def probe() -> LandscapeProbe:
        loss, g = ev.loss_and_grad(ev.params)
        g_norm = _norm(list(g.values()))
        losses, diffs, betas = [], [], []
        for eta in steps:
            moved = {n: p - eta * g[n] for n, p in ev.params.items()}
            loss_eta, g_eta = ev.loss_and_grad(moved)
            diff = _norm([g[n] - g_eta[n] for n in g])
            losses.append(loss_eta)
            diffs.append(diff)
            betas.append(diff / (eta * g_norm) if g_norm > 0 else math.nan)
        return LandscapeProbe(
            loss, g_norm, steps, losses, diffs, max(losses) - min(losses), max(betas)
        )

    out: LandscapeProbe = ev.run(probe)
    return out


@dataclass(frozen=True)
class GradientReport:
    """Per-layer gradient norms at one point (Bjorck et al. 2018); :func:`gradient_report`.

    Parameters
    ----------
    loss : float
        L(θ).
    grad_norms : dict of str to float
        ``{layer path: ‖∇_layer L‖₂}`` in forward order.
    param_norms : dict of str to float
        ``{layer path: ‖θ_layer‖₂}`` (same order), for relative scales.
    total_norm : float
        ‖∇L‖₂ over all trainable parameters.

    Examples
    --------
    >>> from normlab.diagnostics import GradientReport
    >>> GradientReport(1.0, {"0": 0.5}, {"0": 3.0}, 0.5).as_dict()["grad_norms"]
    {'0': 0.5}
    """

    loss: float
    grad_norms: dict[str, float]
    param_norms: dict[str, float]
    total_norm: float

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict.

        Returns
        -------
        dict
        """
        return asdict(self)


def gradient_report(model: nn.Module, loss_fn: LossFn, batch: Any) -> GradientReport:
    """Gradient norm of every layer at the current parameters, in forward order.

    Without BatchNorm the gradients of a deep network grow with distance from
    the output at initialization (Bjorck et al. 2018, *Understanding Batch
    Normalization*, Fig. 4); with it they stay comparable. One backward pass;
    see the module docstring for conventions.

    Parameters
    ----------
    model : nn.Module
        The model at θ; left bit-exactly as it was.
    loss_fn : callable
        ``loss_fn(model(x), y)`` → a scalar tensor, e.g. ``nn.functional.cross_entropy``.
    batch : tuple
        ``(x, y)``.

    Returns
    -------
    GradientReport

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
    >>> batch = (torch.randn(64, 10), torch.randint(0, 3, (64,)))
    >>> from normlab.diagnostics import gradient_report
    >>> report = gradient_report(model, nn.functional.cross_entropy, batch)
    >>> list(report.grad_norms), report.total_norm > 0
    (['0', '1', '3'], True)
    """
    ev = _Evaluator(model, loss_fn, batch)

    def probe() -> GradientReport:
        loss, g = ev.loss_and_grad(ev.params)
        grads = {_display(n): float(ev.layer_vector(n, g).norm()) for n in ev.order}
        params = {_display(n): float(ev.layer_vector(n, ev.params).norm()) for n in ev.order}
        return GradientReport(loss, grads, params, _norm(list(g.values())))

    out: GradientReport = ev.run(probe)
    return out
