r"""Ghost Batch Normalization (Hoffer et al. 2017): statistics per virtual batch.

The batch is split into consecutive chunks of ``virtual_batch_size`` samples (a last chunk of
a single sample joins the previous one); each chunk is normalized with its own mean and
variance, as if it were its own batch. The running statistics move once per forward toward
the mean over chunks of the chunks' means and unbiased variances. With
``virtual_batch_size >= N`` it is BatchNorm. The chunks are the training path's ``chunks``:
the fused kernels run them as views of the input in one call.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..functional._checks import check_positive
from ._base import NormBase

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]


class _GhostBatchNorm(NormBase):
    kind = "ghost"
    OPTIONS: ClassVar[dict[str, Any]] = {**NormBase.OPTIONS, "virtual_batch_size": 32}

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
        virtual_batch_size: int = 32,
        **options: Any,
    ) -> None:
        """Create the layer (the arguments are described in the class docstring)."""
        self.virtual_batch_size = check_positive(
            virtual_batch_size, "virtual_batch_size", integer=True, minimum=2
        )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **options
        )

    def _variant_spec(self) -> dict[str, Any]:
        return {"virtual_batch_size": self.virtual_batch_size}


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost BatchNorm over ``(N, C)`` or ``(N, C, L)``; chunks of ``virtual_batch_size`` samples.

    In training each chunk of ``virtual_batch_size`` consecutive samples is normalized with
    its own statistics (a last chunk of one sample joins the previous one); eval uses the
    running statistics. The output has the input's shape.

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
    device : torch.device or str, optional
        Where parameters and buffers are created.
    dtype : torch.dtype, optional
        Their dtype.
    virtual_batch_size : int
        Samples per virtual batch, ``>= 2`` (default 32); ``>= N`` is plain BatchNorm.
    **options
        ``bias``, ``nonfinite``, ``single_sample``, ``backend`` and ``channel_axis``
        (``-1``: ``(N, L, C)`` input), as :class:`NormBase`.

    Examples
    --------
    >>> import torch, normlab
    >>> layer = normlab.nn.GhostBatchNorm1d(4, virtual_batch_size=8)
    >>> y = layer(torch.randn(32, 4))         # four virtual batches of 8
    >>> bool(y[:8].mean(0).abs().max() < 1e-5)
    True
    """

    _NDIM = (2, 3)
    spatial = 1


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost BatchNorm over ``(N, C, H, W)``; see :class:`GhostBatchNorm1d`.

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
    device : torch.device or str, optional
        Where parameters and buffers are created.
    dtype : torch.dtype, optional
        Their dtype.
    virtual_batch_size : int
        Samples per virtual batch, ``>= 2`` (default 32); ``>= N`` is plain BatchNorm.
    **options
        ``bias``, ``nonfinite``, ``single_sample`` and ``backend``, as :class:`NormBase`.

    Examples
    --------
    >>> import torch, normlab
    >>> layer = normlab.nn.GhostBatchNorm2d(3, virtual_batch_size=4)
    >>> layer(torch.randn(8, 3, 5, 5)).shape           # two virtual batches of 4
    torch.Size([8, 3, 5, 5])
    """

    _NDIM = (4,)
    spatial = 2


class GhostBatchNorm3d(_GhostBatchNorm):
    """Ghost BatchNorm over ``(N, C, D, H, W)``; see :class:`GhostBatchNorm1d`.

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
    device : torch.device or str, optional
        Where parameters and buffers are created.
    dtype : torch.dtype, optional
        Their dtype.
    virtual_batch_size : int
        Samples per virtual batch, ``>= 2`` (default 32); ``>= N`` is plain BatchNorm.
    **options
        ``bias``, ``nonfinite``, ``single_sample`` and ``backend``, as :class:`NormBase`.

    Examples
    --------
    >>> import torch, normlab
    >>> normlab.nn.GhostBatchNorm3d(2, virtual_batch_size=2)(torch.randn(4, 2, 2, 2, 2)).shape
    torch.Size([4, 2, 2, 2, 2])
    """

    _NDIM = (5,)
    spatial = 3
