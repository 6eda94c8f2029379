r"""Ghost Batch Normalization (Hoffer et al. 2017): statistics per virtual batch.

The batch is split into contiguous chunks of ``virtual_batch_size`` samples (a last
chunk of a single sample joins the previous one); each chunk is normalized with its
own mean and variance, as if it were its own batch. The running statistics move
once per forward toward the mean over chunks of the chunks' means and unbiased
variances. With ``virtual_batch_size >= N`` it is BatchNorm.

Vectorized, no loop over chunks: the ``G`` full chunks become ``G·C`` channels of one
:func:`normlab.functional.batch_norm_train` call (``(G·v, C, *) → (v, G·C, *)``), and an
uneven last chunk is one more call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional import NonFinite, batch_norm_train
from ..functional._backend import fused_for_layer
from ..functional._batch_norm import chunked_batch_norm_train
from ._batchnorm import NormBase, SingleSample

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d"]


def chunk_sizes(n: int, virtual_batch_size: int) -> tuple[int, int, int]:
    """``(full_chunks, chunk_size, last_chunk_size)``; ``last == 0`` when every chunk is full."""
    if n <= virtual_batch_size:
        return 0, virtual_batch_size, n
    full, rest = divmod(n, virtual_batch_size)
    if rest == 1:  # a single sample has no variance: it joins the previous chunk
        return full - 1, virtual_batch_size, virtual_batch_size + 1
    return full, virtual_batch_size, rest


class _GhostBatchNorm(NormBase):
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
        nonfinite: NonFinite = "skip",
        single_sample: SingleSample = "raise",
        backend: str = "auto",
    ) -> None:
        if virtual_batch_size < 2:
            raise ValueError(f"virtual_batch_size must be >= 2, got {virtual_batch_size}")
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
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"

    def _chunked(self, x: Tensor) -> bool:
        """Whether the fused kernels normalize the chunks in place (views of x, one C++ call):
        where the backend resolves to them, and under "auto" wherever they serve x (the fold
        below copies x into and out of a chunk-major layout, ~2x plain BN's traffic)."""
        return fused_for_layer(self.backend, x)

    def _normalize_chunks(self, x: Tensor, g: int, v: int) -> tuple[Tensor, Tensor, Tensor]:
        """y of ``g`` full chunks of ``v`` samples, and their (g, C) means and biased variances.

        The chunks are folded into channels, ``(g·v, C, *) → (v, g·C, *)``, so one batch-norm
        call (with γ, β repeated per chunk) normalizes them all: no loop over chunks.
        """
        c, rest = x.shape[1], x.shape[2:]
        folded = x.reshape(g, v, c, *rest).transpose(0, 1).reshape(v, g * c, *rest)  # (v, G·C, *)
        weight = self.weight.repeat(g) if self.weight is not None else None
        bias = self.bias.repeat(g) if self.bias is not None else None
        y, mean, var = batch_norm_train(folded, weight, bias, self.eps, backend=self.backend)
        y = y.reshape(v, g, c, *rest).transpose(0, 1).reshape(g * v, c, *rest)
        return y, mean.view(g, c), var.view(g, c)

    def _train_forward(
        self, x: Tensor, mask: Tensor | None, n: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        if mask is not None:
            raise ValueError("GhostBatchNorm does not support mask")
        full, v, last = chunk_sizes(x.shape[0], self.virtual_batch_size)
        spatial = n // x.shape[0]
        if self._chunked(x):
            sizes = [v] * full + ([last] if last else [])
            y, mean, var = chunked_batch_norm_train(x, self.weight, self.bias, self.eps, sizes)
            counts = torch.tensor(sizes, dtype=var.dtype, device=var.device)[:, None] * spatial
            return y, mean.mean(0), (var * (counts / (counts - 1))).mean(0)
        parts, means, variances = [], [], []
        if full:
            y, mean, var = self._normalize_chunks(x[: full * v], full, v)
            parts.append(y)
            means.append(mean)
            variances.append(var * (v * spatial / (v * spatial - 1)))
        if last:
            y, mean, var = batch_norm_train(
                x[full * v :], self.weight, self.bias, self.eps, backend=self.backend
            )
            parts.append(y)
            means.append(mean[None])
            variances.append(var[None] * (last * spatial / (last * spatial - 1)))
        y = parts[0] if len(parts) == 1 else torch.cat(parts)
        if x.dim() >= 4 and x.is_contiguous(
            memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        ):
            y = y.contiguous(
                memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            )
        return y, torch.cat(means).mean(0), torch.cat(variances).mean(0)


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost BatchNorm over ``(N, C)`` or ``(N, C, L)``; chunks of ``virtual_batch_size`` samples."""

    _NDIM = (2, 3)
    _NDIM_TEXT = "2D or 3D"


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost BatchNorm over ``(N, C, H, W)``; chunks of ``virtual_batch_size`` samples."""

    _NDIM = (4,)
    _NDIM_TEXT = "4D"
