r"""``Standardizer``: streaming mean-0 / std-1 input normalization that lives inside a model.

.. math:: z = \frac{x - \mu}{s},\qquad s = \sqrt{\sigma^2}\ \ (s = 1 \text{ for near-constant features})

Statistics reduce over every axis except ``channel_axis``, accumulate in float64
with Chan's parallel merge (:func:`normlab.functional.merge_stats`), so any split
of the data into batches gives the one-shot statistics; a feature is
"near-constant" by scikit-learn's rule and gets ``scale_ = 1``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sized
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..functional import batch_norm_stats, merge_stats

__all__ = ["NanPolicy", "Standardizer"]

NanPolicy = Literal["raise", "ignore"]
_STATS = ("mean_", "var_", "scale_", "n_samples_seen_")


def _as_tensor(batch: Any) -> Tensor:
    if isinstance(batch, tuple | list):  # (x, y, ...) from a DataLoader: the first item
        if not batch:
            raise ValueError("got an empty tuple as a batch")
        batch = batch[0]
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if not isinstance(batch, Tensor):
        raise TypeError(
            f"expected a tensor, a numpy array or an (x, ...) tuple, got {type(batch).__name__}"
        )
    if not batch.dtype.is_floating_point:
        batch = batch.double()
    return batch


class Standardizer(nn.Module):
    """Standardize features (``(N, F)``) or channels (``(N, C, …)``) to mean 0 and std 1.

    Args:
        channel_axis: the axis kept; every other axis is reduced (1 for ``(N, C, …)``,
            ``-1`` for channels-last ``(N, …, C)``).
        with_mean, with_std: center / scale (as scikit-learn's ``StandardScaler``).
        eps: features with ``var <= eps`` relative to the mean's magnitude count as
            constant: scikit-learn's rule ``var < 10·ε_float64·max(|mean|², 1)``
            is used when ``eps`` is ``None`` (default).
        nan_policy: ``"raise"`` (default; the error names how many NaNs and the first
            position) or ``"ignore"`` (statistics skip NaNs per feature; transform keeps
            NaNs where they were — scikit-learn's behaviour, used by :meth:`from_sklearn`).

    Fitted attributes (buffers, float64 — float32 on a device without float64):
    ``mean_``, ``var_``, ``scale_`` (per feature) and ``n_samples_seen_`` (per
    feature: NaNs are not counted). ``forward`` is :meth:`transform`.
    """

    mean_: Tensor
    var_: Tensor
    scale_: Tensor
    n_samples_seen_: Tensor

    def __init__(
        self,
        *,
        channel_axis: int = 1,
        with_mean: bool = True,
        with_std: bool = True,
        eps: float | None = None,
        nan_policy: NanPolicy = "raise",
        progress: bool | None = None,
    ) -> None:
        super().__init__()
        if nan_policy not in ("raise", "ignore"):
            raise ValueError(f"nan_policy must be 'raise' or 'ignore', got {nan_policy!r}")
        self.channel_axis, self.with_mean, self.with_std = channel_axis, with_mean, with_std
        self.eps, self.nan_policy, self.progress = eps, nan_policy, progress
        for name in _STATS:
            self.register_buffer(name, torch.empty(0, dtype=torch.float64))
        self._ndim: int | None = None

    # --- state ----------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return self.mean_.numel() > 0

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # an unfitted Standardizer takes the fitted statistics' shapes on load
        for name in _STATS:
            key = prefix + name
            if key in state_dict:
                setattr(
                    self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device)
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        features = self.mean_.numel() if self.is_fitted else "unfitted"
        return (
            f"features={features}, channel_axis={self.channel_axis}, nan_policy={self.nan_policy!r}"
        )

    # --- fitting --------------------------------------------------------------------------
    def _stat_dtype(self, device: torch.device) -> torch.dtype:
        return torch.float32 if device.type == "mps" else torch.float64

    def _check(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(
                f"Standardizer expects (N, features) or (N, C, ...) input, got {x.dim()}D"
            )
        if not -x.dim() <= self.channel_axis < x.dim():
            raise ValueError(
                f"channel_axis={self.channel_axis} is out of range for a {x.dim()}D input"
            )
        if self.is_fitted and x.shape[self.channel_axis] != self.mean_.numel():
            raise ValueError(
                f"expected {self.mean_.numel()} features/channels on axis {self.channel_axis}, "
                f"got {x.shape[self.channel_axis]} (input shape {tuple(x.shape)})"
            )

    @torch.no_grad()
    def partial_fit(self, batch: Any) -> Standardizer:
        """Add one batch (tensor, array or ``(x, …)`` tuple) to the statistics."""
        x = _as_tensor(batch)
        self._check(x)
        dtype = self._stat_dtype(x.device)
        nan = torch.isnan(x)
        mask = None
        if bool(nan.any()):
            if self.nan_policy == "raise":
                first = tuple(int(i) for i in torch.nonzero(nan)[0])
                raise ValueError(
                    f"input contains {int(nan.sum())} NaN value(s), the first at index {first}; "
                    "clean the data or use nan_policy='ignore'"
                )
            mask = ~nan  # full-shape mask: per-feature counts
        # (small batches stay single-threaded by themselves: ATen does not split reductions
        # under its 32k-element grain; measured 47 ms vs 49 ms for 300 (64, 100) batches, 2 vs 1 threads)
        mean, var, count = batch_norm_stats(
            x, channel_axis=self.channel_axis, mask=mask, dtype=dtype
        )
        if not self.is_fitted:
            self.mean_, self.var_, self.n_samples_seen_ = mean, var, count
        else:
            self.mean_, self.var_, self.n_samples_seen_ = merge_stats(
                self.mean_, self.var_, self.n_samples_seen_, mean, var, count
            )
        self.scale_ = self._scale(self.mean_, self.var_)
        return self

    def _scale(self, mean: Tensor, var: Tensor) -> Tensor:
        if self.eps is not None:
            constant = var <= self.eps
        else:  # scikit-learn's _is_constant_feature: var < 10 * eps64 * max(mean^2, 1)
            bound = 10 * np.finfo(np.float64).eps * torch.clamp(mean.square(), min=1.0)
            constant = var <= bound
        return torch.where(constant, torch.ones_like(var), var.sqrt())

    def fit(self, data: Any) -> Standardizer:
        """Fit on a tensor/array, or on any iterable of batches (e.g. a ``DataLoader``); returns ``self``."""
        for name in _STATS:
            setattr(
                self, name, torch.empty(0, dtype=torch.float64, device=getattr(self, name).device)
            )
        if isinstance(data, Tensor | np.ndarray):
            return self.partial_fit(data)
        if not isinstance(data, Iterable):
            raise TypeError(
                f"fit() takes a tensor, an array or an iterable of batches, got {type(data).__name__}"
            )
        batches: Iterable[Any] = data
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        if show and isinstance(data, Sized) and len(data) > 20:
            from tqdm.auto import tqdm

            batches = tqdm(data, desc="Standardizer.fit", leave=False)
        for batch in batches:
            self.partial_fit(batch)
        if not self.is_fitted:
            raise ValueError("fit() got no batches")
        return self

    def fit_transform(self, data: Tensor | np.ndarray) -> Tensor:
        return self.fit(data).transform(_as_tensor(data))

    # --- transforming ------------------------------------------------------------------------
    def _view(self, t: Tensor, x: Tensor) -> Tensor:
        shape = [1] * x.dim()
        shape[self.channel_axis] = -1
        return t.view(shape)

    def _ready(self, x: Tensor) -> Tensor:
        if not self.is_fitted:
            raise RuntimeError(
                "this Standardizer is not fitted yet: call fit() or partial_fit() first"
            )
        x = _as_tensor(x)
        self._check(x)
        return x

    def transform(self, x: Tensor) -> Tensor:
        """``(x - mean_) / scale_`` in the input's dtype (float64 input stays float64)."""
        x = self._ready(x)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        mean = self._view(self.mean_.to(x.device, acc), x) if self.with_mean else 0.0
        scale = self._view(self.scale_.to(x.device, acc), x) if self.with_std else 1.0
        return ((x.to(acc) - mean) / scale).to(x.dtype)

    def inverse_transform(self, z: Tensor) -> Tensor:
        """``z * scale_ + mean_`` in the input's dtype."""
        z = self._ready(z)
        acc = torch.float64 if z.dtype == torch.float64 else torch.float32
        mean = self._view(self.mean_.to(z.device, acc), z) if self.with_mean else 0.0
        scale = self._view(self.scale_.to(z.device, acc), z) if self.with_std else 1.0
        return (z.to(acc) * scale + mean).to(z.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.transform(x)

    # --- scikit-learn interop ------------------------------------------------------------------
    @classmethod
    def from_sklearn(cls, scaler: Any) -> Standardizer:
        """A Standardizer with a fitted ``sklearn.preprocessing.StandardScaler``'s statistics.

        Uses ``nan_policy="ignore"`` (scikit-learn ignores NaNs), unlike the default ``"raise"``.
        """
        std = cls(with_mean=scaler.with_mean, with_std=scaler.with_std, nan_policy="ignore")
        features = scaler.n_features_in_
        std.mean_ = torch.as_tensor(
            scaler.mean_ if scaler.mean_ is not None else np.zeros(features), dtype=torch.float64
        )
        std.var_ = torch.as_tensor(
            scaler.var_ if scaler.var_ is not None else np.ones(features), dtype=torch.float64
        )
        std.scale_ = torch.as_tensor(
            scaler.scale_ if scaler.scale_ is not None else np.ones(features), dtype=torch.float64
        )
        seen = np.broadcast_to(np.asarray(scaler.n_samples_seen_, dtype=np.float64), (features,))
        std.n_samples_seen_ = torch.as_tensor(seen.copy(), dtype=torch.float64)
        return std

    def to_sklearn(self) -> Any:
        """A fitted ``StandardScaler`` with these statistics (``(N, F)`` data, channel axis 1)."""
        from sklearn.preprocessing import StandardScaler

        if not self.is_fitted:
            raise RuntimeError(
                "this Standardizer is not fitted yet: call fit() or partial_fit() first"
            )
        scaler = StandardScaler(with_mean=self.with_mean, with_std=self.with_std)
        scaler.mean_ = self.mean_.cpu().numpy().copy()
        scaler.var_ = self.var_.cpu().numpy().copy()
        scaler.scale_ = self.scale_.cpu().numpy().copy()
        seen = self.n_samples_seen_.cpu().numpy()
        scaler.n_samples_seen_ = int(seen[0]) if np.all(seen == seen[0]) else seen.astype(np.int64)
        scaler.n_features_in_ = int(self.mean_.numel())
        return scaler
