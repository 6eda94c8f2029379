"""Training an :class:`Ensemble`: data order per member, torch's optimizers, divergence, evaluation.

Every member draws its mini-batches with its own seed (its data order does not
depend on its companions) and may have its own learning rate. The optimizer is
torch's own (``torch.optim.SGD`` or ``Adam``): they are elementwise, so on
member-major stacked parameters each member is optimized separately. A per-member
learning rate is a per-member weight on the loss, hence on the gradient, under SGD
(with or without momentum, ``lr·g`` accumulates exactly like ``g`` at rate ``lr``);
Adam is invariant to gradient scale, so it takes one learning rate for all members.

A seed's result can still change with its companions: batched matrix products
round differently from single ones, and chaotic training amplifies rounding.
Treat seeds as random draws.

Device: :func:`training_device` (``normlab lab run --device``) moves the training — the stacked
forward and backward, the optimizer, the evaluations — to an accelerator. Everything else stays on
the CPU, so experiments need no device code: the data (each batch is sent as it is drawn), the data
order and any noise (drawn from CPU generators: a seed draws the same on every device),
:meth:`Ensemble.outputs` and :meth:`Ensemble.to_models` (CPU copies, for probes and hooks), and the
ensemble ``train_ensemble`` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import Dataset
from ..progress import report_progress
from ._stack import Ensemble

__all__ = [
    "MemberResult",
    "Probe",
    "TrainConfig",
    "evaluate",
    "make_optimizer",
    "member_batches",
    "train_ensemble",
    "train_step",
    "training_device",
]

_DEVICE: ContextVar[torch.device | None] = ContextVar("normlab_lab_device", default=None)


@contextmanager
def training_device(device: str | torch.device) -> Iterator[None]:
    """Train the ensembles of :func:`train_ensemble` calls inside the block on ``device`` (module
    docstring: only the training moves; data, probes and results stay on the CPU).

    Parameters
    ----------
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, …
    """
    token = _DEVICE.set(torch.device(device))
    try:
        yield
    finally:
        _DEVICE.reset(token)


Probe = Callable[[int, Ensemble], list[dict[str, Any]]]


@dataclass
class TrainConfig:
    """How to train every member.

    ``lr`` is one value or one per member; ``eval_every=None`` evaluates once, at the end;
    ``eval_samples`` limits the curves (not the final accuracy) to the first test samples;
    ``lr_schedule(step)`` multiplies every member's rate; a member whose loss is non-finite
    or above ``divergence_factor`` × its first loss stops (``diverged``).
    """

    optimizer: str = "sgd"
    lr: float | Sequence[float] = 0.1
    momentum: float = 0.0
    batch_size: int = 64
    epochs: float | None = None
    steps: int | None = None
    eval_every: int | None = 20
    eval_samples: int | None = None
    lr_schedule: Callable[[int], float] | None = None
    divergence_factor: float = 10.0
    final_train_acc: bool = False

    def total_steps(self, n_train: int) -> int:
        """The number of steps: ``steps``, or ``epochs`` × full batches per epoch."""
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of epochs and steps")
        if self.steps is not None:
            return int(self.steps)
        assert self.epochs is not None
        return max(1, round(self.epochs * (n_train // self.batch_size)))


@dataclass
class MemberResult:
    """One member's curves (at the evaluation points) and outcome; probes at their own steps."""

    seed: int
    lr: float
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    final_test_acc: float = float("nan")
    final_train_acc: float = float("nan")
    diverged: bool = False
    diverged_step: int | None = None
    probe_steps: list[int] = field(default_factory=list)
    probes: dict[str, list[Any]] = field(default_factory=dict)


def make_optimizer(ens: Ensemble, config: TrainConfig) -> torch.optim.Optimizer:
    """torch's SGD (``momentum``) or Adam over the stacked parameters (see the module docstring for lr)."""
    params = list(ens.parameters())
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1.0, momentum=config.momentum, foreach=True)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=1.0, foreach=True)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {config.optimizer!r}")


def _member_lrs(config: TrainConfig, k: int) -> list[float]:
    lrs = (
        [float(config.lr)] * k
        if isinstance(config.lr, float | int)
        else [float(v) for v in config.lr]
    )
    if len(lrs) != k:
        raise ValueError(f"need one lr per model: {k} models, {len(lrs)} learning rates")
    if config.optimizer == "adam" and len(set(lrs)) > 1:
        raise ValueError(
            "per-member learning rates need optimizer='sgd': Adam is invariant to the gradient "
            "scale that carries them"
        )
    return lrs


def train_step(
    ens: Ensemble,
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    scale: Tensor | None = None,
    lr: float = 1.0,
) -> Tensor:
    """One step of every member on its own batch ``x`` ``(K, B, F)``, ``y`` ``(K, B)``.

    ``scale`` ``(K,)`` weighs member ``k``'s loss, hence its gradient (its SGD learning rate; 0
    stops a member's updates — a diverged member, whose NaNs stay in its own rows); ``lr`` is the
    optimizer's rate for this step. Returns the per-member losses ``(K,)`` before the step.
    """
    logits = ens(x)
    loss_k = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)  # (K,)
    opt.zero_grad(set_to_none=True)
    (loss_k.sum() if scale is None else (loss_k * scale).sum()).backward()
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    return loss_k.detach()


def member_batches(n: int, batch: int, seeds: Sequence[int]) -> Callable[[int], Tensor]:
    """``indices(step)`` → ``(K, batch)``: member ``k``'s data order from its own seed, a fresh
    permutation each epoch, the incomplete last batch dropped."""
    if batch > n:
        raise ValueError(f"batch_size={batch} exceeds the {n} training samples")
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    per_epoch = n // batch
    state: dict[str, Any] = {"epoch": -1, "order": None}

    def indices(step: int) -> Tensor:
        epoch, pos = divmod(step, per_epoch)
        if epoch != state["epoch"]:
            perms = torch.stack([torch.randperm(n, generator=g) for g in gens])  # (K, n)
            state["order"] = perms[:, : per_epoch * batch].view(len(gens), per_epoch, batch)
            state["epoch"] = epoch
        return state["order"][:, pos]

    return indices


def evaluate(
    ens: Ensemble, x: Tensor, y: Tensor, *, which: Tensor | None = None, chunk: int = 2048
) -> tuple[Tensor, Tensor]:
    """Per-member accuracy and mean cross-entropy ``(K,)`` each, in eval mode, on the first ``len(y)``
    samples of ``x``.

    ``x`` is ``(N, F)`` (shared), ``(K, N, F)`` (each member its own inputs), or ``(D, N, F)`` with
    ``which`` ``(K,)`` naming each member's row; ``y`` ``(n,)``, ``n ≤ N``.
    """
    was = ens.training
    ens.eval()
    device = next(ens.parameters()).device
    correct, loss = torch.zeros(ens.k, device=device), torch.zeros(ens.k, device=device)
    n = int(y.shape[0])
    with torch.no_grad():
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            xx = x[lo:hi] if x.dim() == 2 else x[:, lo:hi] if which is None else x[which, lo:hi]
            logits = ens(xx.to(device))  # (K, n, classes)
            yy = y[lo : lo + chunk].to(device).expand(ens.k, -1)
            correct += (logits.argmax(-1) == yy).sum(1).float()
            loss += F.cross_entropy(logits.transpose(1, 2), yy, reduction="none").sum(1)
    ens.train(was)
    return (correct / n).cpu(), (loss / n).cpu()


def _member_data(
    data: Dataset | Sequence[Dataset], k: int
) -> tuple[Dataset, Tensor | None, Tensor | None, Tensor | None]:
    """``(first dataset, stacked train inputs, stacked test inputs, member → dataset index)``;
    the stacked tensors are None when every member trains on the same dataset."""
    if isinstance(data, Dataset):
        return data, None, None, None
    if len(data) != k:
        raise ValueError(f"need one dataset per model: {k} models, {len(data)} datasets")
    distinct: list[Dataset] = []
    index = []
    for d in data:
        pos = next((i for i, e in enumerate(distinct) if e is d), None)
        if pos is None:
            first = distinct[0] if distinct else d
            if not (
                torch.equal(d.y_train, first.y_train)
                and torch.equal(d.y_test, first.y_test)
                and d.x_train.shape == first.x_train.shape
                and d.x_test.shape == first.x_test.shape
            ):
                raise ValueError(
                    "per-member datasets must share their labels and input shapes "
                    "(the same samples, transformed)"
                )
            distinct.append(d)
            pos = len(distinct) - 1
        index.append(pos)
    which = torch.tensor(index)
    x_train = torch.stack([d.x_train for d in distinct])  # (D, N, F)
    x_test = torch.stack([d.x_test for d in distinct])
    return distinct[0], x_train, x_test, which


def train_ensemble(
    models: Sequence[nn.Sequential],
    data: Dataset | Sequence[Dataset],
    config: TrainConfig,
    *,
    seeds: Sequence[int],
    probe: Probe | None = None,
    probe_every: int | None = None,
    step_hook: Callable[[int, Ensemble], None] | None = None,
    progress: bool | str = False,
) -> tuple[list[MemberResult], Ensemble]:
    """Train ``models`` (one per seed) together; returns per-member results and the trained ensemble.

    Parameters
    ----------
    models
        One ``nn.Sequential`` per member, one architecture (:class:`Ensemble`).
    data
        The dataset, or one per member (the same samples and labels, each member's inputs
        transformed its own way).
    config
        :class:`TrainConfig`.
    seeds
        Member ``k`` draws its mini-batches with ``seeds[k]``.
    probe, probe_every
        ``probe(step, ens)`` → one dict per member, every ``probe_every`` steps (default:
        ``config.eval_every``; with neither, at the start and the end), collected in
        ``MemberResult.probes`` with the steps in ``probe_steps``.
    step_hook
        ``step_hook(step, ens)`` after every optimizer step.
    progress
        Show a tqdm bar (its label, if a string). Independently of it, the loop reports how far it
        is with :func:`normlab.lab.progress.report_progress` about 50 times (a no-op outside
        ``normlab lab run``).

    The ensemble trains on the :func:`training_device` (the CPU by default) and is returned on the CPU.

    Returns
    -------
    (results, ensemble)
        ``ensemble.to_models()`` gives the trained members.
    """
    k = len(models)
    if len(seeds) != k:
        raise ValueError(f"need one seed per model: {k} models, {len(seeds)} seeds")
    lrs = _member_lrs(config, k)
    base, x_train_k, x_test_k, which = _member_data(data, k)
    n_train = len(base.y_train)
    total = config.total_steps(n_train)
    device = _DEVICE.get() or torch.device("cpu")
    ens = Ensemble(models).to(device).train()
    opt = make_optimizer(ens, config)
    if config.optimizer == "sgd":
        scale, opt_lr = torch.tensor(lrs, device=device), 1.0
    else:
        scale, opt_lr = torch.ones(k, device=device), lrs[0]
    draw = member_batches(n_train, config.batch_size, seeds)
    results = [MemberResult(seed=int(s), lr=lr) for s, lr in zip(seeds, lrs)]
    active = torch.ones(k, dtype=torch.bool, device=device)
    initial: Tensor | None = None
    running, since = torch.zeros(k, device=device), 0
    x_test = x_test_k if x_test_k is not None else base.x_test
    every = probe_every if probe_every is not None else config.eval_every

    def alive_at(i: int, step: int) -> bool:
        r = results[i]
        return not (r.diverged_step is not None and r.diverged_step < step)

    curve_n = config.eval_samples or len(base.y_test)

    def record(step: int) -> None:
        nonlocal running, since
        acc, loss = evaluate(ens, x_test, base.y_test[:curve_n], which=which)
        mean_train = running / max(since, 1)
        for i, r in enumerate(results):
            if alive_at(i, step):
                r.steps.append(step)
                r.test_acc.append(float(acc[i]))
                r.test_loss.append(float(loss[i]))
                r.train_loss.append(float(mean_train[i]) if since else float("nan"))
        running, since = torch.zeros(k, device=device), 0

    def run_probe(step: int) -> None:
        assert probe is not None
        values = probe(step, ens)
        for i, r in enumerate(results):
            if alive_at(i, step):
                r.probe_steps.append(step)
                for key, value in values[i].items():
                    r.probes.setdefault(key, []).append(value)

    iterator: Any = range(total)
    if progress:
        from tqdm.auto import tqdm

        label = progress if isinstance(progress, str) else "train"
        iterator = tqdm(iterator, desc=label, leave=False)
    if config.eval_every is not None:
        record(0)
    if probe is not None:
        run_probe(0)
    done = 0
    report_every = max(1, total // 50)
    for step in iterator:
        idx = draw(step)  # (K, B)
        if x_train_k is None:
            x = base.x_train[idx]  # (K, B, F)
        else:
            assert which is not None
            x = x_train_k[which.unsqueeze(1), idx]
        x, y = x.to(device), base.y_train[idx].to(device)
        factor = config.lr_schedule(step) if config.lr_schedule is not None else 1.0
        member_scale = scale if bool(active.all()) else scale * active
        lk = train_step(ens, opt, x, y, member_scale, opt_lr * factor)
        with torch.no_grad():
            if initial is None:
                initial = lk.clone()
            bad = (~torch.isfinite(lk) | (lk > config.divergence_factor * initial)) & active
            if bool(bad.any()):
                for i in torch.nonzero(bad).flatten().tolist():
                    results[i].diverged, results[i].diverged_step = True, step
                active &= ~bad
            running += torch.where(active, lk, torch.zeros((), device=device))
            since += 1
        if step_hook is not None:
            step_hook(step, ens)
        done = step + 1
        if done % report_every == 0:
            report_progress(done, total)
        if config.eval_every is not None and (done % config.eval_every == 0 or done == total):
            record(done)
        if probe is not None and ((every is not None and done % every == 0) or done == total):
            run_probe(done)
        if not bool(active.any()):
            break
    acc_test, _ = evaluate(ens, x_test, base.y_test, which=which)
    acc_train = (
        evaluate(
            ens, x_train_k if x_train_k is not None else base.x_train, base.y_train, which=which
        )[0]
        if config.final_train_acc
        else None
    )
    for i, r in enumerate(results):
        if r.diverged:
            continue
        r.final_test_acc = float(acc_test[i])
        if acc_train is not None:
            r.final_train_acc = float(acc_train[i])
    return results, ens.cpu().eval()
