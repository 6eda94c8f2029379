"""``audit_batchnorm``: a linter for the BatchNorm mistakes users report most."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..._table import render_table
from ._common import CONV_TYPES, bn_channel_axis, bn_eps, has_running_stats, is_batchnorm
from ._fold import NormLeafTracer

__all__ = ["AuditReport", "Finding", "audit_batchnorm"]

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One problem :func:`audit_batchnorm` found.

    Parameters
    ----------
    module : str
        The layer's path in the model (``"features.3"``).
    code : str
        A stable identifier: ``bias-before-bn``, ``untracked``, ``nonfinite-stats``,
        ``near-zero-var``, ``momentum``, ``train-mode-inference``, ``single-value``,
        ``example-failed``.
    severity : {"error", "warning"}
        How bad it is.
    problem : str
        What is wrong.
    fix : str
        What to do about it.

    Examples
    --------
    >>> import torch
    >>> from normlab.nn.utils import audit_batchnorm
    >>> finding = audit_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(3)))[0]
    >>> finding.module, finding.code, finding.severity
    ('0', 'untracked', 'warning')
    """

    module: str
    code: str
    severity: Severity
    problem: str
    fix: str


@dataclass
class AuditReport(Sequence[Finding]):
    """The findings of :func:`audit_batchnorm`: a sequence of :class:`Finding` that prints as a table.

    Parameters
    ----------
    findings : list of Finding
        In model order.

    Examples
    --------
    >>> import torch
    >>> from normlab.nn.utils import audit_batchnorm
    >>> report = audit_batchnorm(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)))
    >>> sorted(report.codes()), len(report)
    (['bias-before-bn', 'untracked'], 2)
    >>> print(report)  # doctest: +ELLIPSIS
    audit_batchnorm: 2 finding(s)
    severity  module  problem ...
    """

    findings: list[Finding] = field(default_factory=list)

    @overload
    def __getitem__(self, index: int) -> Finding: ...
    @overload
    def __getitem__(self, index: slice) -> list[Finding]: ...
    def __getitem__(self, index: int | slice) -> Finding | list[Finding]:
        return self.findings[index]

    def __len__(self) -> int:
        return len(self.findings)

    def __iter__(self) -> Iterator[Finding]:
        return iter(self.findings)

    def codes(self) -> set[str]:
        """The set of finding codes (handy in tests and CI checks).

        Returns
        -------
        set of str

        Examples
        --------
        >>> from normlab.nn.utils import AuditReport
        >>> AuditReport().codes()
        set()
        """
        return {f.code for f in self.findings}

    def __str__(self) -> str:
        if not self.findings:
            return "audit_batchnorm: no problems found"
        rows = [(f.severity, f.module, f.problem, f.fix) for f in self.findings]
        return render_table(
            f"audit_batchnorm: {len(self.findings)} finding(s)",
            ["severity", "module", "problem", "fix"],
            rows,
        )


def _feeding_layers(model: nn.Module) -> list[tuple[str, str]]:
    """``(layer path, bn path)`` where a Conv/Linear's only output user is a BatchNorm."""
    layer_types = (*CONV_TYPES, nn.Linear)
    try:
        tracer = NormLeafTracer()
        graph = tracer.trace(model)
    except Exception:
        pairs = []
        for seq_name, seq in model.named_modules():
            if not isinstance(seq, nn.Sequential):
                continue
            items = list(seq._modules.items())
            for (name_a, a), (name_b, b) in itertools.pairwise(items):
                if isinstance(a, layer_types) and b is not None and is_batchnorm(b):
                    prefix = f"{seq_name}." if seq_name else ""
                    pairs.append((prefix + name_a, prefix + name_b))
        return pairs
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not is_batchnorm(modules[str(node.target)]):
            continue
        prev = node.args[0] if node.args else None
        if (
            isinstance(prev, fx.Node)
            and prev.op == "call_module"
            and isinstance(modules[str(prev.target)], layer_types)
            and len(prev.users) == 1
        ):
            pairs.append((str(prev.target), str(node.target)))
    return pairs


def _check_stats(name: str, bn: nn.Module) -> list[Finding]:
    found: list[Finding] = []
    if not has_running_stats(bn):
        return found
    rm, rv = bn.running_mean, bn.running_var
    assert isinstance(rm, Tensor) and isinstance(rv, Tensor)
    tracked = getattr(bn, "num_batches_tracked", None)
    if isinstance(tracked, Tensor) and int(tracked) == 0:
        found.append(
            Finding(
                name,
                "untracked",
                "warning",
                "num_batches_tracked is 0: the running statistics were never updated in "
                "training (eval mode normalizes with the initial mean 0 / var 1, unless imported)",
                "train the model, or run normlab.nn.utils.recalibrate_batchnorm(model, data) before eval",
            )
        )
    bad = int((~torch.isfinite(rm)).sum() + (~torch.isfinite(rv)).sum())
    if bad:
        found.append(
            Finding(
                name,
                "nonfinite-stats",
                "error",
                f"{bad} running statistic value(s) are NaN/Inf: every eval output of the layer is non-finite",
                "find the NaN/Inf batch; recalibrate_batchnorm on clean data; "
                "normlab BatchNorm's nonfinite='skip' keeps such batches out",
            )
        )
    eps = bn_eps(bn)
    tiny = int((torch.isfinite(rv) & (rv < eps)).sum())
    if tiny:
        found.append(
            Finding(
                name,
                "near-zero-var",
                "warning",
                f"{tiny} of {rv.numel()} channels have running variance < eps={eps:g}: "
                f"constant or dead channels, scaled by up to 1/sqrt(eps)={1 / math.sqrt(eps):.3g} in eval",
                "check for dead (always-zero) channels upstream; prune them or raise eps",
            )
        )
    momentum = getattr(bn, "momentum", None)
    if isinstance(momentum, (int, float)) and momentum >= 0.5:
        found.append(
            Finding(
                name,
                "momentum",
                "warning",
                f"momentum={momentum:g} ≥ 0.5: torch updates running = (1 − m)·running + m·batch, so "
                f"only {1 - momentum:.3g} of the history is kept — a Keras/Flax momentum mistaken for torch's?",
                f"use torch momentum = 1 − keras_momentum = {1 - momentum:.3g} "
                "(normlab.nn.utils.convert_momentum)",
            )
        )
    return found


def _run_example(
    model: nn.Module, example_input: Any, bns: dict[str, nn.Module]
) -> tuple[dict[str, torch.Size], BaseException | None]:
    """Input shape seen by every BatchNorm for ``example_input``; the model's state is left as it was."""
    shapes: dict[str, torch.Size] = {}
    handles = []
    for name, bn in bns.items():

        def hook(module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            if args and isinstance(args[0], Tensor):
                shapes.setdefault(name, args[0].shape)

        handles.append(bn.register_forward_pre_hook(hook))
    flags = {m: m.training for m in model.modules()}
    state = {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}
    error: BaseException | None = None
    try:
        model.eval()
        with torch.no_grad():
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            model(*args)
    except Exception as caught:
        error = caught
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.training = flag
        with torch.no_grad():
            current = model.state_dict(keep_vars=True)
            for k, v in state.items():
                current[k].copy_(v)
    return shapes, error


def audit_batchnorm(model: nn.Module, example_input: Any = None) -> AuditReport:
    """Lint ``model``'s BatchNorm layers; return the findings (printable as a table).

    Checks, per BatchNorm (torch's, normlab's, Frozen):

    * ``bias-before-bn``: a Conv/Linear with a bias whose only consumer is the
      BatchNorm — BN subtracts the mean, so the bias is a wasted parameter
      (found with ``torch.fx``, or inside ``nn.Sequential`` if the model does not trace);
    * ``untracked``: ``num_batches_tracked == 0`` (running stats never updated);
    * ``nonfinite-stats``: NaN/Inf running statistics;
    * ``near-zero-var``: channels with running variance below ``eps``;
    * ``momentum``: ``momentum ≥ 0.5`` — torch's momentum is ``1 −`` Keras/Flax's;

    and with ``example_input`` (a tensor or a tuple of positional arguments; the
    model runs once in eval mode under ``no_grad``, its state restored after):

    * ``train-mode-inference``: the audit is called under ``torch.no_grad()`` or
      ``torch.inference_mode()`` (i.e. for inference) while the BN is in training mode;
    * ``single-value``: at this input size a channel sees one value per batch,
      which training rejects;
    * ``example-failed``: the example forward raised.

    Parameters
    ----------
    model : nn.Module
        Any model; it is not modified.
    example_input : Tensor or tuple, optional
        An input batch (e.g. ``(N, C, H, W)``), or a tuple of ``forward``'s positional
        arguments, for the checks that need a forward pass.

    Returns
    -------
    AuditReport
        The findings; ``print(report)`` shows a table, ``report.codes()`` the codes.

    Examples
    --------
    >>> import torch
    >>> from normlab.nn.utils import audit_batchnorm
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.99))
    >>> sorted(audit_batchnorm(model, torch.randn(2, 3, 8, 8)).codes())
    ['bias-before-bn', 'momentum', 'untracked']
    """
    bns = {name: m for name, m in model.named_modules() if is_batchnorm(m)}
    report = AuditReport()
    for layer, bn in _feeding_layers(model):
        if isinstance(getattr(model.get_submodule(layer), "bias", None), Tensor):
            report.findings.append(
                Finding(
                    layer,
                    "bias-before-bn",
                    "warning",
                    f"has a bias but feeds {bn} directly: BN subtracts the batch mean, so the bias is wasted",
                    "construct the layer with bias=False",
                )
            )
    for name, bn in bns.items():
        report.findings.extend(_check_stats(name or "<model>", bn))
    if example_input is None:
        return report
    inference = torch.is_inference_mode_enabled() or not torch.is_grad_enabled()
    if inference:
        for name, bn in bns.items():
            if bn.training:
                report.findings.append(
                    Finding(
                        name or "<model>",
                        "train-mode-inference",
                        "error",
                        "in training mode while run for inference (no_grad/inference_mode): outputs "
                        "depend on the batch and running statistics keep changing",
                        "call model.eval() before inference",
                    )
                )
    shapes, error = _run_example(model, example_input, bns)
    for name, shape in shapes.items():
        axis = bn_channel_axis(bns[name]) if len(shape) == 3 else 1
        channels = shape[axis] if len(shape) > 1 else 1
        per_channel = math.prod(shape) // max(channels, 1)
        if per_channel == 1:
            report.findings.append(
                Finding(
                    name or "<model>",
                    "single-value",
                    "error",
                    f"input {tuple(shape)} gives each channel a single value per batch: training "
                    "raises 'Expected more than 1 value per channel'",
                    "use a larger batch, GroupNorm/LayerNorm, or normlab's single_sample='running'",
                )
            )
    if error is not None:
        report.findings.append(
            Finding(
                "<model>",
                "example-failed",
                "error",
                f"the example forward raised {type(error).__name__}: {error}",
                "check example_input's shape and dtype",
            )
        )
    return report
