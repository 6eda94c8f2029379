r"""``SyncBatchNorm``: batch statistics over every process of a ``torch.distributed`` group.

Forward — one collective: each rank all-gathers its per-channel ``(count, mean, M2)``
(``M2 = count · biased var``), and every rank merges them with Chan's formula
(:func:`normlab.functional.merge_stats`) — never the sum/sum-of-squares form, which
cancels catastrophically. Backward — one collective: an all-reduce of
``(Σ dy, Σ dy·x̂)``, then the closed form

.. math:: dx = \frac{\gamma}{\sigma}\Big(dy - \frac{\Sigma dy}{N} - \hat x\,\frac{\Sigma dy\,\hat x}{N}\Big)

with ``N`` the global count. ``γ``/``β`` gradients stay per-rank local sums, as in
``torch.nn.SyncBatchNorm`` (``DistributedDataParallel`` then averages them). A rank with
no samples still joins both collectives (with count 0), so nobody waits forever and the
statistics are not biased. Outside a process group, or with one process, it is BatchNorm.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..functional import NonFinite, batch_norm_stats, merge_stats, normalize, reduce_dims
from ._batchnorm import NormBase, SingleSample

__all__ = ["SyncBatchNorm"]


class _SyncBatchNormTrain(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, group: Any
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        mean, var, count = batch_norm_stats(x)  # local (C,) each; count 0 on an empty rank
        local = torch.stack([count, mean, var * count])  # (3, C): count, mean, M2
        world = dist.get_world_size(group)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local.contiguous(), group=group)
        g_mean, g_var, g_count = gathered[0][1], _var(gathered[0]), gathered[0][0]
        for part in gathered[1:]:
            g_mean, g_var, g_count = merge_stats(
                g_mean, g_var, g_count, part[1], _var(part), part[0]
            )
        invstd = torch.rsqrt(g_var + eps)
        y = normalize(x, g_mean, invstd, weight, bias)
        ctx.save_for_backward(x, weight, g_mean, invstd, g_count)
        ctx.group = group
        ctx.mark_non_differentiable(g_mean, g_var, g_count)
        return y, g_mean, g_var, g_count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd, count = ctx.saved_tensors
        ndim, acc = x.dim(), mean.dtype
        view = [1, -1] + [1] * (ndim - 2)
        dims = reduce_dims(ndim, 1)
        xhat = (x.to(acc) - mean.view(view)) * invstd.view(view)
        dy_a = dy.to(acc)
        local = torch.stack([dy_a.sum(dims), (dy_a * xhat).sum(dims)])  # (2, C)
        total = local.clone()
        dist.all_reduce(total, group=ctx.group)
        n = count.clamp(min=1)
        dx = None
        if ctx.needs_input_grad[0]:
            scale = invstd if weight is None else invstd * weight.to(acc)
            dx = (
                scale.view(view)
                * (dy_a - (total[0] / n).view(view) - xhat * (total[1] / n).view(view))
            ).to(dy.dtype)
        dweight = (
            local[1].to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        )
        dbias = (
            local[0].to(weight.dtype if weight is not None else acc)
            if ctx.needs_input_grad[2]
            else None
        )
        return dx, dweight, dbias, None, None


def _var(part: Tensor) -> Tensor:
    """Biased variance from a gathered ``(count, mean, M2)`` block (0 for an empty rank)."""
    return part[2] / part[0].clamp(min=1)


class SyncBatchNorm(NormBase):
    """BatchNorm whose training statistics span every process of ``process_group`` (default: the world).

    Same constructor as :class:`normlab.nn.BatchNorm2d` plus ``process_group``; accepts
    ``(N, C, *)`` input of any rank ≥ 2. Eval mode and single-process use are plain BatchNorm.
    """

    _NDIM = (2, 3, 4, 5)
    _NDIM_TEXT = "at least 2D"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        nonfinite: NonFinite = "skip",
        single_sample: SingleSample = "raise",
        backend: str = "auto",
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            nonfinite=nonfinite,
            single_sample=single_sample,
            backend=backend,
        )
        self.process_group = process_group

    def _distributed(self) -> bool:
        return (
            dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    def _forward_channels_first(self, x: Tensor, mask: Tensor | None) -> Tensor:
        if not self._distributed() or (not self.training and self.running_mean is not None):
            return super()._forward_channels_first(x, mask)
        if mask is not None:
            raise ValueError("SyncBatchNorm does not support mask")
        group = self.process_group or dist.group.WORLD
        y, mean, var, count = _SyncBatchNormTrain.apply(x, self.weight, self.bias, self.eps, group)
        total = int(count[0]) if count.numel() else 0
        if total <= 1:  # every rank sees the same global count, so every rank raises
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {total} across all processes"
            )
        if self.training and self.track_running_stats:
            self._update_running_stats(mean, var * (total / (total - 1)))
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Replace every BatchNorm (torch's, normlab's, ``torch.nn.SyncBatchNorm``) by a
        ``normlab.nn.SyncBatchNorm`` with the same parameters and buffers; returns the module
        (a new one when ``module`` itself is a BatchNorm)."""
        if isinstance(module, _BatchNorm) and not isinstance(module, cls):
            sync = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
            )
            if module.affine:
                with torch.no_grad():
                    sync.weight = module.weight
                    sync.bias = module.bias
            sync.running_mean = module.running_mean
            sync.running_var = module.running_var
            sync.num_batches_tracked = module.num_batches_tracked
            sync.train(module.training)
            return sync
        for name, child in module.named_children():
            new = cls.convert_sync_batchnorm(child, process_group)
            if new is not child:
                setattr(module, name, new)
        return module
