"""``initialize(model)``: each Conv/Linear initialized for the activation that follows it.

The activation after a layer is found by ``torch.fx`` tracing (norm layers kept as
leaf modules; norm, dropout, pooling and reshapes are looked through), else by
module order, else the layer counts as linear.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .._norms import NormLeafTracer, is_norm_layer
from .._table import render_table
from ._core import kaiming_normal_, lecun_normal_, normal_, orthogonal_, xavier_uniform_
from ._gain import calculate_gain

__all__ = ["SCHEMES", "InitReport", "find_activations", "initialize", "require_materialized"]

SCHEMES = ("auto", "he", "xavier", "lecun", "orthogonal", "normal")
_LAYERS = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_ACT_MODULES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.SELU: "selu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Mish: "mish",
    nn.ELU: "elu",
    nn.Softplus: "softplus",
}
_ACT_FUNCTIONS: dict[Any, str] = {
    torch.relu: "relu",
    nn.functional.relu: "relu",
    nn.functional.relu6: "relu",
    torch.tanh: "tanh",
    nn.functional.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    nn.functional.sigmoid: "sigmoid",
    nn.functional.leaky_relu: "leaky_relu",
    nn.functional.selu: "selu",
    torch.selu: "selu",
    nn.functional.gelu: "gelu",
    nn.functional.silu: "silu",
    nn.functional.mish: "mish",
    nn.functional.elu: "elu",
    nn.functional.softplus: "softplus",
}
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}
# modules and functions a signal passes through on its way to the activation
_TRANSPARENT_MODULES = (
    nn.Dropout,
    nn.Identity,
    nn.Flatten,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool2d,
    nn.Unflatten,
)
_TRANSPARENT_CALLS = {torch.flatten, torch.reshape, nn.functional.dropout, nn.functional.max_pool2d}
_TRANSPARENT_METHODS = {"view", "reshape", "flatten", "contiguous", "permute", "transpose"}
_RELU_FAMILY = ("relu", "leaky_relu", "gelu", "silu", "mish", "elu", "softplus")


def require_materialized(layers: list[tuple[str, nn.Module]], caller: str) -> None:
    """Raise before any change if a layer still has lazy (uninitialized) parameters."""
    for name, m in layers:
        for pname, p in m.named_parameters(recurse=False):
            if isinstance(p, nn.parameter.UninitializedParameter):
                raise ValueError(
                    f"{caller}: layer {name!r} has an uninitialized (lazy) parameter {pname!r}: "
                    "run the model once on a batch first to materialize it (nothing was changed)"
                )


def _activation_of_node(
    node: fx.Node, modules: dict[str, nn.Module]
) -> tuple[str, float | None] | None:
    if node.op == "call_module":
        m = modules[str(node.target)]
        fused = getattr(m, "activation", None)  # a normalization layer with its activation
        if is_norm_layer(m) and isinstance(fused, str) and fused != "identity":
            param = {"leaky_relu": "negative_slope", "elu": "alpha"}.get(fused)
            return fused, getattr(m, param) if param else None
        for cls, name in _ACT_MODULES.items():
            if isinstance(m, cls):
                return name, getattr(m, "negative_slope", None)
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        return _ACT_FUNCTIONS[node.target], node.kwargs.get("negative_slope")  # type: ignore[return-value]
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return _ACT_METHODS[str(node.target)], None
    return None


def _transparent(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], _TRANSPARENT_MODULES) or is_norm_layer(
            modules[str(node.target)]
        )
    if node.op == "call_function":
        return node.target in _TRANSPARENT_CALLS
    return node.op == "call_method" and node.target in _TRANSPARENT_METHODS


def find_activations(model: nn.Module) -> tuple[dict[str, tuple[str, float | None]], str]:
    """The activation that follows every Conv/Linear of ``model``.

    Found by tracing the model with ``torch.fx`` and following each layer's output through
    shape-preserving steps (norms, dropout, pooling, reshapes) to its activation; when the
    model does not trace, by module order.

    Parameters
    ----------
    model : nn.Module
        Any model.

    Returns
    -------
    (dict, str)
        ``{layer path: (activation, param)}`` (``("linear", None)`` where no activation
        follows; ``param`` is e.g. leaky_relu's slope) and the method used, ``"fx"`` or
        ``"module order"``.

    Examples
    --------
    >>> import torch
    >>> from normlab.init import find_activations
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
    ...                             torch.nn.LeakyReLU(0.2), torch.nn.Linear(8, 2))
    >>> find_activations(model)
    ({'0': ('leaky_relu', 0.2), '3': ('linear', None)}, 'fx')
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _LAYERS)}
    try:
        graph = NormLeafTracer().trace(model)
    except Exception:
        return _by_module_order(model), "module order"
    modules = dict(model.named_modules())
    found: dict[str, tuple[str, float | None]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and str(node.target) in layers:
            current, act = node, None
            while act is None and len(current.users) == 1:
                nxt = next(iter(current.users))
                act = _activation_of_node(nxt, modules)
                if act is None and not _transparent(nxt, modules):
                    break
                current = nxt
            found[str(node.target)] = act or ("linear", None)
    for name in layers:
        found.setdefault(name, ("linear", None))
    return found, "fx"


def _by_module_order(model: nn.Module) -> dict[str, tuple[str, float | None]]:
    found: dict[str, tuple[str, float | None]] = {}
    pending: str | None = None
    for name, m in model.named_modules():
        if isinstance(m, _LAYERS):
            if pending is not None:
                found[pending] = ("linear", None)
            pending = name
        elif pending is not None:
            for cls, act in _ACT_MODULES.items():
                if isinstance(m, cls):
                    found[pending] = (act, getattr(m, "negative_slope", None))
                    pending = None
                    break
    if pending is not None:
        found[pending] = ("linear", None)
    return found


@dataclass
class InitReport:
    """What :func:`initialize` did: one row per initialized layer; prints as a table.

    Parameters
    ----------
    method : str
        How the activations were found: ``"fx"`` or ``"module order"``.
    rows : list of tuple
        ``(path, weight shape, scheme, activation, gain, resulting std)`` per layer.
    zeroed_residual : list of str
        Norm layers whose γ was zeroed (``zero_init_residual``).

    Examples
    --------
    >>> import torch
    >>> from normlab.init import initialize
    >>> report = initialize(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh()))
    >>> report.method, report.rows[0][:4]
    ('fx', ('0', (8, 4), 'xavier', 'tanh'))
    """

    method: str
    rows: list[tuple[str, tuple[int, ...], str, str, float, float]] = field(default_factory=list)
    zeroed_residual: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        rows = [
            (layer, shape, scheme, act, f"{gain:.4f}", f"{std:.4g}")
            for layer, shape, scheme, act, gain, std in self.rows
        ]
        text = render_table(
            f"initialize ({self.method})",
            ("layer", "shape", "scheme", "activation", "gain", "std"),
            rows,
        )
        if self.zeroed_residual:
            text += "\nzero-initialized residual norms: " + ", ".join(self.zeroed_residual)
        return text


def _scheme_for(scheme: str, act: str) -> str:
    if scheme != "auto":
        return scheme
    if act in _RELU_FAMILY:
        return "he"
    if act == "selu":
        return "lecun"
    return "xavier"  # tanh, sigmoid and linear layers: Glorot & Bengio's normalized init


def _init_weight(
    w: torch.Tensor, scheme: str, act: str, param: float | None, gen: torch.Generator | None
) -> float:
    gain = calculate_gain(act, param) if act != "linear" else 1.0
    if scheme == "he":
        kaiming_normal_(
            w,
            a=param or 0.0,
            nonlinearity=act if act in ("relu", "leaky_relu") else "linear",
            generator=gen,
        )
        if act not in ("relu", "leaky_relu", "linear"):  # the rule's gain for GELU/SiLU/...
            with torch.no_grad():
                w.mul_(gain)
        return gain
    if scheme == "xavier":
        xavier_uniform_(w, 1.0, generator=gen)
        return 1.0
    if scheme == "lecun":
        lecun_normal_(w, generator=gen)
        return 1.0
    if scheme == "orthogonal":
        orthogonal_(w, gain, generator=gen)
        return gain
    normal_(w, 0.0, 0.01, generator=gen)
    return 1.0


def _hops_to_input(node: fx.Node, limit: int = 64) -> int:
    """Fewest graph steps from ``node`` back to the block's input (``limit`` if none)."""
    frontier, seen = [(node, 0)], set()
    while frontier:
        current, hops = frontier.pop(0)
        if current.op == "placeholder":
            return hops
        if current in seen or hops >= limit:
            continue
        seen.add(current)
        frontier += [(a, hops + 1) for a in current.all_input_nodes]
    return limit


def _residual_norms(model: nn.Module) -> list[str]:
    """For every residual block, the norm layer that ends its main branch.

    A residual block is a submodule whose traced forward adds two paths, one much
    shorter (the skip: identity or a downsample) than the other (the branch); the
    norm to zero is the last norm on the branch before the addition — torchvision's
    ``bn2``/``bn3``, not the downsample's.
    """
    found = []
    for name, block in model.named_modules():
        if not name or isinstance(block, nn.Sequential | nn.ModuleList):
            continue
        try:
            graph = NormLeafTracer().trace(block)
        except Exception:
            continue
        modules = dict(block.named_modules())
        for node in graph.nodes:
            if node.op != "call_function" or node.target not in (
                operator.add,
                torch.add,
                operator.iadd,
            ):
                continue
            args = [a for a in node.args if isinstance(a, fx.Node)]
            if len(args) != 2:
                continue
            branch = max(args, key=_hops_to_input)
            if _hops_to_input(branch) <= _hops_to_input(min(args, key=_hops_to_input)):
                continue
            current: fx.Node | None = branch
            while current is not None and current.op != "placeholder":
                if current.op == "call_module" and is_norm_layer(modules[str(current.target)]):
                    found.append(f"{name}.{current.target}")
                    break
                inputs = current.all_input_nodes
                current = inputs[0] if len(inputs) == 1 else None
    return found


def _std(w: torch.Tensor) -> float:
    """The weight's std for the report (NaN for fewer than two values, without torch's warning)."""
    return float(w.float().std()) if w.numel() > 1 else math.nan


@torch.no_grad()
def initialize(
    model: nn.Module,
    scheme: str = "auto",
    *,
    zero_init_residual: bool = False,
    generator: torch.Generator | None = None,
) -> InitReport:
    """Initialize every Conv/Linear of ``model`` for the activation that follows it.

    ``scheme="auto"``: He (the activation's gain) for the ReLU family and GELU/SiLU,
    Glorot (gain 1, Glorot & Bengio 2010) for tanh, sigmoid and linear layers,
    LeCun for SELU. Others: ``"he"``, ``"xavier"``, ``"lecun"``, ``"orthogonal"``,
    ``"normal"`` (std 0.01). Biases are zeroed; norm layers get γ = 1, β = 0.
    ``zero_init_residual`` zeroes the last norm γ of each residual block found (a
    submodule adding a normalized branch to its input), Goyal et al. 2017.

    Parameters
    ----------
    model : nn.Module
        Initialized in place.
    scheme : {"auto", "he", "xavier", "lecun", "orthogonal", "normal"}
        The rule (see above).
    zero_init_residual : bool
        Zero the γ of the last norm layer on each residual branch.
    generator : torch.Generator, optional
        The random source (default: torch's global one).

    Returns
    -------
    InitReport
        One row per layer (path, shape, scheme, activation, gain, std); ``print`` it.

    Raises
    ------
    ValueError
        An unknown scheme.

    Examples
    --------
    >>> import torch
    >>> from normlab.init import initialize
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    >>> report = initialize(model, generator=torch.Generator().manual_seed(0))
    >>> [(row[0], row[2], row[3], round(row[4], 3)) for row in report.rows]
    [('0', 'he', 'relu', 1.414), ('2', 'xavier', 'linear', 1.0)]
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    require_materialized(
        [(n, m) for n, m in model.named_modules() if isinstance(m, _LAYERS) or is_norm_layer(m)],
        "initialize",
    )
    acts, method = find_activations(model)
    report = InitReport(method)
    for name, m in model.named_modules():
        if isinstance(m, _LAYERS):
            act, param = acts.get(name, ("linear", None))
            chosen = _scheme_for(scheme, act)
            gain = _init_weight(m.weight, chosen, act, param, generator)
            if m.bias is not None:
                m.bias.zero_()
            report.rows.append((name, tuple(m.weight.shape), chosen, act, gain, _std(m.weight)))
        elif is_norm_layer(m) and getattr(m, "weight", None) is not None:
            m.weight.fill_(1.0)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    if zero_init_residual:
        for path in _residual_norms(model):
            weight = getattr(model.get_submodule(path), "weight", None)
            if isinstance(weight, torch.Tensor):
                weight.zero_()
                report.zeroed_residual.append(path)
    return report
