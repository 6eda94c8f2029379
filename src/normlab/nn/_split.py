r"""Split batch norm (timm's ``SplitBatchNorm2d``): one set of statistics per part of the batch.

AdvProp (Xie et al. 2020, §4.2, "auxiliary BN") and AugMix (Hendrycks et al. 2020) train on a
batch made of ``num_splits`` equal parts — clean images first, then adversarial or augmented
copies — whose statistics differ. A split layer normalizes part ``i`` with its own batch
statistics and its own ``γ_i, β_i``, and keeps ``num_splits`` sets of running statistics: the
layer itself holds the first (the clean data's, used in eval for every input), ``aux_bn[i]``
the others. In training, with parts :math:`x_0, …, x_{k-1}` of ``N / k`` samples each,

.. math:: y = \operatorname{cat}\big(\mathrm{BN}_0(x_0),\ \mathrm{BN}_1(x_1),\ …,\ \mathrm{BN}_{k-1}(x_{k-1})\big)

and in eval :math:`y = \mathrm{BN}_0(x)`. The state-dict keys are timm's (``weight``,
``running_mean``, …, ``aux_bn.0.weight``, …), so a timm checkpoint loads; dropping the
auxiliary layers after training (``convert_batchnorm(model, normlab.nn.BatchNorm2d)``) keeps
the first split, as the paper does.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..functional._checks import check_positive
from ._base import NormBase, describe, layer_class
from ._convert import build_like, replace_batchnorms, transfer_state

__all__ = ["SplitBatchNorm1d", "SplitBatchNorm2d", "SplitBatchNorm3d", "split_parts"]

torch.fx.wrap("split_parts")  # one call_function node in a torch.fx graph


def split_parts(input: Tensor, num_splits: int, owner: str) -> tuple[Tensor, ...]:
    """``input`` cut along the batch axis into ``num_splits`` equal parts; ``ValueError`` when
    the batch size is not a multiple of ``num_splits``."""
    n = input.shape[0]
    if n % num_splits:
        raise ValueError(
            f"{owner}: the batch size {n} is not a multiple of num_splits={num_splits} "
            "(the batch is num_splits equal parts, the clean one first)"
        )
    return input.split(n // num_splits)


class _SplitBatchNorm(NormBase):
    kind = "split"
    OPTIONS: ClassVar[dict[str, Any]] = {**NormBase.OPTIONS, "num_splits": 2}

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        num_splits: int = 2,
        **options: Any,
    ) -> None:
        self.num_splits = check_positive(num_splits, "num_splits", integer=True, minimum=2)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **options
        )
        aux = layer_class("batchnorm", type(self).spatial)
        self.aux_bn = nn.ModuleList(
            aux(num_features, eps, momentum, affine, track_running_stats, device, dtype, **options)
            for _ in range(self.num_splits - 1)
        )

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Training: part ``i`` of the batch through split ``i``; eval: the first split for all."""
        if not self.training:
            return super().forward(input, mask)
        owner = f"{type(self).__name__}({self.num_features})"
        parts = split_parts(input, self.num_splits, owner)
        masks = split_parts(mask, self.num_splits, owner) if mask is not None else None
        outputs = [super().forward(parts[0], masks[0] if masks is not None else None)]
        for i, aux in enumerate(self.aux_bn):
            outputs.append(aux(parts[i + 1], masks[i + 1] if masks is not None else None))
        return torch.cat(outputs)

    @classmethod
    def convert_split_batchnorm(cls, module: nn.Module, num_splits: int = 2) -> nn.Module:
        """Replace every batch norm of ``module`` by a split layer of its rank (timm's
        ``convert_splitbn_model``): the first split takes the layer's own parameters and
        buffers (the same tensors), each auxiliary split starts from copies of them. The
        layer's options are kept (or the conversion refuses, as :func:`normlab.nn.utils.convert_batchnorm`).
        Batch norms of another kind than plain (``BatchNormAct``, Renorm, Ghost, Sync,
        frozen) raise: a split layer is plain batch norm per split. Returns ``module`` (a new
        layer when ``module`` itself is a batch norm).

        Examples
        --------
        >>> import torch, normlab
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> model = normlab.nn.SplitBatchNorm2d.convert_split_batchnorm(model, num_splits=3)
        >>> type(model[1]).__name__, len(model[1].aux_bn)
        ('SplitBatchNorm2d', 2)
        >>> model(torch.randn(6, 3, 5, 5)).shape       # clean, then two augmented copies
        torch.Size([6, 8, 3, 3])
        """

        def convert(bn: nn.Module, path: str) -> nn.Module | None:
            if isinstance(bn, _SplitBatchNorm):
                return None
            description = describe(bn)
            if description.kind != "batchnorm":
                raise ValueError(
                    f"cannot convert {path} ({type(bn).__name__}) to a split batch norm: it is a "
                    f"{description.kind!r} layer and a split layer is plain batch norm per split"
                )
            target = layer_class("split", description.spatial)
            split = build_like(bn, target, path=path, overrides={"num_splits": num_splits})
            transfer_state(bn, split, path=path, share=True)
            assert isinstance(split, _SplitBatchNorm)
            for aux in split.aux_bn:
                transfer_state(split, aux, path=path, share=False)
            return split

        return replace_batchnorms(module, convert)


class SplitBatchNorm1d(_SplitBatchNorm):
    """Split batch norm over ``(N, C)`` or ``(N, C, L)``; see :class:`SplitBatchNorm2d`.

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels.
    eps : float
        Added to the variance for stability (default 1e-5).
    momentum : float or None
        Running-statistics factor in ``[0, 1]`` (default 0.1); ``None``: cumulative average.
    affine : bool
        Learnable per-channel γ (``weight``) and β (``bias``), per split, default True.
    track_running_stats : bool
        Keep running mean and variance for eval (default True).
    device : torch.device or str, optional
        Where parameters and buffers are created.
    dtype : torch.dtype, optional
        Their dtype.
    num_splits : int
        Parts of a training batch, each with its own statistics, ``>= 2`` (default 2).
    **options
        ``bias``, ``nonfinite``, ``single_sample``, ``backend`` and ``channel_axis``, as
        :class:`NormBase`; every split gets them.

    Examples
    --------
    >>> import torch, normlab
    >>> normlab.nn.SplitBatchNorm1d(3, num_splits=2)(torch.randn(8, 3)).shape
    torch.Size([8, 3])
    """

    _NDIM = (2, 3)
    spatial = 1


class SplitBatchNorm2d(_SplitBatchNorm):
    """BatchNorm2d with ``num_splits`` sets of statistics and affine parameters (timm's, for
    AdvProp/AugMix): in training the batch is ``num_splits`` equal parts, part ``i``
    normalized by split ``i``; eval uses the first split. Other arguments as
    :class:`normlab.nn.BatchNorm2d` (every split gets them).

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels.
    eps : float
        Added to the variance for stability (default 1e-5).
    momentum : float or None
        Running-statistics factor in ``[0, 1]`` (default 0.1); ``None``: cumulative average.
    affine : bool
        Learnable per-channel γ (``weight``) and β (``bias``), per split, default True.
    track_running_stats : bool
        Keep running mean and variance for eval (default True).
    device : torch.device or str, optional
        Where parameters and buffers are created.
    dtype : torch.dtype, optional
        Their dtype.
    num_splits : int
        Parts of a training batch, each with its own statistics, ``>= 2`` (default 2).
    **options
        ``bias``, ``nonfinite``, ``single_sample``, ``backend`` and ``channel_axis``, as
        :class:`NormBase`; every split gets them.

    Examples
    --------
    >>> import torch, normlab
    >>> layer = normlab.nn.SplitBatchNorm2d(4, num_splits=2)
    >>> clean, adversarial = torch.randn(8, 4, 3, 3), 5 + 3 * torch.randn(8, 4, 3, 3)
    >>> y = layer(torch.cat([clean, adversarial]))  # each half with its own statistics
    >>> layer.running_mean.abs().max() < 0.1, layer.aux_bn[0].running_mean.min() > 0.2
    (tensor(True), tensor(True))
    """

    _NDIM = (4,)
    spatial = 2


class SplitBatchNorm3d(_SplitBatchNorm):
    """Split batch norm over ``(N, C, D, H, W)``; see :class:`SplitBatchNorm2d`.

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels.
    eps : float
        Added to the variance for stability (default 1e-5).
    momentum : float or None
        Running-statistics factor in ``[0, 1]`` (default 0.1); ``None``: cumulative average.
    affine : bool
        Learnable per-channel γ (``weight``) and β (``bias``), per split, default True.
    track_running_stats : bool
        Keep running mean and variance for eval (default True).
    device : torch.device or str, optional
        Where parameters and buffers are created.
    dtype : torch.dtype, optional
        Their dtype.
    num_splits : int
        Parts of a training batch, each with its own statistics, ``>= 2`` (default 2).
    **options
        ``bias``, ``nonfinite``, ``single_sample``, ``backend`` and ``channel_axis``, as
        :class:`NormBase`; every split gets them.

    Examples
    --------
    >>> import torch, normlab
    >>> normlab.nn.SplitBatchNorm3d(2)(torch.randn(4, 2, 2, 2, 2)).shape
    torch.Size([4, 2, 2, 2, 2])
    """

    _NDIM = (5,)
    spatial = 3
