r"""``accumulate_batchnorm``: gradient accumulation whose running statistics see one batch.

With gradient accumulation, one optimizer step runs ``K`` micro-batches; a batch norm then
moves its running statistics ``K`` times, each toward one micro-batch's statistics, so they
track a ``K``-times faster, noisier average than training on the whole batch would give
(pytorch/pytorch#46516, Lightning#17446, yolov5#1630). Inside the block each micro-batch is
still normalized with its own statistics (that is the forward and gradient being accumulated);
what changes is the running update: the layers' buffers stay as they were during the block,
and at its exit each layer moves **once**, with the statistics of all its micro-batches merged
exactly (Chan et al., :func:`normlab.functional.merge_stats`):

.. math::
    n = \sum_k n_k,\quad \mu = \frac{1}{n}\sum_k n_k\mu_k,\quad
    \sigma^2 = \frac{1}{n}\sum_k n_k\big(\sigma_k^2 + (\mu_k - \mu)^2\big),\quad
    \text{running} \leftarrow (1 - m)\,\text{running} + m\,\Big(\mu,\ \frac{n}{n - 1}\sigma^2\Big)

— the ``running_mean``, ``running_var`` and ``num_batches_tracked`` that one forward of the
concatenated batch gives (:func:`normlab.functional.update_running_stats_`, with the layer's
momentum, ``momentum=None``'s cumulative average and ``nonfinite`` policy).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...functional import ghost_chunks, merge_stats, update_running_stats_
from .._base import describe
from .._sync import _GroupReducer
from ._common import (
    RunningState,
    has_running_stats,
    hooked_input,
    input_stats,
    is_batchnorm,
)

__all__ = ["accumulate_batchnorm"]

_ACTIVE: set[int] = set()  # ids of the layers inside a block now
_KINDS = ("batchnorm", "bnact", "renorm", "sync", "split", "ghost")


class _Layer:
    """One batch norm's merged micro-batch statistics (float64) and its step-start state."""

    def __init__(self, module: nn.Module, path: str) -> None:
        self.module, self.path = module, path
        self.kind = describe(module).kind
        variant: dict[str, Any] = getattr(module, "_variant_spec", dict)()
        self.unbiased = variant.get("unbiased_running_var", True)  # Keras: the biased variance
        self.state: RunningState | None = None  # taken at the layer's first call in the block
        self.stats: tuple[Tensor, Tensor, Tensor] | None = None  # (mean, biased var, count)
        self.chunks: list[tuple[Tensor, Tensor]] = []  # Ghost: (mean, unbiased var) per chunk
        self.sizes: list[int] = []

    @property
    def owner(self) -> str:
        return f"accumulate_batchnorm: {self.path} ({type(self.module).__name__})"

    def before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not module.training:
            return
        if self.state is None:
            self.state = RunningState(module)
        x, mask = hooked_input(args, kwargs)
        if self.kind == "ghost":
            self._add_chunks(x)
            return
        group = _sync_group(module) if self.kind == "sync" else None
        if group is not None:  # SyncBN: the micro-batch's statistics over every process
            if not getattr(module, "_layout_checked", True):
                module._check_layout(x)  # type: ignore[operator]  # every rank raises alike
            mean, var, count = _GroupReducer(group, self.owner).stats(x.detach(), mask)
        else:
            mean, var, count = input_stats(module, x, mask)
        new = (mean.double(), var.double(), count.double())
        self.stats = new if self.stats is None else merge_stats(*self.stats, *new)

    def _add_chunks(self, x: Tensor) -> None:
        size = int(self.module.virtual_batch_size)  # type: ignore[arg-type]
        if self.sizes and self.sizes[-1] % size:
            raise ValueError(
                f"{self.owner}: a micro-batch of {self.sizes[-1]} samples was followed by another; "
                f"under accumulate_batchnorm every micro-batch but the last must be a multiple of "
                f"virtual_batch_size={size}, so that the virtual batches are those of the "
                "concatenated batch"
            )
        self.sizes.append(x.shape[0])
        for part in x.split(ghost_chunks(x.shape[0], size)):
            mean, var, count = input_stats(self.module, part, None)
            unbias = count / (count - 1) if self.unbiased else 1.0
            self.chunks.append((mean.double(), (var * unbias).double()))

    def after(self, module: nn.Module, args: tuple[Any, ...], kwargs: Any, output: Any) -> None:
        if module.training and self.state is not None:
            self.state.restore()  # the next micro-batch sees the step-start statistics

    def commit(self) -> None:
        """The one running update of the step (the state was restored before)."""
        if self.state is None:
            return
        m = self.module
        tensors = self.state.tensors()
        counter = tensors.get("num_batches_tracked")
        if self.kind == "ghost":
            if not self.chunks:
                return
            mean = torch.stack([c[0] for c in self.chunks]).mean(0)
            var = torch.stack([c[1] for c in self.chunks]).mean(0)
        else:
            if self.stats is None:
                return
            mean, var, count = self.stats
            n = float(count.max()) if count.numel() else 0.0
            if n == 0:  # an empty batch: torch counts it and moves nothing
                if counter is not None:
                    counter.add_(1)
                return
            if n == 1:  # one value: the layer normalized it with the running statistics
                return
            if self.unbiased:
                var = var * count / (count - 1)
        momentum = m.momentum
        if momentum is None:
            if counter is None:
                raise ValueError(f"{self.owner}: momentum=None needs num_batches_tracked")
            factor = 1.0 / float(counter + 1)
        else:
            factor = float(momentum)  # type: ignore[arg-type]
        updated = update_running_stats_(
            tensors["running_mean"],
            tensors["running_var"],
            mean,
            var,
            factor,
            nonfinite=getattr(m, "nonfinite", "propagate"),
            owner=self.owner,
        )
        if counter is not None:
            counter.add_(updated.long() if isinstance(updated, Tensor) else int(updated))


def _sync_group(module: nn.Module) -> Any:
    """The process group of a synchronized batch norm running over several processes, else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group: Any = getattr(module, "process_group", None) or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _layers(model: nn.Module) -> list[_Layer]:
    layers = []
    for path, m in model.named_modules():
        if not (
            is_batchnorm(m) and has_running_stats(m) and getattr(m, "track_running_stats", False)
        ):
            continue
        path = path or "<model>"
        kind = describe(m).kind
        if kind not in _KINDS:  # frozen and unknown kinds: nothing this can merge
            continue
        if id(m) in _ACTIVE:
            raise RuntimeError(
                f"accumulate_batchnorm: {path} ({type(m).__name__}) is already inside an "
                "accumulate_batchnorm block; blocks do not nest"
            )
        layers.append(_Layer(m, path))
    return layers


@contextmanager
def accumulate_batchnorm(model: nn.Module) -> Iterator[None]:
    """Update every batch norm's running statistics once, at the end of the block, as one batch.

    Put the micro-batches of one optimizer step inside the block. Each is normalized with its
    own batch statistics, exactly as without the block (outputs and gradients are the
    same); during the block the running buffers keep their step-start values (each layer's
    own update is undone after each call); at a normal exit each layer that ran in training
    mode moves once, with its micro-batches' statistics merged, so that ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` are what one forward of the concatenated
    batch gives (float32: within 1e-6 relative). If the block raises, every running buffer
    is left as it was before the block.

    Which layers, and what "the concatenated batch" is for each:

    * torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``, normlab's ``BatchNorm*``,
      ``BatchNormAct*`` (the statistics of its input) and ``KerasBatchNorm`` (the biased
      variance, as the layer itself);
    * ``BatchRenorm*``: every micro-batch is corrected toward the *step-start* running
      statistics (and schedule step), as one batch would be;
    * ``SyncBatchNorm`` over several processes: each micro-batch's statistics are gathered
      over the process group (one more all-gather per layer and micro-batch), so the update
      is that of the concatenation over micro-batches *and* processes;
    * ``SplitBatchNorm*``: each split merges its own parts (the first parts into the layer,
      part ``i`` into ``aux_bn[i-1]``), so the batch is all the first parts, then all the
      second parts, …;
    * ``GhostBatchNorm*``: its update is the mean over virtual batches of their statistics
      (not a merge); it equals the concatenated batch's when every micro-batch but the last
      is a multiple of ``virtual_batch_size`` — otherwise the block raises ``ValueError`` at
      the next micro-batch.

    ``FrozenBatchNorm*``, layers without running statistics and layers in eval mode are left
    alone. With ``momentum=None`` the cumulative average counts the step once. A mask
    (``layer(x, mask)``) counts only valid positions. Non-finite statistics follow the
    layer's ``nonfinite`` policy as one batch would (torch's layers: ``"propagate"``;
    ``"raise"`` raises in the micro-batch's forward; ``"skip"`` leaves those channels
    unchanged at the exit and warns). A layer called several times in the block merges every
    call into its one update.

    Parameters
    ----------
    model : nn.Module
        The model; hooks are added for the block and removed at its end.

    Yields
    ------
    None

    Raises
    ------
    RuntimeError
        A layer is already inside another ``accumulate_batchnorm`` block.
    ValueError
        Ghost BN micro-batches that do not align with its virtual batches.

    Examples
    --------
    >>> import torch
    >>> from normlab.nn.utils import accumulate_batchnorm
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    >>> twin = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    >>> twin.load_state_dict(model.state_dict())
    <All keys matched successfully>
    >>> micro = [torch.randn(6, 4) for _ in range(3)]
    >>> with accumulate_batchnorm(model):
    ...     for x in micro:
    ...         model(x).square().mean().backward()
    >>> _ = twin(torch.cat(micro))                  # one forward of the whole batch
    >>> torch.allclose(model[1].running_var, twin[1].running_var, rtol=1e-6)
    True
    >>> int(model[1].num_batches_tracked)
    1
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accumulate_batchnorm expects an nn.Module, got {type(model).__name__}")
    layers = _layers(model)
    handles = []
    for layer in layers:
        handles.append(layer.module.register_forward_pre_hook(layer.before, with_kwargs=True))
        handles.append(layer.module.register_forward_hook(layer.after, with_kwargs=True))
        _ACTIVE.add(id(layer.module))
    try:
        yield
    finally:  # also when the block raises: hooks off, every buffer as before the block
        for handle in handles:
            handle.remove()
        for layer in layers:
            _ACTIVE.discard(id(layer.module))
            if layer.state is not None:
                layer.state.restore()
    with torch.no_grad():
        for i, layer in enumerate(layers):
            try:
                layer.commit()
            except BaseException:
                for done in layers[:i]:  # every layer moves, or none
                    if done.state is not None:
                        done.state.restore()
                raise
