r"""Training-mode batch norm: the one ``autograd.Function`` every layer and variant runs through.

A variant supplies only what differs from plain batch norm, as fields of a :class:`Plan`:

* ``act`` — an activation after the affine map (BN+act); with ``save_output`` and an
  invertible activation only the output is kept, and the input is rebuilt from it in the
  backward (InPlace-ABN);
* ``chunks`` — consecutive batch chunks normalized each with its own statistics (Ghost BN);
* ``correction(mean, var) -> (r, d)`` — an affine epilogue with constants (Batch Renorm):
  ``y = γ·(r·x̂ + d) + β``, run as plain batch norm with ``γ' = γ·r``, ``β' = β + γ·d``, and
  ``dγ = r·Σ g·x̂ + d·Σ g`` in the backward;
* ``reducer`` — the cross-process reduction (SyncBN): of the local ``(mean, var, count)`` in
  the forward, of the sums ``(Σ g, Σ g·x̂)`` in the backward.

Forward and backward are the kernel's (:mod:`._backend`); what a kernel does not fuse is
composed here, once, for every kernel: an activation after it, a loop over chunks. The
backward is the closed form ``dx = γ/σ · (g − Σg/n − x̂·Σ(g·x̂)/n)`` with ``g = dy·f'(z)``;
under ``create_graph=True`` it differentiates the reference forward instead, so double
backward works through every variant but SyncBN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from ._activation import Activation
from ._backend import BatchNormKernel
from ._reference import ReferenceKernel, grad_input, grad_sums, normalize, reference_forward

__all__ = ["Correction", "Plan", "Reducer", "TrainResult", "train"]

Correction = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
_GAMMA_EPS = 1e-5  # |γ| floor when the input is rebuilt from the output (as InPlace-ABN)


class Reducer(Protocol):
    """The cross-process part of SyncBN (see :class:`normlab.nn.SyncBatchNorm`).

    A protocol: an object with these two methods, set as :class:`LayerSpec`'s ``reducer``.

    Examples
    --------
    >>> import torch
    >>> from normlab.functional import LayerSpec, batch_norm_layer, batch_norm_stats
    >>> class OneProcess:                   # what SyncBN's reducer does with one process
    ...     def stats(self, x, mask):
    ...         return batch_norm_stats(x, mask=mask)
    ...     def sums(self, sums):
    ...         return sums
    >>> spec = LayerSpec("demo", 3, reducer=OneProcess())
    >>> batch_norm_layer(torch.randn(4, 3), None, None, None, None, None, None, spec).shape
    torch.Size([4, 3])
    """

    def stats(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Global ``(mean, biased var, count)`` per channel over every process's batch.

        Parameters
        ----------
        x : Tensor, shape (N, C, *)
            This process's batch.
        mask : Tensor of bool or None
            Its valid positions.

        Returns
        -------
        (Tensor, Tensor, Tensor)
            Each ``(C,)``.
        """
        ...

    def sums(self, sums: Tensor) -> Tensor:
        """``(2, C)`` gradient sums added over the processes.

        Parameters
        ----------
        sums : Tensor, shape (2, C)
            This process's ``(Σ g, Σ g·x̂)``.

        Returns
        -------
        Tensor
            The sums over every process, ``(2, C)``.
        """
        ...


class Plan(NamedTuple):
    """How one training call runs: the kernel and what the variant adds (see the module doc).

    Parameters
    ----------
    kernel : BatchNormKernel
        Computes the statistics, the forward and the closed-form backward.
    eps : float
        Added to the variance.
    act : Activation, optional
        BN+act's activation.
    chunks : list of int, optional
        Ghost BN's chunk sizes.
    correction : callable, optional
        Batch Renorm's ``(mean, var) -> (r, d)``.
    reducer : Reducer, optional
        SyncBN's cross-process reduction.
    save_output : bool
        Keep only the output for backward where the activation is invertible.

    Examples
    --------
    >>> from normlab.functional import Plan, ReferenceKernel, make_activation
    >>> Plan(ReferenceKernel(), 1e-5, act=make_activation("elu"), save_output=True).keeps_output
    True
    """

    kernel: BatchNormKernel
    eps: float
    act: Activation | None = None
    chunks: list[int] | None = None
    correction: Correction | None = None
    reducer: Reducer | None = None
    save_output: bool = False

    @property
    def keeps_output(self) -> bool:
        """Only ``y`` is saved for backward (memory-saving BN+act).

        Examples
        --------
        >>> from normlab.functional import Plan, ReferenceKernel, make_activation
        >>> Plan(ReferenceKernel(), 1e-5, act=make_activation("gelu"), save_output=True).keeps_output
        False
        """
        return (
            self.save_output and self.chunks is None and (self.act is None or self.act.invertible)
        )


# ---------- composition: what the kernel does not fuse ----------
def _fusable(kernel: BatchNormKernel, act: Activation | None) -> Activation | None:
    return act if act is not None and act.name in kernel.activations else None


def _forward_train(
    plan: Plan, x: Tensor, weight: Tensor | None, bias: Tensor | None, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The kernel's training forward with the plan's activation and chunks; ``(y, mean, var,
    invstd)``, statistics ``(G·C,)``."""
    k, act = plan.kernel, plan.act
    if plan.chunks is not None and not k.chunked:  # one kernel call per chunk
        parts = [
            _forward_train(plan._replace(chunks=None), p, weight, bias, None)
            for p in x.split(plan.chunks)
        ]
        y = torch.cat([p[0] for p in parts])
        return y, *(torch.cat([p[i] for p in parts]) for i in (1, 2, 3))  # type: ignore[return-value]
    fused = _fusable(k, act)
    y, mean, var, invstd = k.forward_train(x, weight, bias, plan.eps, fused, plan.chunks, mask)
    if act is not None and fused is None:
        y = act.forward(y, inplace=True)  # the batch-norm output is not kept
    return y, mean, var, invstd


def _normalize(
    plan: Plan,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
) -> Tensor:
    """``f(γ·(x − mean)·invstd + β)`` with given statistics (no chunks)."""
    if mask is not None:
        return normalize(x, mean, invstd, weight, bias, mask, plan.act)
    fused = _fusable(plan.kernel, plan.act)
    y = plan.kernel.forward_eval(x, mean, var, weight, bias, plan.eps, fused)
    return y if plan.act is None or fused is not None else plan.act.forward(y, inplace=True)


def _backward_train(
    plan: Plan,
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    invstd: Tensor,
    needs: tuple[bool, bool, bool],
    mask: Tensor | None,
    act: Activation | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The kernel's closed-form backward, with ``act``'s derivative and the chunks composed."""
    k, chunks = plan.kernel, plan.chunks
    if chunks is not None and not k.chunked:
        c = x.shape[1]
        dxs, dw, db = [], None, None
        for i, (xp, dyp) in enumerate(zip(x.split(chunks), dy.split(chunks))):
            s = slice(i * c, (i + 1) * c)
            g = _backward_train(
                plan._replace(chunks=None),
                dyp,
                xp,
                weight,
                bias,
                mean[s],
                var[s],
                invstd[s],
                needs,
                None,
                act,
            )
            dxs.append(g[0])
            dw = g[1] if dw is None else dw + g[1]  # type: ignore[operator]
            db = g[2] if db is None else db + g[2]  # type: ignore[operator]
        return (torch.cat(dxs) if needs[0] else None), dw, db  # type: ignore[arg-type]
    fused = _fusable(k, act)
    if act is not None and fused is None:  # g = dy·f'(z), z recomputed in one pass
        z = (
            k.forward_eval(x, mean, var, weight, bias, plan.eps, None)
            if mask is None
            else (normalize(x, mean, invstd, weight, bias, mask))
        )
        dy = act.backward(dy, z)
    return k.backward_train(dy, x, weight, bias, mean, invstd, needs, fused, chunks, mask)


def _safe_gamma(weight: Tensor | None) -> Tensor | None:
    if weight is None:
        return None
    sign = torch.where(weight >= 0, 1.0, -1.0).to(weight.dtype)
    return sign * weight.abs().clamp_min(_GAMMA_EPS)


def _rebuild_input(
    plan: Plan, y: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor | None, bias: Tensor | None
) -> Tensor:
    """``x`` from the kept output ``y`` (invertible activation, ``gamma`` kept away from 0)."""
    x = plan.kernel.invert(y, mean, invstd, gamma, bias, plan.act)
    return x if x is not None else ReferenceKernel.invert(y, mean, invstd, gamma, bias, plan.act)


def _effective_affine(
    weight: Tensor | None, bias: Tensor | None, r: Tensor | None, d: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """``(γ·r, β + γ·d)`` — Batch Renorm's correction folded into the affine map."""
    if r is None or d is None:
        return weight, bias
    if weight is None:
        return r, d if bias is None else d + bias.to(d.dtype)
    w = weight.to(r.dtype)
    b = w * d if bias is None else w * d + bias.to(d.dtype)
    return (w * r).to(weight.dtype), b.to(weight.dtype)


# ---------- the one autograd.Function ----------
class _BatchNormTrain(torch.autograd.Function):
    """Outputs ``(y, mean, var, invstd, r, d, count)``; only ``y`` is differentiable.

    ``r``/``d`` are the correction's constants and ``count`` the reducer's global count
    (``None`` without them). Written in the ``setup_context`` style with
    ``generate_vmap_rule`` so that ``torch.func.vmap``/``grad`` work (on the reference kernel).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor, weight: Tensor | None, bias: Tensor | None, mask: Tensor | None, plan: Plan
    ) -> tuple[Any, ...]:
        if plan.correction is None and plan.reducer is None:
            y, mean, var, invstd = _forward_train(plan, x, weight, bias, mask)
            return y, mean, var, invstd, None, None, None
        count = None
        if plan.reducer is not None:
            mean, var, count = plan.reducer.stats(x, mask)
        elif mask is None:
            mean, var = plan.kernel.stats(x)
        else:
            mean, var = ReferenceKernel.stats(x, None, mask)
        invstd = torch.rsqrt(var + plan.eps)
        r = d = None
        if plan.correction is not None:
            r, d = plan.correction(mean, var)
        w, b = _effective_affine(weight, bias, r, d)
        y = _normalize(plan, x, mean, var, invstd, w, b, mask)
        return y, mean, var, invstd, r, d, count

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        x, weight, bias, mask, plan = inputs
        y, mean, var, invstd, r, d, count = output
        kept = y if plan.keeps_output else x
        ctx.save_for_backward(kept, weight, bias, mask, mean, var, invstd, r, d, count)
        ctx.mark_non_differentiable(*(t for t in (mean, var, invstd, r, d, count) if t is not None))
        ctx.plan = plan

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *_unused: Any) -> tuple[Tensor | None, ...]:
        kept, weight, bias, mask, mean, var, invstd, r, d, count = ctx.saved_tensors
        plan: Plan = ctx.plan
        needs: tuple[bool, bool, bool] = tuple(ctx.needs_input_grad[:3])
        if torch.is_grad_enabled() and any(needs):
            grads = _differentiable_backward(plan, dy, kept, weight, bias, mask, r, d, needs)
        else:
            grads = _closed_form_backward(
                plan, dy, kept, weight, bias, mask, mean, var, invstd, r, d, count, needs
            )
        return (*grads, None, None)


# torch's ``Function.apply`` binds the arguments to ``forward``'s signature on every call when
# ``setup_context`` is defined (``inspect.signature`` + ``bind``: 40-60 us of a small
# Renorm/Ghost/BN+act forward and backward, min of 30 alternating trials). :func:`train` passes all five
# arguments positionally, so outside dynamo and functorch transforms it calls what torch's
# ``apply`` then calls: the C ``_FunctionBase.apply`` bound to the class, after unwrapping
# dead functorch wrappers. (Overriding ``apply`` instead breaks dynamo's tracing.)
_apply_positional = super(torch.autograd.Function, _BatchNormTrain).apply
# private torch helpers (present since torch 2.1); without them, torch's own apply is used
_unwrap_dead_wrappers: Any = getattr(
    getattr(torch, "_functorch", None) and torch._functorch.utils, "unwrap_dead_wrappers", None
)
_transforms_active: Any = getattr(torch._C, "_are_functorch_transforms_active", None)


def _closed_form_backward(
    plan: Plan,
    dy: Tensor,
    kept: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    mean: Tensor,
    var: Tensor,
    invstd: Tensor,
    r: Tensor | None,
    d: Tensor | None,
    count: Tensor | None,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    w, b = _effective_affine(weight, bias, r, d)
    act = plan.act
    x = kept
    if plan.keeps_output:  # rebuild the input from the output (InPlace-ABN)
        w = _safe_gamma(w)
        x = _rebuild_input(plan, kept, mean, invstd, w, b)
        if act is not None and not (
            _fusable(plan.kernel, act) is not None and kept.dtype in (torch.float32, torch.float64)
        ):
            # f'(z) from y's sign: a 16-bit x rebuilt near 0 may flip the sign of z
            dy, act = act.backward_from_output(dy, kept), None
    if plan.reducer is not None:
        assert count is not None
        dx, dw, db = _reduced_backward(plan, dy, x, w, b, mean, invstd, count, needs, mask, act)
    else:
        want = (needs[0], True, True) if r is not None else needs
        dx, dw, db = _backward_train(plan, dy, x, w, b, mean, var, invstd, want, mask, act)
    if r is not None and d is not None:  # Batch Renorm: dγ = r·Σ g·x̂ + d·Σ g
        assert dw is not None and db is not None
        dw = (
            (r * dw.to(r.dtype) + d * db.to(d.dtype)).to(weight.dtype)
            if weight is not None and needs[1]
            else None
        )
        db = db if needs[2] else None
    return dx, dw, db


def _reduced_backward(
    plan: Plan,
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    count: Tensor,
    needs: tuple[bool, bool, bool],
    mask: Tensor | None,
    act: Activation | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """SyncBN: the sums ``(Σg, Σg·x̂)`` added over processes, then the closed form with the
    global count; γ/β gradients stay this process's sums (as ``torch.nn.SyncBatchNorm``)."""
    assert plan.reducer is not None
    if act is not None:  # g = dy·f'(z), z recomputed
        z = normalize(x.to(mean.dtype), mean, invstd, weight, bias, mask)
        dy = act.backward(dy.to(mean.dtype), z)
    local = grad_sums(dy, x, mean, invstd, mask)  # (2, C)
    total = plan.reducer.sums(local.clone())
    dx = (
        grad_input(dy, x, weight, mean, invstd, total, count.clamp(min=1), mask)
        if needs[0]
        else None
    )
    dtype = weight.dtype if weight is not None else mean.dtype
    dw = local[1].to(dtype) if weight is not None and needs[1] else None
    db = dy.to(mean.dtype).sum([0, *range(2, x.dim())]).to(dtype) if needs[2] else None
    return dx, dw, db


def _differentiable_backward(
    plan: Plan,
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    r: Tensor | None,
    d: Tensor | None,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``create_graph=True``: gradients by autograd through the reference forward, so that
    they can be differentiated again (double backward, Hessian-vector products)."""
    if plan.reducer is not None:
        raise RuntimeError("SyncBatchNorm does not support double backward (create_graph=True)")
    if plan.keeps_output:
        raise RuntimeError(
            "a BatchNormAct layer keeps only its output and does not support double backward "
            "(create_graph=True, which torch.func.grad/jacrev use too); use a BatchNorm followed "
            "by the activation, or a non-invertible activation (relu, silu, gelu)"
        )
    inputs = [t for t, need in zip((x, weight, bias), needs) if need and t is not None]
    with torch.enable_grad():
        w, b = _effective_affine(weight, bias, r, d)
        y = reference_forward(x, w, b, plan.eps, plan.act, plan.chunks, mask)
        grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
    dx, dw, db = (
        next(grads) if need and t is not None else None for t, need in zip((x, weight, bias), needs)
    )
    return dx, dw, db


class TrainResult(NamedTuple):
    """``train``'s result: the output and the batch statistics (no gradient)."""

    y: Tensor
    mean: Tensor  # (C,), or (G, C) with chunks; the accumulation dtype
    var: Tensor  # biased, like mean
    total: Tensor | None  # the reducer's global count per channel, else None


def train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    plan: Plan,
    mask: Tensor | None = None,
) -> TrainResult:
    """Run ``plan`` on ``x`` ``(N, C, *)``: the one training entry point of every layer.

    Plain batch norm on a kernel with its own autograd (ATen) calls it directly; everything
    else goes through the one :class:`_BatchNormTrain` Function.
    """
    plain = (
        plan.act is None
        and plan.chunks is None
        and plan.correction is None
        and plan.reducer is None
        and mask is None
        and not plan.save_output
    )
    if plain and plan.kernel.differentiable:  # ATen: its C++ autograd is the closed form
        y, mean, var, _ = plan.kernel.forward_train(x, weight, bias, plan.eps)
        return TrainResult(y, mean.detach(), var.detach(), None)
    if (
        _unwrap_dead_wrappers is None
        or _transforms_active is None
        or torch.compiler.is_compiling()
        or _transforms_active()
    ):
        outputs = _BatchNormTrain.apply(x, weight, bias, mask, plan)
    else:  # torch's apply without its per-call signature binding (see _apply_positional)
        outputs = _apply_positional(*_unwrap_dead_wrappers((x, weight, bias, mask, plan)))
    y, mean, var, _, _, _, count = outputs
    if plan.chunks is not None:
        mean, var = mean.view(len(plan.chunks), -1), var.view(len(plan.chunks), -1)
    return TrainResult(y, mean, var, count)
