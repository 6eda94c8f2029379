r"""``SyncBatchNorm``: batch statistics over every process of a ``torch.distributed`` group.

Forward — one collective: each rank all-gathers its per-channel ``(count, mean, M2)``
(``M2 = count · biased var``), and every rank merges them with Chan's formula
(:func:`normlab.functional.merge_stats`) — never the sum/sum-of-squares form, which cancels
catastrophically. Backward — one collective: an all-reduce of ``(Σ g, Σ g·x̂)``, then the
closed form

.. math:: dx = \frac{\gamma}{\sigma}\Big(g - \frac{\Sigma g}{N} - \hat x\,\frac{\Sigma g\,\hat x}{N}\Big)

with ``N`` the global count (the training path's ``reducer``). ``γ``/``β`` gradients stay
per-rank local sums, as in ``torch.nn.SyncBatchNorm`` (``DistributedDataParallel`` then
averages them). A rank with no samples still joins both collectives (with count 0), so nobody
waits forever and the statistics are not biased. Before the first synchronized batch the
ranks compare their input layouts (channels, dtype, rank) in one small collective and all
raise, naming every rank's layout, if they differ — instead of aborting inside the backend.
Outside a process group, with one process, or in eval it is plain batch norm.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..functional import batch_norm_stats, merge_stats
from ._base import ActivationOptions, NormBase, describe, layer_class
from ._convert import build_like, replace_batchnorms, transfer_state

__all__ = ["SyncBatchNorm"]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class _GroupReducer:
    """The cross-process reduction of SyncBN over ``group`` (see the module doc)."""

    def __init__(self, group: Any, owner: str) -> None:
        self.group, self.owner = group, owner

    def stats(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        mean, var, count = batch_norm_stats(x, mask=mask)  # local (C,) each; count 0 if empty
        local = torch.stack([count, mean, var * count]).contiguous()  # (3, C): count, mean, M2
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, local, group=self.group)
        g_mean, g_var, g_count = parts[0][1], _var(parts[0]), parts[0][0]
        for part in parts[1:]:
            g_mean, g_var, g_count = merge_stats(
                g_mean, g_var, g_count, part[1], _var(part), part[0]
            )
        total = int(g_count.max()) if g_count.numel() else 0
        if total <= 1:  # every rank sees the same global count, so every rank raises
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {total} across all "
                f"processes ({self.owner})"
            )
        return g_mean, g_var, g_count

    def sums(self, sums: Tensor) -> Tensor:
        dist.all_reduce(sums, group=self.group)
        return sums


def _var(part: Tensor) -> Tensor:
    """Biased variance from a gathered ``(count, mean, M2)`` block (0 for an empty rank)."""
    return part[2] / part[0].clamp(min=1)


class SyncBatchNorm(ActivationOptions, NormBase):
    """BatchNorm whose training statistics span every process of ``process_group`` (default: the world).

    Same constructor as :class:`torch.nn.SyncBatchNorm` plus normlab's options and an optional
    ``activation`` (what ``convert_sync_batchnorm`` gives a ``BatchNormAct``); takes
    ``(N, C, *)`` input of any rank ≥ 2 and returns the same shape. Eval mode and
    single-process use are plain BatchNorm.

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels.
    eps : float
        Added to the variance for stability (default 1e-5).
    momentum : float or None
        Running-statistics factor in ``[0, 1]`` (default 0.1); ``None``: cumulative average.
    affine : bool
        Learnable per-channel γ (``weight``) and β (``bias``), default True.
    track_running_stats : bool
        Keep running mean and variance for eval (default True).
    process_group : ProcessGroup, optional
        The processes whose batches are pooled (default: the world).
    device : torch.device or str, optional
        Where parameters and buffers are created.
    dtype : torch.dtype, optional
        Their dtype.
    activation : str
        ``None`` (default): no activation;
        one of ``"identity"``, ``"relu"``, ``"leaky_relu"``, ``"elu"``, ``"silu"``, ``"gelu"``.
    negative_slope : float
        ``leaky_relu``'s slope for negative inputs (default 0.01).
    alpha : float
        ``elu``'s scale for negative inputs (default 1.0).
    **options
        ``bias``, ``nonfinite``, ``single_sample`` and ``backend``, as :class:`NormBase`.

    Examples
    --------
    >>> import torch, normlab
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), normlab.nn.BatchNormAct2d(8))
    >>> model = normlab.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    >>> model[1]
    SyncBatchNorm(8, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True, activation='leaky_relu')
    >>> type(normlab.nn.SyncBatchNorm.revert_sync_batchnorm(model)[1]).__name__
    'BatchNormAct2d'
    """

    kind = "sync"
    spatial = None
    _CACHE_SPEC = False  # the reducer depends on the process group's state at each call
    OPTIONS: ClassVar[dict[str, Any]] = {**NormBase.OPTIONS, **ActivationOptions.ACTIVATION_OPTIONS}

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
        activation: str | None = None,
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        **options: Any,
    ) -> None:
        """Create the layer (the arguments are described in the class docstring)."""
        self._set_activation(activation, negative_slope, alpha)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **options
        )
        self.process_group = process_group
        self._layout_checked = False
        self._source_spatial: int | None = None  # the rank of the layer it replaced, if any

    def config(self) -> dict[str, Any]:
        """Every constructor argument that rebuilds this layer, ``process_group`` included.

        Returns
        -------
        dict

        Examples
        --------
        >>> import normlab
        >>> normlab.nn.SyncBatchNorm(4).config()["process_group"] is None
        True
        """
        return {**super().config(), "process_group": self.process_group}

    def _distributed(self) -> bool:
        return (
            dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    def _variant_spec(self) -> dict[str, Any]:
        act = self.act
        spec: dict[str, Any] = {"act": act, "save_output": act is not None}
        if (
            self.training
            and not torch.fx._symbolic_trace.is_fx_symbolic_tracing()
            and self._distributed()
        ):
            spec["reducer"] = _GroupReducer(
                self.process_group or dist.group.WORLD,
                f"{type(self).__name__}({self.num_features})",
            )
        return spec

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input`` with statistics over every process (see :meth:`NormBase.forward`).

        Parameters
        ----------
        input : Tensor, shape (N, C, *)
            Every process must feed the same number of channels and the same dtype.
        mask : Tensor of bool, optional
            Valid positions, the input's shape without the channel axis.

        Returns
        -------
        Tensor
            The input's shape.

        Examples
        --------
        >>> import torch, normlab
        >>> normlab.nn.SyncBatchNorm(3)(torch.randn(4, 3, 2)).shape    # one process: plain BN
        torch.Size([4, 3, 2])
        """
        if self.training and not self._layout_checked and self._distributed():
            self._check_layout(input)
        return super().forward(input, mask)

    def _check_layout(self, input: Tensor) -> None:
        """One small all-gather of ``(channels, dtype, rank)``: every rank raises, naming every
        rank's layout, when they differ (a mismatch would abort inside the collective)."""
        group = self.process_group or dist.group.WORLD
        axis = self.channel_axis if isinstance(input, Tensor) and input.dim() > 2 else 1
        ok = isinstance(input, Tensor) and input.dim() >= 2 and input.dtype in _DTYPES
        local = torch.tensor(
            [input.shape[axis], _DTYPES.index(input.dtype), input.dim()] if ok else [-1, -1, -1],
            dtype=torch.long,
            device=input.device if isinstance(input, Tensor) else "cpu",
        )
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        layouts = [tuple(int(v) for v in p) for p in parts]
        if len(set(layouts)) > 1 or layouts[0][0] != self.num_features:
            described = "; ".join(
                f"rank {r}: "
                + (
                    f"{c} channels, {_DTYPES[d]}, {n}D"
                    if c >= 0
                    else "not a floating-point (N, C, *) tensor"
                )
                for r, (c, d, n) in enumerate(layouts)
            )
            raise ValueError(
                f"{type(self).__name__}({self.num_features}): the processes' inputs differ or do "
                f"not match the layer ({described}); every rank must feed the same number of "
                "channels and the same dtype"
            )
        self._layout_checked = True

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Replace every batch norm of ``module`` (torch's, normlab's ``BatchNorm*`` and
        ``BatchNormAct*``, ``torch.nn.SyncBatchNorm``) by a ``normlab.nn.SyncBatchNorm`` that
        keeps its settings, its activation and the *same* parameters and buffers (an optimizer
        built before keeps working). Batch Renorm, Ghost BN and Split BN have no synchronized
        form and raise; frozen layers are left alone.

        Parameters
        ----------
        module : nn.Module
            A model, or a single batch-norm layer.
        process_group : ProcessGroup, optional
            The group the new layers synchronize over (default: the world).

        Returns
        -------
        nn.Module
            ``module`` with its layers replaced in place, or a new layer when ``module`` itself
            is a batch norm.

        Raises
        ------
        ValueError
            ``module`` holds a Batch Renorm, Ghost BN or Split BN layer.

        Examples
        --------
        >>> import torch, normlab
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
        >>> weight = model[1].weight
        >>> model = normlab.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        >>> type(model[1]).__name__, model[1].weight is weight
        ('SyncBatchNorm', True)
        """

        def convert(bn: nn.Module, path: str) -> nn.Module | None:
            if isinstance(bn, cls):
                return None
            kind = describe(bn).kind
            if kind == "frozen":
                return None
            if kind in ("renorm", "ghost", "split"):
                name = {"renorm": "Batch Renorm", "ghost": "Ghost BN", "split": "Split BN"}[kind]
                raise ValueError(
                    f"cannot convert {path} ({type(bn).__name__}) to SyncBatchNorm: "
                    f"{name} has no synchronized form; convert the model's other layers one by "
                    "one, or replace it first"
                )
            sync = build_like(bn, cls, path=path, overrides={"process_group": process_group})
            transfer_state(bn, sync, path=path, share=True)
            assert isinstance(sync, SyncBatchNorm)
            sync._source_spatial = describe(bn).spatial
            return sync

        return replace_batchnorms(module, convert)

    @classmethod
    def revert_sync_batchnorm(cls, module: nn.Module, spatial: int | None = None) -> nn.Module:
        """The inverse of :meth:`convert_sync_batchnorm`: every ``SyncBatchNorm`` becomes the
        single-process layer of its kind — ``BatchNorm1d/2d/3d``, or ``BatchNormAct*`` when it
        has an activation — keeping every option and the same parameters and buffers (for
        inference and export). The rank comes from the layer it once replaced, else from
        ``spatial``.

        Parameters
        ----------
        module : nn.Module
            A model, or a single ``SyncBatchNorm``.
        spatial : {1, 2, 3}, optional
            The input rank of layers that were not made by :meth:`convert_sync_batchnorm`.

        Returns
        -------
        nn.Module
            ``module`` with its layers replaced in place, or a new layer.

        Raises
        ------
        ValueError
            A layer's rank is unknown and ``spatial`` is not given.

        Examples
        --------
        >>> import normlab
        >>> layer = normlab.nn.SyncBatchNorm.revert_sync_batchnorm(normlab.nn.SyncBatchNorm(4), spatial=2)
        >>> type(layer).__name__
        'BatchNorm2d'
        """

        def revert(bn: nn.Module, path: str) -> nn.Module | None:
            if not isinstance(bn, cls):
                return None
            rank = bn._source_spatial or spatial
            if rank is None:
                raise ValueError(
                    f"revert_sync_batchnorm: {path} was not made by convert_sync_batchnorm, so "
                    "its input rank is unknown; pass spatial=1, 2 or 3"
                )
            kind = "batchnorm" if bn.activation is None else "bnact"
            target = layer_class(kind, rank)
            single = build_like(bn, target, path=path)
            transfer_state(bn, single, path=path, share=True)
            return single

        return replace_batchnorms(module, revert)
