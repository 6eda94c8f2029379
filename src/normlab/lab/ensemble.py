"""Batched ensembles: K MLPs of one architecture trained at once with stacked weights.

Each member has its own initialization, data order (its seed) and learning rate;
the K members run as one batched computation — ``bmm`` for the Linear layers, and
one normalization layer over ``K·C`` channels for BatchNorm-style layers (column
``k·C + c`` sees only member ``k``'s batch, so it *is* member ``k``'s BatchNorm).
On small MLPs this is several times faster than training the members one after
the other, and it gives the same results (tested to 1e-5).

Shapes: ``x`` ``(K, N, F)``; hidden ``(K, N, C)``; logits ``(K, N, classes)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .data import Dataset

__all__ = [
    "EnsembleMLP",
    "MemberResult",
    "StackedOptimizer",
    "TrainConfig",
    "ensemble_step",
    "train_ensemble",
]


# --- stacked layers ------------------------------------------------------------------


class _StackedLinear(nn.Module):
    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]))  # (K, out, in)
        has_bias = layers[0].bias is not None
        self.bias = (
            nn.Parameter(torch.stack([m.bias.detach() for m in layers if m.bias is not None]))
            if has_bias
            else None
        )

    def forward(self, x: Tensor) -> Tensor:  # (K, N, in) -> (K, N, out)
        if self.bias is None:
            return torch.bmm(x, self.weight.transpose(1, 2))
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))

    def unstack(self, k: int, target: nn.Linear) -> None:
        with torch.no_grad():
            target.weight.copy_(self.weight[k])
            if self.bias is not None and target.bias is not None:
                target.bias.copy_(self.bias[k])


class _StackedChannelNorm(nn.Module):
    """A BatchNorm-style layer (torch's, normlab's or a variant) over ``K·C`` channels."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        k, c = len(layers), int(layers[0].num_features)  # type: ignore[arg-type]
        norm: Any = copy.deepcopy(layers[0])
        norm.num_features = k * c
        for name, _p in list(layers[0].named_parameters(recurse=False)):
            setattr(
                norm, name, nn.Parameter(torch.cat([getattr(m, name).detach() for m in layers]))
            )
        for name, b in list(layers[0].named_buffers(recurse=False)):
            if b is not None and b.dim() == 1 and b.numel() == c:
                norm.register_buffer(name, torch.cat([getattr(m, name) for m in layers]))
        if hasattr(norm, "nonfinite"):
            norm.nonfinite = "propagate"  # a diverged member must not stop the others' updates
        self.norm, self.k, self.c = norm, k, c

    def forward(self, x: Tensor) -> Tensor:  # (K, N, C)
        k, n, c = x.shape
        flat = x.transpose(0, 1).reshape(n, k * c)  # (N, K·C)
        return self.norm(flat).view(n, k, c).transpose(0, 1)

    def unstack(self, k: int, target: nn.Module) -> None:
        sl = slice(k * self.c, (k + 1) * self.c)
        with torch.no_grad():
            for name, p in target.named_parameters(recurse=False):
                p.copy_(getattr(self.norm, name)[sl])
            for name, b in target.named_buffers(recurse=False):
                src = getattr(self.norm, name)
                if b is not None and src is not None:
                    b.copy_(src[sl] if src.dim() == 1 and src.numel() == self.k * self.c else src)


class _StackedLayerNorm(nn.Module):
    def __init__(self, layers: Sequence[nn.LayerNorm | nn.GroupNorm]) -> None:
        super().__init__()
        first = layers[0]
        self.groups = first.num_groups if isinstance(first, nn.GroupNorm) else 1
        self.eps = first.eps
        affine = first.weight is not None
        self.weight = (
            nn.Parameter(torch.stack([m.weight.detach() for m in layers])) if affine else None
        )
        self.bias = (
            nn.Parameter(torch.stack([m.bias.detach() for m in layers]))
            if affine and first.bias is not None
            else None
        )

    def forward(
        self, x: Tensor
    ) -> Tensor:  # (K, N, C): normalize each sample (per group) of each member
        k, n, c = x.shape
        g = x.reshape(k, n, self.groups, c // self.groups)
        var, mean = torch.var_mean(g, dim=-1, keepdim=True, correction=0)
        y = ((g - mean) * torch.rsqrt(var + self.eps)).reshape(k, n, c)
        if self.weight is not None:
            y = y * self.weight.unsqueeze(1)
        if self.bias is not None:
            y = y + self.bias.unsqueeze(1)
        return y

    def unstack(self, k: int, target: nn.Module) -> None:
        with torch.no_grad():
            if self.weight is not None:
                target.weight.copy_(self.weight[k])  # type: ignore[operator]
            if self.bias is not None:
                target.bias.copy_(self.bias[k])  # type: ignore[operator]


def _is_channel_norm(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm) or (hasattr(m, "running_mean") and hasattr(m, "num_features"))


class EnsembleMLP(nn.Module):
    """K MLPs (``nn.Sequential`` of Linear / norm / activation, same architecture) as one module."""

    def __init__(self, members: Sequence[nn.Sequential]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        kinds = [[type(m) for m in member] for member in members]
        if any(k != kinds[0] for k in kinds):
            raise ValueError(
                "all ensemble members must have the same architecture (layer types in order)"
            )
        self.k = len(members)
        self._templates = [copy.deepcopy(m) for m in members]
        layers: list[nn.Module] = []
        self._roles: list[str] = []
        for i, layer in enumerate(members[0]):
            group = [m[i] for m in members]
            if isinstance(layer, nn.Linear):
                layers.append(_StackedLinear(group))  # type: ignore[arg-type]
                self._roles.append("linear")
            elif _is_channel_norm(layer):
                layers.append(_StackedChannelNorm(group))
                self._roles.append("norm")
            elif isinstance(layer, nn.LayerNorm | nn.GroupNorm):
                layers.append(_StackedLayerNorm(group))  # type: ignore[arg-type]
                self._roles.append("norm")
            elif not any(True for _ in layer.parameters()) and not any(
                True for _ in layer.buffers()
            ):
                layers.append(copy.deepcopy(layer))  # stateless activation
                self._roles.append("act")
            else:
                raise TypeError(f"EnsembleMLP cannot stack a {type(layer).__name__} layer")
        self.layers = nn.ModuleList(layers)
        self._stacked: list[Any] = list(layers)

    @classmethod
    def from_models(cls, models: Sequence[nn.Sequential]) -> EnsembleMLP:
        return cls(models)

    def _input(self, x: Tensor) -> Tensor:
        return x.unsqueeze(0).expand(self.k, *x.shape) if x.dim() == 2 else x

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(K, N, F)`` (one batch per member) or ``(N, F)`` (shared) → logits ``(K, N, classes)``."""
        h = self._input(x)
        for layer in self.layers:
            h = layer(h)
        return h

    def forward_hidden(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Logits, and per hidden layer the activation's input and output (each ``(K, N, C)``)."""
        h = self._input(x)
        pre: list[Tensor] = []
        post: list[Tensor] = []
        for role, layer in zip(self._roles, self.layers):
            if role == "act":
                pre.append(h)
                h = layer(h)
                post.append(h)
            else:
                h = layer(h)
        return h, pre, post

    def to_models(self) -> list[nn.Sequential]:
        """The members as independent ``nn.Sequential`` models (copies, in this module's mode)."""
        out = []
        for k, template in enumerate(self._templates):
            model = copy.deepcopy(template)
            for stacked, layer in zip(self._stacked, model):
                if hasattr(stacked, "unstack"):
                    stacked.unstack(k, layer)
            out.append(model.train(self.training))
        return out


# --- stacked optimizers (per-member learning rates) ---------------------------------


class StackedOptimizer:
    """torch.optim's SGD (momentum, no dampening) and Adam, on stacked parameters with a
    learning rate per member. Every parameter's leading elements are member-major,
    so ``p.view(K, -1)`` puts member ``k`` on row ``k``."""

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        k: int,
        kind: str,
        momentum: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if kind not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {kind!r}")
        self.params, self.k, self.kind, self.momentum = list(params), k, kind, momentum
        self.betas, self.eps, self.t = betas, eps, 0
        self.state: dict[int, list[Tensor]] = {}

    @torch.no_grad()
    def step(self, lr: Tensor, active: Tensor) -> None:
        """``lr``: ``(K,)``; members with ``active[k] == False`` are left unchanged."""
        self.t += 1
        everyone = bool(active.all())
        neg_lr = (-lr).view(self.k, 1)
        keep = active.view(self.k, 1)
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad.view(self.k, -1)
            if self.kind == "sgd":
                if self.momentum:
                    if i not in self.state:
                        self.state[i] = [g.clone()]
                    else:
                        self.state[i][0].mul_(self.momentum).add_(g)
                    g = self.state[i][0]
                direction, step_lr = g, neg_lr
            else:
                b1, b2 = self.betas
                if i not in self.state:
                    self.state[i] = [torch.zeros_like(g), torch.zeros_like(g)]
                m, v = self.state[i]
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
                direction = m / (v.sqrt() / math.sqrt(bc2)).add_(self.eps)
                step_lr = neg_lr / bc1
            if everyone:  # the common case: one fused in-place update
                p.view(self.k, -1).addcmul_(step_lr, direction)
            else:  # diverged members stay as they are (their NaNs never leak into the update)
                update = torch.where(
                    keep, step_lr * direction, torch.zeros((), dtype=direction.dtype)
                )
                p.view(self.k, -1).add_(update)


# --- training --------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """How to train every member (``lr`` may be one value per member)."""

    optimizer: str = "sgd"
    lr: float | Sequence[float] = 0.1
    momentum: float = 0.0
    batch_size: int = 64
    epochs: float | None = None
    steps: int | None = None
    eval_every: int = 20
    lr_schedule: Callable[[int], float] | None = None
    divergence_factor: float = 10.0

    def total_steps(self, n_train: int) -> int:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of epochs and steps")
        if self.steps is not None:
            return int(self.steps)
        assert self.epochs is not None
        return max(1, round(self.epochs * (n_train // self.batch_size)))


@dataclass
class MemberResult:
    """One member's curves (at evaluation points) and outcome."""

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
    probes: dict[str, list[Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def ensemble_step(
    ens: EnsembleMLP, opt: StackedOptimizer, x: Tensor, y: Tensor, lr: Tensor, active: Tensor
) -> Tensor:
    """One SGD/Adam step of every member on its own batch ``x`` ``(K, B, F)``, ``y`` ``(K, B)``;
    returns the per-member losses ``(K,)`` (before the step)."""
    logits = ens(x)
    loss_k = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)  # (K,)
    for p in ens.parameters():
        p.grad = None
    loss_k.sum().backward()
    opt.step(lr, active)
    return loss_k.detach()


def _member_batches(n: int, batch: int, seed: int) -> Callable[[int], Tensor]:
    """Member ``seed``'s data order: a fresh permutation each epoch, incomplete last batch dropped."""
    if batch > n:
        raise ValueError(f"batch_size={batch} exceeds the {n} training samples")
    gen = torch.Generator().manual_seed(seed)
    per_epoch = n // batch
    perm = torch.randperm(n, generator=gen)
    state = {"epoch": 0}

    def indices(step: int) -> Tensor:
        nonlocal perm
        epoch, pos = divmod(step, per_epoch)
        if epoch != state["epoch"]:
            perm = torch.randperm(n, generator=gen)
            state["epoch"] = epoch
        return perm[pos * batch : (pos + 1) * batch]

    return indices


def _evaluate(ens: EnsembleMLP, x: Tensor, y: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Per-member accuracy and mean cross-entropy on ``(x, y)`` in eval mode."""
    was = ens.training
    ens.eval()
    correct = torch.zeros(ens.k)
    loss = torch.zeros(ens.k)
    with torch.no_grad():
        for lo in range(0, len(y), chunk):
            logits = ens(x[lo : lo + chunk])  # (K, n, classes)
            yy = y[lo : lo + chunk]
            correct += (logits.argmax(-1) == yy).sum(1).float()
            ce = F.cross_entropy(logits.transpose(1, 2), yy.expand(ens.k, -1), reduction="none")
            loss += ce.sum(1)
    ens.train(was)
    return correct / len(y), loss / len(y)


def train_ensemble(
    models: Sequence[nn.Sequential],
    data: Dataset,
    config: TrainConfig,
    *,
    seeds: Sequence[int],
    probe: Callable[[int, EnsembleMLP], list[dict[str, Any]]] | None = None,
    step_hook: Callable[[int, EnsembleMLP], None] | None = None,
    progress: bool | str = False,
) -> tuple[list[MemberResult], list[nn.Sequential]]:
    """Train ``models`` (one per seed) together; returns per-member results and the trained members.

    Member ``k`` draws its mini-batches with ``seeds[k]`` and uses ``lr[k]`` (or the
    shared lr). A member whose loss becomes non-finite or exceeds
    ``divergence_factor`` × its first loss stops (``diverged``, ``diverged_step``);
    the others go on. ``probe(step, ens)`` runs at every evaluation point and
    returns one dict per member, collected in ``MemberResult.probes``.
    """
    k = len(models)
    if len(seeds) != k:
        raise ValueError(f"need one seed per model: {k} models, {len(seeds)} seeds")
    lrs = (
        [float(config.lr)] * k
        if isinstance(config.lr, float | int)
        else [float(v) for v in config.lr]
    )
    if len(lrs) != k:
        raise ValueError(f"need one lr per model: {k} models, {len(lrs)} learning rates")
    ens = EnsembleMLP(models).train()
    opt = StackedOptimizer(list(ens.parameters()), k, config.optimizer, config.momentum)
    total = config.total_steps(len(data.y_train))
    draws = [_member_batches(len(data.y_train), config.batch_size, s) for s in seeds]
    results = [MemberResult(seed=int(s), lr=lr) for s, lr in zip(seeds, lrs)]
    base_lr = torch.tensor(lrs)
    active = torch.ones(k, dtype=torch.bool)
    initial: Tensor | None = None
    running = torch.zeros(k)
    since = 0

    def record(step: int) -> None:
        nonlocal running, since
        acc, loss = _evaluate(ens, data.x_test, data.y_test)
        probes = probe(step, ens) if probe is not None else None
        mean_train = running / max(since, 1)
        for i, r in enumerate(results):
            if not active[i] and r.diverged_step is not None and r.diverged_step < step:
                continue
            r.steps.append(step)
            r.test_acc.append(float(acc[i]))
            r.test_loss.append(float(loss[i]))
            r.train_loss.append(float(mean_train[i]) if since else float("nan"))
            if probes is not None:
                for key, value in probes[i].items():
                    r.probes.setdefault(key, []).append(value)
        running, since = torch.zeros(k), 0

    iterator: Any = range(total)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(
            iterator, desc=progress if isinstance(progress, str) else "train", leave=False
        )
    record(0)
    for step in iterator:
        idx = torch.stack([draw(step) for draw in draws])  # (K, B)
        x, y = data.x_train[idx], data.y_train[idx]  # (K, B, F), (K, B)
        scale = config.lr_schedule(step) if config.lr_schedule is not None else 1.0
        lk = ensemble_step(ens, opt, x, y, base_lr * scale, active)
        with torch.no_grad():
            if initial is None:
                initial = lk.clone()
            bad = ~torch.isfinite(lk) | (lk > config.divergence_factor * initial)
            for i in torch.nonzero(bad & active).flatten().tolist():
                results[i].diverged, results[i].diverged_step = True, step
            active &= ~bad
            running += torch.where(active, lk, torch.zeros(()))
            since += 1
        if step_hook is not None:
            step_hook(step, ens)
        if (step + 1) % config.eval_every == 0 or step + 1 == total:
            record(step + 1)
        if not bool(active.any()):
            break
    acc_test, _ = _evaluate(ens, data.x_test, data.y_test)
    acc_train, _ = _evaluate(ens, data.x_train, data.y_train)
    for i, r in enumerate(results):
        r.final_test_acc = float(acc_test[i]) if not r.diverged else float("nan")
        r.final_train_acc = float(acc_train[i]) if not r.diverged else float("nan")
    return results, [m.eval() for m in ens.eval().to_models()]
