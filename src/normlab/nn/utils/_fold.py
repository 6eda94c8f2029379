r"""Fold eval-mode BatchNorm into the Conv / ConvTranspose / Linear next to it.

In eval mode a BatchNorm is a per-channel affine map of its running statistics,

.. math::
    \mathrm{BN}(z) = \gamma \frac{z - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta = s\,z + t,
    \qquad s = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}},\quad t = \beta - s\mu,

so when ``z = W * x + b`` is a convolution or a linear map,
``BN(z) = (s W) * x + s (b - \mu) + \beta``: scale each output channel of ``W``
by ``s`` and replace the bias (:func:`fold_conv_bn_weights`). A BatchNorm *before*
such a layer folds the other way (pytorch/pytorch#144403):
``W * BN(x) + b = (W s) * x + (b + W * t)`` — scale each *input* channel of ``W`` and add
the layer's response to the constant ``t`` to the bias (:func:`fold_bn_conv_weights`). That
is exact for a ``Linear`` and for a convolution whose padding is not zeros (with zero padding
the padded border would see ``0`` instead of ``t``): ``padding=0`` or a ``padding_mode`` of
``reflect``/``replicate``/``circular`` (they pad with input values, which commutes with a
per-channel affine map). It is not exact for a ``ConvTranspose`` (how many input positions
reach an output position — and so how much of ``t`` — varies with the position).
:func:`fold_batchnorm` finds the pairs in a model (with ``torch.fx``, or inside
``nn.Sequential`` containers when the model does not trace) and rewrites them.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..._norms import NormLeafTracer
from ..._table import render_table
from .._base import describe
from ._common import (
    CONV_TYPES,
    bn_affine,
    bn_channel_axis,
    bn_eps,
    has_running_stats,
    is_batchnorm,
)

Direction = Literal["previous", "next"]

__all__ = [
    "FoldReport",
    "NormLeafTracer",
    "fold_batchnorm",
    "fold_bn_conv_weights",
    "fold_conv_bn_weights",
]


def fold_conv_bn_weights(
    w: Tensor,
    b: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    *,
    transpose: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    r"""Weight and bias of the layer ``BN(layer(x))`` in eval mode, for a Conv/ConvTranspose/Linear.

    .. math:: W' = W \cdot s,\quad b' = (b - \mu)\, s + \beta,\quad s = \gamma / \sqrt{\sigma^2 + \epsilon}

    ``s`` multiplies the *output* channels of ``W``: dim 0 for ``Conv*`` and
    ``Linear`` (``(C_out, C_in/groups, *k)`` / ``(C_out, C_in)``); for
    ``ConvTranspose*`` (``transpose=True``) the weight is ``(C_in, C_out/groups, *k)``
    and output channel ``g·C_out/groups + j`` lives at ``W[g·C_in/groups : (g+1)·C_in/groups, j]``.
    ``gamma``/``beta`` ``None`` mean a non-affine BatchNorm (1 and 0), ``b`` ``None`` a
    layer without bias. Computed in at least float32, returned in ``w``'s dtype
    (bias: ``b``'s dtype, or ``w``'s when ``b`` is ``None``). Agrees with
    :func:`torch.nn.utils.fusion.fuse_conv_bn_weights` where that applies (it
    supports ``groups=1`` only for transposed convolutions).

    Parameters
    ----------
    w : Tensor
        The layer's weight: ``(C_out, C_in/groups, *k)`` for ``Conv*``, ``(C_out, C_in)`` for
        ``Linear``, ``(C_in, C_out/groups, *k)`` for ``ConvTranspose*``.
    b : Tensor of shape (C_out,) or None
        The layer's bias.
    running_mean : Tensor of shape (C_out,)
        The BatchNorm's running mean μ.
    running_var : Tensor of shape (C_out,)
        Its running variance σ².
    eps : float
        Its ``eps``.
    gamma : Tensor of shape (C_out,), optional
        Its weight γ (``None``: 1).
    beta : Tensor of shape (C_out,), optional
        Its bias β (``None``: 0).
    transpose : bool
        ``w`` is a ``ConvTranspose*`` weight.
    groups : int
        The convolution's ``groups``.

    Returns
    -------
    (Tensor, Tensor)
        ``(w', b')``: ``w``'s shape and ``(C_out,)`` — new tensors; the inputs are not modified.

    Raises
    ------
    ValueError
        The statistics are not 1-D of the same length, or do not match ``w``'s channels.

    Examples
    --------
    >>> import torch
    >>> from normlab.nn.utils import fold_conv_bn_weights
    >>> conv, bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4).eval()
    >>> bn.running_mean.uniform_(-1, 1); bn.running_var.uniform_(0.5, 2)  # doctest: +ELLIPSIS
    tensor(...)
    tensor(...)
    >>> w, b = fold_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
    ...                             bn.eps, bn.weight, bn.bias)
    >>> x = torch.randn(2, 3, 8, 8)
    >>> torch.allclose(torch.nn.functional.conv2d(x, w, b), bn(conv(x)), atol=1e-5)
    True
    """
    if running_mean.dim() != 1 or running_var.shape != running_mean.shape:
        raise ValueError(
            "running_mean and running_var must be 1-D tensors of the same length, got "
            f"{tuple(running_mean.shape)} and {tuple(running_var.shape)}"
        )
    c_out = running_mean.numel()
    if groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups}")
    if transpose:
        if w.dim() < 3 or w.shape[0] % groups or w.shape[1] * groups != c_out:
            raise ValueError(
                f"transposed weight {tuple(w.shape)} with groups={groups} does not have "
                f"{c_out} output channels (expected shape (C_in, {c_out}/groups, *kernel))"
            )
    elif w.shape[0] != c_out:
        raise ValueError(
            f"weight {tuple(w.shape)} has {w.shape[0]} output channels, BatchNorm has {c_out}"
        )
    for name, t in (("b", b), ("gamma", gamma), ("beta", beta)):
        if t is not None and t.shape != running_mean.shape:
            raise ValueError(f"{name} must have shape ({c_out},), got {tuple(t.shape)}")

    acc = torch.promote_types(w.dtype, torch.float32)
    scale = torch.rsqrt(running_var.to(acc) + eps)  # (C_out,)
    if gamma is not None:
        scale = scale * gamma.to(acc)
    bias = b.to(acc) if b is not None else torch.zeros_like(scale)
    new_b = (bias - running_mean.to(acc)) * scale
    if beta is not None:
        new_b = new_b + beta.to(acc)
    kernel_ones = [1] * (w.dim() - 2)
    if transpose:
        c_in = w.shape[0]
        grouped = w.to(acc).reshape(groups, c_in // groups, c_out // groups, *w.shape[2:])
        new_w = (grouped * scale.reshape(groups, 1, c_out // groups, *kernel_ones)).reshape(w.shape)
    else:
        new_w = w.to(acc) * scale.reshape(-1, 1, *kernel_ones)
    return new_w.to(w.dtype), new_b.to(b.dtype if b is not None else w.dtype)


def fold_bn_conv_weights(
    w: Tensor,
    b: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    *,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    r"""Weight and bias of the layer ``layer(BN(x))`` in eval mode, for a Conv or Linear *after* the BN.

    .. math::
        W'_{o,j,k} = W_{o,j,k}\, s_{c(o,j)},\qquad
        b'_o = b_o + \sum_{j,k} W_{o,j,k}\, t_{c(o,j)},\qquad
        s = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}},\ t = \beta - s\mu

    where ``c(o, j) = g(o)·C_in/groups + j`` is the input channel that weight column ``j`` of
    output ``o`` reads (``g(o)`` its group). ``w`` is ``(C_out, C_in/groups, *kernel)`` (a
    ``Conv*``) or ``(C_out, C_in)`` (a ``Linear``). Exact for a ``Linear`` and for a
    convolution that does not pad with zeros (see the module doc). ``gamma``/``beta``
    ``None`` mean a non-affine BatchNorm, ``b`` ``None`` a layer without bias. Computed in at
    least float32, returned in ``w``'s dtype (bias: ``b``'s, or ``w``'s when ``b`` is ``None``).

    Parameters
    ----------
    w : Tensor
        The following layer's weight, ``(C_out, C_in/groups, *kernel)`` or ``(C_out, C_in)``.
    b : Tensor or None
        Its bias ``(C_out,)``.
    running_mean, running_var : Tensor
        The BatchNorm's ``(C_in,)`` running statistics.
    eps : float
        The BatchNorm's eps.
    gamma, beta : Tensor or None
        Its affine parameters ``(C_in,)``.
    groups : int
        The convolution's groups (1 for a Linear).

    Returns
    -------
    tuple of Tensor
        ``(w', b')`` — new tensors; the inputs are not modified.

    Examples
    --------
    >>> import torch
    >>> bn, linear = torch.nn.BatchNorm1d(3).eval(), torch.nn.Linear(3, 2)
    >>> bn.running_mean.uniform_(-1, 1); bn.running_var.uniform_(0.5, 2)  # doctest: +ELLIPSIS
    tensor(...)
    tensor(...)
    >>> w, b = fold_bn_conv_weights(linear.weight, linear.bias, bn.running_mean, bn.running_var,
    ...                             bn.eps, bn.weight, bn.bias)
    >>> x = torch.randn(4, 3)
    >>> torch.allclose(x @ w.T + b, linear(bn(x)), atol=1e-6)
    True
    """
    if running_mean.dim() != 1 or running_var.shape != running_mean.shape:
        raise ValueError(
            "running_mean and running_var must be 1-D tensors of the same length, got "
            f"{tuple(running_mean.shape)} and {tuple(running_var.shape)}"
        )
    c_in = running_mean.numel()
    if groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups}")
    if w.dim() < 2 or w.shape[1] * groups != c_in or w.shape[0] % groups:
        raise ValueError(
            f"weight {tuple(w.shape)} with groups={groups} does not read {c_in} input channels "
            f"(expected shape (C_out, {c_in}/groups, *kernel), C_out a multiple of groups)"
        )
    for name, t in (("gamma", gamma), ("beta", beta)):
        if t is not None and t.shape != running_mean.shape:
            raise ValueError(f"{name} must have shape ({c_in},), got {tuple(t.shape)}")
    c_out, per_group = w.shape[0], c_in // groups
    if b is not None and b.shape != (c_out,):
        raise ValueError(f"b must have shape ({c_out},), got {tuple(b.shape)}")
    acc = torch.promote_types(w.dtype, torch.float32)
    scale = torch.rsqrt(running_var.to(acc) + eps)  # (C_in,)
    if gamma is not None:
        scale = scale * gamma.to(acc)
    shift = -running_mean.to(acc) * scale
    if beta is not None:
        shift = shift + beta.to(acc)

    def per_output(v: Tensor) -> Tensor:  # (C_in,) -> (C_out, C_in/groups): what output o reads
        grouped = v.reshape(groups, 1, per_group).expand(groups, c_out // groups, per_group)
        return grouped.reshape(c_out, per_group)

    wk = w.to(acc)
    kernel_ones = [1] * (w.dim() - 2)
    new_w = wk * per_output(scale).reshape(c_out, per_group, *kernel_ones)
    response = wk.reshape(c_out, per_group, -1).sum(-1)  # (C_out, C_in/groups): W summed over k
    new_b = (response * per_output(shift)).sum(1)
    if b is not None:
        new_b = new_b + b.to(acc)
    return new_w.to(w.dtype), new_b.to(b.dtype if b is not None else w.dtype)


@dataclass
class FoldReport:
    """What :func:`fold_batchnorm` did; prints as a table.

    Parameters
    ----------
    method : {"fx", "sequential"}
        ``"fx"`` (the model traced) or ``"sequential"`` (module-order matching inside
        ``nn.Sequential`` containers, after tracing failed).
    folded : list of (str, str)
        ``(layer path, batchnorm path)`` for every folded pair.
    direction : dict of str to str
        ``{batchnorm path: "previous" | "next"}`` — folded into the layer that feeds it, or
        into the layer it feeds.
    skipped : list of (str, str)
        ``(batchnorm path, reason)`` for every BatchNorm left in place.
    trace_error : str or None
        Why ``torch.fx`` could not trace the model (``"sequential"`` only).

    Examples
    --------
    >>> import torch
    >>> from normlab.nn.utils import fold_batchnorm
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    >>> _, report = fold_batchnorm(model)
    >>> report.method, report.folded, report.skipped
    ('fx', [('0', '1')], [])
    """

    method: Literal["fx", "sequential"]
    folded: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    trace_error: str | None = None
    direction: dict[str, Direction] = field(default_factory=dict)

    def add(self, layer: str, bn: str, direction: Direction) -> None:
        """Record that ``bn`` was folded into ``layer`` (``"previous"`` or ``"next"``)."""
        self.folded.append((layer, bn))
        self.direction[bn] = direction

    def __str__(self) -> str:
        where = {"previous": "the layer before", "next": "the layer after"}
        rows = [
            (bn, "folded", f"into {layer} ({where[self.direction.get(bn, 'previous')]})")
            for layer, bn in self.folded
        ]
        rows += [(bn, "kept", reason) for bn, reason in self.skipped]
        title = (
            f"fold_batchnorm ({self.method}): {len(self.folded)} folded, {len(self.skipped)} kept"
        )
        if self.trace_error is not None:
            title += f"\nfx tracing failed: {self.trace_error}"
        return render_table(title, ["BatchNorm", "result", "detail"], rows)


def _stock_base(layer: nn.Module) -> type[nn.Module] | None:
    """The torch class whose ``forward`` ``layer`` runs unchanged, or ``None``."""
    bases: tuple[type[nn.Module], ...] = (*CONV_TYPES, nn.Linear)
    for base in bases:
        if isinstance(layer, base):
            same_forward = type(layer).forward is base.forward
            same_conv = getattr(type(layer), "_conv_forward", None) is getattr(
                base, "_conv_forward", None
            )
            return base if same_forward and same_conv else None
    return None


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _probe_is_affine(bn: nn.Module, spatial: int) -> bool:
    """Whether ``bn``'s eval forward is the affine map of its running statistics (no fused activation)."""
    assert isinstance(bn.running_mean, Tensor) and isinstance(bn.running_var, Tensor)
    rm, rv = bn.running_mean, bn.running_var
    c = rm.numel()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, c, *([3] * spatial)), generator=gen, dtype=torch.float32)
    x = x.to(dtype=rm.dtype, device=rm.device)
    gamma, beta = bn_affine(bn)
    shape = (1, c, *([1] * spatial))
    scale = torch.rsqrt(rv.float() + bn_eps(bn))
    if gamma is not None:
        scale = scale * gamma.float()
    shift = -rm.float() * scale + (beta.float() if beta is not None else 0.0)
    expected = x.float() * scale.reshape(shape) + shift.reshape(shape)
    try:
        with torch.no_grad():
            y = bn(x)
    except Exception:
        return False
    tol = 1e-4 if rm.dtype in (torch.float32, torch.float64) else 2e-2
    return bool(torch.allclose(y.float(), expected, rtol=tol, atol=tol, equal_nan=True))


def _why_not_either(layer: nn.Module, bn: nn.Module) -> str | None:
    """What stops folding ``bn`` into ``layer`` on either side of it, or ``None``."""
    base = _stock_base(layer)
    if base is None:
        return f"{type(layer).__name__} overrides the stock Conv/Linear forward"
    if parametrize.is_parametrized(layer):
        return "the layer's weight is parametrized"
    if _has_hooks(layer) or _has_hooks(bn):
        return "the layer or the BatchNorm has hooks"
    if not has_running_stats(bn):
        return "no running statistics (track_running_stats=False): eval uses batch statistics"
    return None


def _why_not(layer: nn.Module, bn: nn.Module) -> str | None:
    """The reason ``bn`` cannot be folded into ``layer``, or ``None`` when it can."""
    reason = _why_not_either(layer, bn)
    if reason is not None:
        return reason
    base = _stock_base(layer)
    assert base is not None  # checked by _why_not_either
    assert isinstance(bn.running_mean, Tensor)
    c = bn.running_mean.numel()
    out = layer.out_features if base is nn.Linear else layer.out_channels
    if out != c:
        return f"the layer has {out} output channels, the BatchNorm {c}"
    spatial = 0 if base is nn.Linear else CONV_TYPES[base][0]
    if base is not nn.Linear and bn_channel_axis(bn) not in (1, -spatial - 2):
        return f"channel_axis={bn_channel_axis(bn)} is not the convolution's channel axis"
    if not _probe_is_affine(bn, spatial):
        return (
            "its eval forward is not the affine map of its running statistics (fused activation?)"
        )
    return None


def _why_not_next(bn: nn.Module, layer: nn.Module) -> str | None:
    """The reason ``bn`` cannot be folded into ``layer``, the layer it feeds, or ``None``."""
    reason = _why_not_either(layer, bn)
    if reason is not None:
        return reason
    base = _stock_base(layer)
    assert base is not None  # checked by _why_not_either
    if base in CONV_TYPES and CONV_TYPES[base][1]:
        return (
            f"folding into the {type(layer).__name__} after it is not exact (how much of the "
            "BatchNorm's shift reaches an output depends on the output position)"
        )
    assert isinstance(bn.running_mean, Tensor)
    c = bn.running_mean.numel()
    fan_in = layer.in_features if base is nn.Linear else layer.in_channels
    if fan_in != c:
        return f"the layer after it has {fan_in} input channels, the BatchNorm {c}"
    if base is nn.Linear:
        if _spatial(bn) != 1:
            return (
                "a Linear reads the last axis: only a BatchNorm1d over (N, C) or channel-last "
                "(N, L, C) input folds into it"
            )
    else:
        if bn_channel_axis(bn) != 1:
            return f"channel_axis={bn_channel_axis(bn)} is not the convolution's channel axis"
        padding: list[int] = list(getattr(layer, "_reversed_padding_repeated_twice", []))
        padded = any(int(p) for p in padding)
        if padded and layer.padding_mode == "zeros":
            return (
                f"the {type(layer).__name__} after it pads with zeros (padding={layer.padding}): "
                "folding into it is exact only with padding=0 or a padding_mode other than 'zeros'"
            )
    spatial = 0 if base is nn.Linear else CONV_TYPES[base][0]
    if not _probe_is_affine(bn, spatial):
        return (
            "its eval forward is not the affine map of its running statistics (fused activation?)"
        )
    return None


def _spatial(bn: nn.Module) -> int | None:
    """The input rank a batch norm takes (``None``: unknown, e.g. a SyncBatchNorm)."""
    try:
        spatial = describe(bn).spatial
    except TypeError:
        return None
    return spatial if spatial is not None else getattr(bn, "_source_spatial", None)


def _folded_next(bn: nn.Module, layer: nn.Module) -> nn.Module:
    """A copy of ``layer`` computing ``layer(bn(x))`` in eval mode (``layer`` and ``bn`` untouched)."""
    assert isinstance(bn.running_mean, Tensor) and isinstance(bn.running_var, Tensor)
    gamma, beta = bn_affine(bn)
    weight, bias = layer.weight, layer.bias
    assert isinstance(weight, Tensor)
    with torch.no_grad():
        new_w, new_b = fold_bn_conv_weights(
            weight,
            bias if isinstance(bias, Tensor) else None,
            bn.running_mean,
            bn.running_var,
            bn_eps(bn),
            gamma,
            beta,
            groups=int(getattr(layer, "groups", 1)),
        )
    new = copy.deepcopy(layer)
    new.weight = nn.Parameter(new_w, requires_grad=weight.requires_grad)
    new.bias = nn.Parameter(new_b, requires_grad=weight.requires_grad)
    return new


def _combine(previous: str, after: str | None, name: str) -> str:
    """One reason for a BatchNorm that folds in neither direction."""
    if after is None or after == previous:
        return previous
    return f"{previous}; nor into the layer after it ({name}): {after}"


def _folded_layer(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``layer`` computing ``bn(layer(x))`` in eval mode (``layer`` and ``bn`` untouched)."""
    base = _stock_base(layer)
    assert base is not None and isinstance(bn.running_mean, Tensor)
    assert isinstance(bn.running_var, Tensor)
    transpose = base in CONV_TYPES and CONV_TYPES[base][1]
    gamma, beta = bn_affine(bn)
    weight, bias = layer.weight, layer.bias
    assert isinstance(weight, Tensor)
    with torch.no_grad():
        new_w, new_b = fold_conv_bn_weights(
            weight,
            bias if isinstance(bias, Tensor) else None,
            bn.running_mean,
            bn.running_var,
            bn_eps(bn),
            gamma,
            beta,
            transpose=transpose,
            groups=int(getattr(layer, "groups", 1)),
        )
    new = copy.deepcopy(layer)
    new.weight = nn.Parameter(new_w, requires_grad=weight.requires_grad)
    new.bias = nn.Parameter(new_b, requires_grad=weight.requires_grad)
    return new


def _shared_ids(model: nn.Module) -> set[int]:
    counts = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    return {i for i, n in counts.items() if n > 1}


def _fold_fx(model: nn.Module) -> tuple[fx.GraphModule, FoldReport]:
    tracer = NormLeafTracer()
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    report = FoldReport("fx")
    seen: set[str] = set()
    for node in list(graph.nodes):
        if node.op != "call_module" or not is_batchnorm(modules[str(node.target)]):
            continue
        bn_name = str(node.target)
        if bn_name in seen:
            continue
        seen.add(bn_name)
        bn = modules[bn_name]
        prev = node.args[0] if node.args else None
        reason: str | None
        if len(node.args) != 1 or node.kwargs:
            reason = "called with extra arguments"
        elif not (
            isinstance(prev, fx.Node)
            and prev.op == "call_module"
            and isinstance(modules[str(prev.target)], (*CONV_TYPES, nn.Linear))
        ):
            reason = "its input is not the output of a Conv/ConvTranspose/Linear module"
        elif len(prev.users) > 1:
            reason = f"the output of {prev.target} has other users"
        elif calls[prev.target] > 1 or calls[bn_name] > 1:
            reason = f"{prev.target} or the BatchNorm is called more than once"
        else:
            reason = _why_not(modules[str(prev.target)], bn)
        if reason is None:
            assert isinstance(prev, fx.Node)
            layer_name = str(prev.target)
            modules[layer_name] = _folded_layer(modules[layer_name], bn)
            gm.set_submodule(layer_name, modules[layer_name])
            node.replace_all_uses_with(prev)
            graph.erase_node(node)
            gm.delete_submodule(bn_name)
            report.add(layer_name, bn_name, "previous")
            continue
        nxt = next(iter(node.users)) if len(node.users) == 1 else None
        if not (
            nxt is not None
            and nxt.op == "call_module"
            and isinstance(modules[str(nxt.target)], (*CONV_TYPES, nn.Linear))
        ):
            report.skipped.append((bn_name, reason))
            continue
        next_name = str(nxt.target)
        after: str | None
        if len(node.args) != 1 or node.kwargs or nxt.args != (node,) or nxt.kwargs:
            after = "called with extra arguments"
        elif calls[nxt.target] > 1 or calls[bn_name] > 1:
            after = f"{next_name} or the BatchNorm is called more than once"
        else:
            after = _why_not_next(bn, modules[next_name])
        if after is not None:
            report.skipped.append((bn_name, _combine(reason, after, next_name)))
            continue
        modules[next_name] = _folded_next(bn, modules[next_name])
        gm.set_submodule(next_name, modules[next_name])
        nxt.replace_input_with(node, node.args[0])
        graph.erase_node(node)
        gm.delete_submodule(bn_name)
        report.add(next_name, bn_name, "next")
    for name, m in model.named_modules():
        if is_batchnorm(m) and name not in seen and name and not _inside_batchnorm(model, name):
            report.skipped.append((name, "not called by the traced forward"))
    graph.lint()
    gm.recompile()
    return gm, report


def _fold_sequential(model: nn.Module, trace_error: str) -> FoldReport:
    report = FoldReport("sequential", trace_error=trace_error)
    shared = _shared_ids(model)
    placed: set[str] = set()
    layer_types = (*CONV_TYPES, nn.Linear)
    for seq_name, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        names = list(seq._modules)
        prefix = f"{seq_name}." if seq_name else ""
        for i, name in enumerate(names):
            bn = seq._modules[name]
            if bn is None or not is_batchnorm(bn):
                continue
            # the current neighbours: a layer may already hold a fold
            before = seq._modules[names[i - 1]] if i > 0 else None
            after = seq._modules[names[i + 1]] if i + 1 < len(names) else None
            if not (isinstance(before, layer_types) or isinstance(after, layer_types)):
                continue
            placed.add(prefix + name)
            reasons: list[str] = []
            sides: list[tuple[nn.Module | None, Direction]] = [
                (before, "previous"),
                (after, "next"),
            ]
            for neighbour, direction in sides:
                if neighbour is None or not isinstance(neighbour, layer_types):
                    continue
                reason: str | None
                if id(neighbour) in shared or id(bn) in shared:
                    reason = "the layer or the BatchNorm is used in more than one place"
                elif direction == "previous":
                    reason = _why_not(neighbour, bn)
                else:
                    reason = _why_not_next(bn, neighbour)
                if reason is None:
                    other = names[i - 1] if direction == "previous" else names[i + 1]
                    seq._modules[other] = (
                        _folded_layer(neighbour, bn)
                        if direction == "previous"
                        else _folded_next(bn, neighbour)
                    )
                    seq._modules[name] = nn.Identity()
                    report.add(prefix + other, prefix + name, direction)
                    break
                reasons.append(reason)
            else:
                text = reasons[0]
                if len(reasons) == 2:
                    text = _combine(reasons[0], reasons[1], prefix + names[i + 1])
                report.skipped.append((prefix + name, text))
    for name, m in model.named_modules():
        if is_batchnorm(m) and name not in placed and not _inside_batchnorm(model, name):
            report.skipped.append(
                (
                    name or "<model>",
                    "not directly after or before a Conv/Linear inside an nn.Sequential",
                )
            )
    return report


def _inside_batchnorm(model: nn.Module, name: str) -> bool:
    """Whether the module at ``name`` is part of a batch norm above it (a split layer's
    auxiliary batch norms): it goes wherever that layer goes."""
    parts = name.split(".")
    return any(is_batchnorm(model.get_submodule(".".join(parts[:k]))) for k in range(1, len(parts)))


def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> tuple[nn.Module, FoldReport]:
    """Eval-mode copy of ``model`` with every foldable BatchNorm folded into a layer next to it.

    A BatchNorm (torch's, normlab's incl. variants, or ``FrozenBatchNorm*``) is
    folded into the layer *before* it when its input is the output of a ``Conv1d/2d/3d``,
    ``ConvTranspose1d/2d/3d`` or ``Linear`` (stock forward, no hooks or
    parametrizations) that has no other user, it has running statistics, and its
    eval forward is the affine map of them (checked on a probe, which rules out
    fused activations): the pair becomes one layer with :func:`fold_conv_bn_weights`.
    Otherwise it is folded into the layer *after* it when its output goes only to a
    ``Conv1d/2d/3d`` or ``Linear`` where that is exact (:func:`fold_bn_conv_weights`: a
    convolution with ``padding=0`` or a non-zero ``padding_mode``; a ``Linear`` after a
    ``BatchNorm1d``) — pytorch/pytorch#144403. Outputs equal the original eval model's up
    to rounding; ``FoldReport.direction`` says which way each fold went, and
    ``FoldReport.skipped`` why a BatchNorm was kept (both directions' reasons).

    Finding the pairs: ``model`` is traced with :class:`NormLeafTracer`
    (``torch.fx``; every BatchNorm is a leaf). The result is then an
    ``fx.GraphModule`` of the *eval-mode* forward, with the folded BatchNorms
    removed and the parameter names of all other layers kept. If tracing fails
    (e.g. data-dependent control flow), pairs are matched by module order inside
    every ``nn.Sequential`` at any depth, folded layers replaced in place and the
    BatchNorm replaced by ``nn.Identity``; the result has ``model``'s class.

    For a ``Linear`` followed (or preceded) by a ``BatchNorm1d`` over axis 1, the
    activation is assumed to be ``(N, features)`` — the only layout in which axis 1 is the
    Linear's output (input).

    Parameters
    ----------
    model : nn.Module
        Any model; its training flag is ignored (the result is in eval mode).
    inplace : bool
        ``False`` (default) works on a deep copy, so the result shares nothing with
        ``model``. ``True`` skips the copy: the Sequential fallback modifies ``model`` itself;
        an fx result shares the untouched layers' tensors with ``model`` (which is set to
        eval mode but keeps working).

    Returns
    -------
    (nn.Module, FoldReport)
        The folded eval-mode model (same inputs and output shapes as ``model``) and what
        was folded or kept, and why.

    Raises
    ------
    TypeError
        ``model`` is not an ``nn.Module``, or cannot be deep-copied (pass ``inplace=True``).

    Examples
    --------
    >>> import torch
    >>> from normlab.nn.utils import fold_batchnorm
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    >>> _ = model(torch.randn(4, 3, 8, 8))                # some running statistics
    >>> folded, report = fold_batchnorm(model)
    >>> x = torch.randn(2, 3, 8, 8)
    >>> torch.allclose(folded(x), model.eval()(x), atol=1e-5), len(report.folded)
    (True, 1)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm expects an nn.Module, got {type(model).__name__}")
    if inplace:
        work = model
    else:
        try:
            work = copy.deepcopy(model)
        except Exception as error:  # e.g. an attribute holding a lock or a file handle
            raise TypeError(
                f"fold_batchnorm: the model cannot be deep-copied ({error}); pass inplace=True"
            ) from error
    work.eval()
    try:
        gm, report = _fold_fx(work)
    except Exception as error:
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        return work, _fold_sequential(work, message)
    gm.eval()
    return gm, report
