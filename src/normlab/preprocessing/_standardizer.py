r"""``Standardizer``: streaming mean-0 / std-1 input normalization that lives inside a model.

.. math::
    z = \frac{x - \mu}{s},\qquad
    s = \begin{cases} 1 & \text{a near-constant feature} \\ \sqrt{\sigma^2} & \text{otherwise}\end{cases}

Statistics reduce over every axis except ``channel_axis`` and are accumulated in
float64, per batch, then merged across batches with Chan's exact formula, so any
split of the data gives the one-shot statistics. A feature is near-constant by
scikit-learn's rule (``sklearn.preprocessing._data._is_constant_feature``, the
error bound of the two-pass variance):

.. math:: \sigma^2 \le n\,\epsilon\,\sigma^2 + (n\,\mu\,\epsilon)^2,\qquad \epsilon = 2^{-52}

One batch's statistics, on CPU (``_numpy_moments``):

* the sum :math:`S_1 = \sum x` (one read); a finite :math:`S_1` proves that the
  batch holds no NaN/Inf, so clean data pays nothing for the check;
* when the batch is not far off zero, :math:`\mu^2 \le 16\,\sigma^2`, the sum of
  squares in the same float64 (a second read, no temporary):
  :math:`\sigma^2 = S_2/n - \mu^2`. The cancellation is bounded by that
  condition: the relative error of :math:`\sigma^2` stays at ~17 roundings of
  :math:`S_2` (measured: 6e-14 for n = 1000, 8e-13 for n = 262144, against
  1e-15 / 2e-14 for two passes);
* otherwise (large offsets such as Unix timestamps, near-constant features) the
  two-pass :math:`\sigma^2 = \sum (x - \mu)^2 / n`, as scikit-learn.

Why not :func:`normlab.functional.batch_norm_stats` / ``merge_stats`` on CPU
(measured on the shared 2-core machine, float64 batches of 1000×64): the torch
path cost ~450 µs a batch on one thread and 3–10 ms while another process kept a
core busy (ATen splits a 64k-element op over both threads; torch's thread count
is process-global, so it is not changed here), the torch merge alone 72 µs of
small-op dispatch. The numpy passes run on one thread by construction (~100 µs a
batch there, two reads), and the merge updates the CPU buffers in place (~10 µs).
Tensors on other devices go through ``batch_norm_stats``.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..functional import batch_norm_stats

__all__ = ["NanPolicy", "Standardizer"]

NanPolicy = Literal["raise", "ignore"]
_STATS = ("mean_", "var_", "scale_", "n_samples_seen_")
_EPS64 = float(np.finfo(np.float64).eps)
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)
_NEAR = 16.0  # one-read variance only where mean² <= 16·var (see the module docstring)


# --- per-batch statistics ---------------------------------------------------------------------
@dataclass(slots=True)
class _Moments:
    """Per-feature float64 ``mean`` and biased ``var`` (numpy, shape ``(C,)``) and ``count``.

    ``count`` is a float when every feature has seen the same number of values
    (no NaN so far), else an array. A feature with count 0 (only NaNs) has
    ``mean = var = NaN``. ``far`` says the latest batch failed the one-read test,
    so the next batch goes straight to two passes.
    """

    mean: np.ndarray
    var: np.ndarray
    count: np.ndarray | float
    far: bool = False

    def counts(self) -> np.ndarray:
        c = self.count
        return np.full(self.mean.size, c) if isinstance(c, float) else c

    def merge(self, other: _Moments) -> _Moments:
        r"""Chan et al.'s exact merge; an empty side (count 0) is the identity.

        .. math::
            n = n_a + n_b,\quad \delta = \mu_b - \mu_a,\quad
            \mu = \mu_a + \delta\,\tfrac{n_b}{n},\quad
            \sigma^2 = \tfrac{n_a}{n}\sigma_a^2 + \tfrac{n_b}{n}\sigma_b^2
            + \delta^2\,\tfrac{n_a n_b}{n^2}

        In place (returns ``self``) when both counts are scalars (no NaN seen),
        else a new ``_Moments``. ``other`` is not changed.
        """
        na, nb = self.count, other.count
        if isinstance(na, float) and isinstance(nb, float):
            n = na + nb
            fa, fb = na / n, nb / n
            delta = np.subtract(other.mean, self.mean)
            self.var *= fa
            self.var += other.var * fb
            self.mean += delta * fb
            delta *= delta
            delta *= fa * fb
            self.var += delta
            self.count, self.far = n, other.far
            return self
        counts = np.asarray(na + nb, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = nb / counts
            diff = other.mean - self.mean
            mean = self.mean + diff * frac
            var = (na * self.var + nb * other.var + diff * diff * na * frac) / counts
        # an empty side's NaN mean must not leak
        mean = np.where(nb == 0, self.mean, np.where(na == 0, other.mean, mean))
        var = np.where(nb == 0, self.var, np.where(na == 0, other.var, var))
        return _Moments(mean, var, counts, other.far)


def _first_index(bad: np.ndarray | Tensor) -> tuple[int, ...]:
    if isinstance(bad, Tensor):
        return tuple(int(i) for i in torch.nonzero(bad)[0])
    return tuple(int(i) for i in np.argwhere(bad)[0])


def _check_finite(x: np.ndarray | Tensor, nan_policy: NanPolicy) -> bool:
    """Raise for ±Inf (always) and NaN (under ``"raise"``); return whether NaNs are present."""
    inf = torch.isinf(x) if isinstance(x, Tensor) else np.isinf(x)
    if inf.any():
        raise ValueError(
            f"input contains {int(inf.sum())} infinite value(s) (+Inf or -Inf), the first at "
            f"index {_first_index(inf)}; the Standardizer rejects them under every nan_policy, "
            "as scikit-learn's StandardScaler does (replace them, e.g. by NaN with "
            "nan_policy='ignore')"
        )
    nan = torch.isnan(x) if isinstance(x, Tensor) else np.isnan(x)
    if not nan.any():
        return False
    if nan_policy == "raise":
        raise ValueError(
            f"input contains {int(nan.sum())} NaN value(s), the first at index "
            f"{_first_index(nan)}; clean the data or use nan_policy='ignore'"
        )
    return True


def _numpy_moments(x: np.ndarray, axis: int, nan_policy: NanPolicy, far: bool) -> _Moments:
    """One batch's statistics on CPU, in float64 on one thread (see the module docstring).

    ``x`` is viewed as ``(lead, C)`` or ``(lead, C, trail)`` (free for contiguous
    data); ``far``: skip the one-read attempt (the previous batch failed it).
    """
    channels = x.shape[axis]
    lead, trail = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1 :])
    v: np.ndarray
    axes: int | tuple[int, int]
    col: tuple[int, ...]
    if trail == 1:
        v, axes, col = x.reshape(lead, channels), 0, (channels,)
        total, pattern = "ij->j", "ij,ij->j"
    else:
        v, axes, col = x.reshape(lead, channels, trail), (0, 2), (channels, 1)
        total, pattern = "ijk->j", "ijk,ijk->j"
    owned = v.dtype != np.float64
    if owned:  # float32/float16: one cast, then everything in float64
        v = v.astype(np.float64)
    n = float(lead * trail)
    mean = np.einsum(total, v)  # (C,) the sum, for now
    if not np.isfinite(mean).all():  # NaN/Inf in the batch, or an overflowing sum
        return _numpy_masked(x, v, axes, pattern, col, nan_policy)
    mean /= n
    sq = mean * mean
    if not far:
        var = np.einsum(pattern, v, v)
        var /= n
        var -= sq
        if (sq <= _NEAR * var).all():
            return _Moments(mean, var, n)
    dev = np.subtract(v, mean.reshape(col), out=v if owned else None)
    var = np.einsum(pattern, dev, dev)
    var /= n
    return _Moments(mean, var, n, far=not (sq <= _NEAR * var).all())


def _numpy_masked(
    x: np.ndarray,
    v: np.ndarray,
    axes: int | tuple[int, int],
    pattern: str,
    col: tuple[int, ...],
    nan_policy: NanPolicy,
) -> _Moments:
    """Two-pass statistics of a batch whose sum is not finite: raise for Inf/NaN or skip NaNs."""
    if not _check_finite(x, nan_policy):  # finite values whose sum overflows
        inf = np.full(v.shape[1], np.inf)
        return _Moments(inf, inf.copy(), float(v.size // v.shape[1]))
    valid = ~np.isnan(v)
    count = np.add.reduce(valid, axis=axes, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.add.reduce(np.where(valid, v, 0.0), axis=axes) / count
        dev = np.where(valid, v - mean.reshape(col), 0.0)
        var = np.einsum(pattern, dev, dev) / count
    return _Moments(mean, var, count, far=True)


@torch.no_grad()
def _torch_moments(x: Tensor, axis: int, nan_policy: NanPolicy, dtype: torch.dtype) -> _Moments:
    """Statistics of a tensor on an accelerator, via :func:`normlab.functional.batch_norm_stats`."""
    mask = ~torch.isnan(x) if _check_finite(x, nan_policy) else None
    stats = batch_norm_stats(x, channel_axis=axis, mask=mask, dtype=dtype)
    mean, var, count = (t.to("cpu", torch.float64).numpy() for t in stats)
    empty = count == 0
    mean[empty] = var[empty] = np.nan
    return _Moments(mean, var, count)


def _as_data(batch: Any) -> np.ndarray | Tensor:
    """A batch as a float numpy array (CPU) or a float tensor (other devices)."""
    if isinstance(batch, tuple | list):  # (x, y, ...) from a DataLoader: the first item
        if not batch:
            raise ValueError("got an empty tuple as a batch")
        batch = batch[0]
    if isinstance(batch, Tensor):
        if batch.layout != torch.strided:
            raise TypeError(f"expected a dense tensor, got layout {batch.layout} (use .to_dense())")
        if batch.is_complex():
            raise TypeError(f"expected real numbers, got a {batch.dtype} tensor")
        if batch.device.type == "cpu":
            if batch.dtype not in _NUMPY_FLOATS:  # bfloat16, integers, bool
                batch = batch.double()
            return batch.numpy(force=True)  # a view: no copy
        if not batch.is_floating_point():
            return batch.float() if batch.device.type == "mps" else batch.double()
        return batch
    if isinstance(batch, np.ndarray):
        if batch.dtype.kind == "f":
            return batch
        if batch.dtype.kind in "biu":
            return batch.astype(np.float64)
        raise TypeError(f"expected real numbers, got a {batch.dtype} array")
    raise TypeError(
        f"expected a tensor, a numpy array or an (x, ...) tuple, got {type(batch).__name__}"
    )


def _as_tensor(batch: Any) -> Tensor:
    data = _as_data(batch)
    return torch.from_numpy(data) if isinstance(data, np.ndarray) else data


class Standardizer(nn.Module):
    r"""Standardize features ``(N, F)`` or channels ``(N, C, ...)`` to mean 0 and std 1.

    A streaming, float64 twin of scikit-learn's ``StandardScaler`` that is a
    ``torch.nn.Module``: fit it on a tensor, an array or any iterable of batches
    (a ``DataLoader``), then put it at the front of a model.

    Parameters
    ----------
    channel_axis : int, default 1
        The axis kept; every other axis is reduced (``1`` for ``(N, C, ...)``,
        ``-1`` for channels-last ``(N, ..., C)``).
    with_mean, with_std : bool, default True
        Center / scale, as ``StandardScaler``. The mean and variance are computed
        either way.
    eps : float or None, default None
        ``None``: a feature is near-constant (``scale_ = 1``) by scikit-learn's
        rule :math:`\sigma^2 \le n\epsilon\sigma^2 + (n\mu\epsilon)^2`. A number
        ``>= 0``: a feature is constant when ``var_ <= eps``.
    nan_policy : {"raise", "ignore"}, default "raise"
        ``"raise"``: a NaN in a batch raises (naming how many and the first
        position). ``"ignore"``: statistics skip NaNs per feature and
        ``transform`` keeps NaNs where they were, as scikit-learn. ±Inf raises
        under both, as scikit-learn.
    progress : bool or None, default None
        Show a progress bar in :meth:`fit` over a sized iterable of more than 20
        batches; ``None``: when stderr is a terminal.

    Attributes
    ----------
    mean_, var_, scale_ : Tensor of shape (C,)
        float64 buffers (float32 on MPS), whatever the module's dtype: ``.half()``
        and ``.to(dtype)`` leave them alone. ``var_`` is the biased variance.
        A feature that has seen only NaNs has NaN statistics (as scikit-learn).
        On CPU, ``partial_fit`` updates them in place (like BatchNorm's running
        statistics); ``fit`` installs new tensors.
    n_samples_seen_ : Tensor of shape (C,)
        Values counted per feature (NaNs are not), float64.

    Examples
    --------
    >>> import torch
    >>> from normlab.preprocessing import Standardizer
    >>> x = torch.tensor([[1.0, 10.0], [3.0, 10.0], [5.0, 10.0]])
    >>> s = Standardizer().fit(x)
    >>> s.mean_, s.scale_  # the constant second feature keeps scale 1
    (tensor([ 3., 10.], dtype=torch.float64), tensor([1.6330, 1.0000], dtype=torch.float64))
    >>> s(x)
    tensor([[-1.2247,  0.0000],
            [ 0.0000,  0.0000],
            [ 1.2247,  0.0000]])
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
        if isinstance(channel_axis, bool) or not isinstance(channel_axis, int):
            raise TypeError(f"channel_axis must be an int, got {channel_axis!r}")
        if eps is not None and not (isinstance(eps, int | float) and 0 <= eps < math.inf):
            raise ValueError(
                f"eps must be a finite number >= 0 (or None for scikit-learn's rule), got {eps!r}"
            )
        self.channel_axis, self.with_mean, self.with_std = channel_axis, with_mean, with_std
        self.eps, self.nan_policy, self.progress = eps, nan_policy, progress
        for name in _STATS:
            self.register_buffer(name, torch.empty(0, dtype=torch.float64))
        self._cache: tuple[Any, ...] | None = None  # transform's (mean, scale) in the input's dtype
        self._state: tuple[Any, ...] | None = None  # (_Moments, buffers, their _versions)

    # --- state ----------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        """Whether statistics are present (after a fit, a ``partial_fit`` or a load)."""
        return self._buffers["mean_"].numel() > 0  # type: ignore[union-attr]

    @staticmethod
    def _stat_dtype(device: torch.device) -> torch.dtype:
        return torch.float32 if device.type == "mps" else torch.float64

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Standardizer:
        # .half(), .to(dtype), .float() convert every float buffer: the statistics follow the
        # device but stay float64, converted from the original (7e4 would be inf in float16)
        before = {name: self._buffers[name] for name in _STATS}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            assert old is not None and new is not None
            want = self._stat_dtype(new.device)
            if new.dtype != want:
                self._buffers[name] = old.to(device=new.device, dtype=want)
        # e.g. share_memory() moves the storage under the same tensor: rebuild from the buffers
        self.__dict__["_state"] = self.__dict__["_cache"] = None
        return self

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # an unfitted Standardizer takes the fitted statistics' shapes on load (in float64)
        given = {n: state_dict[prefix + n] for n in _STATS if prefix + n in state_dict}
        shapes = {n: tuple(t.shape) for n, t in given.items() if isinstance(t, Tensor)}
        if len(set(shapes.values())) > 1 or any(len(s) != 1 for s in shapes.values()):
            error_msgs.append(f"Standardizer statistics must be 1-D of one length, got {shapes}")
            return
        for name, shape in shapes.items():
            device = self._buffers[name].device  # type: ignore[union-attr]
            self._buffers[name] = torch.empty(shape, dtype=self._stat_dtype(device), device=device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for name in _STATS:  # load_state_dict(assign=True) installs the given tensors
            t = self._buffers[name]
            assert t is not None
            if t.dtype != self._stat_dtype(t.device):
                self._buffers[name] = t.to(self._stat_dtype(t.device))
        self.__dict__["_state"] = self.__dict__["_cache"] = None

    def extra_repr(self) -> str:
        features = self.mean_.numel() if self.is_fitted else "unfitted"
        return (
            f"features={features}, channel_axis={self.channel_axis}, nan_policy={self.nan_policy!r}"
        )

    def _live(self) -> _Moments | None:
        """The statistics of the last store, if the buffers are still the tensors it made, unedited.

        On CPU the arrays of the returned ``_Moments`` are the buffers' memory.
        """
        state = self._state
        if state is None:
            return None
        b = self._buffers
        a, c, d, e = b["mean_"], b["var_"], b["scale_"], b["n_samples_seen_"]
        ta, tc, td, te = state[1]
        # no buffer replaced, edited in place, or given other memory (share_memory_, .data =)
        same = a is ta and c is tc and d is td and e is te
        versions = (a._version, c._version, d._version, e._version)  # type: ignore[union-attr]
        if same and versions == state[2] and a.data_ptr() == state[5]:  # type: ignore[union-attr]
            return state[0]
        return None

    def _moments(self) -> _Moments:
        """The current statistics, as a :class:`_Moments` (from the buffers if edited since)."""
        live = self._live()
        if live is not None:
            return live
        mean, var, _, count = (
            t.detach().to("cpu", torch.float64).numpy().copy()  # type: ignore[union-attr]
            for t in (self._buffers[name] for name in _STATS)
        )
        uniform = count.size > 0 and count[0] > 0 and bool((count == count[0]).all())
        return _Moments(mean, var, float(count[0]) if uniform else count)

    def _scale(self, m: _Moments, out: np.ndarray | None = None) -> np.ndarray:
        if self.eps is None:  # sklearn.preprocessing._data._is_constant_feature
            bound = m.mean * (m.count * _EPS64)
            bound *= bound
            bound += m.var * (m.count * _EPS64)
        else:
            bound = np.asarray(self.eps)
        scale = np.sqrt(m.var, out=out)  # NaN var (only NaNs seen): NaN scale, as sklearn
        np.copyto(scale, 1.0, where=m.var <= bound)
        return scale

    def _store(self, m: _Moments, scale: np.ndarray | None = None) -> None:
        """Install new statistics as new buffers at once (never a half-updated state)."""
        count = m.counts()
        if not isinstance(m.count, float) and not (count > 0).all():
            warnings.warn(
                f"Standardizer: feature(s) {np.flatnonzero(count <= 0)[:10].tolist()} have only "
                "NaN values so far: their mean_, var_ and scale_ are NaN (as scikit-learn's "
                "StandardScaler) and transform gives NaN there",
                RuntimeWarning,
                stacklevel=3,
            )
        scale = self._scale(m) if scale is None else scale
        device = self._buffers["mean_"].device  # type: ignore[union-attr]
        tensors = [torch.from_numpy(a) for a in (m.mean, m.var, scale, count)]
        live = device.type == "cpu"  # the buffers are the arrays' memory
        if not live:
            tensors = [t.to(device, self._stat_dtype(device)) for t in tensors]
        for name, t in zip(_STATS, tensors, strict=True):
            self._buffers[name] = t
        # (plain attributes set through __dict__: nn.Module.__setattr__ costs µs per call)
        versions = tuple(t._version for t in tensors)
        ptr = tensors[0].data_ptr()
        self.__dict__["_state"] = (m, tuple(tensors), versions, scale, count, ptr) if live else None
        self.__dict__["_cache"] = None

    def _refresh(self) -> None:
        """After an in-place merge into the live statistics: update ``scale_`` and the counts."""
        m, _, _, scale, count, _ = self._state  # type: ignore[misc]
        self._scale(m, out=scale)
        count.fill(m.count)
        self.__dict__["_cache"] = None

    # --- fitting --------------------------------------------------------------------------
    def _check(self, x: np.ndarray | Tensor, features: int | None, fitting: bool) -> None:
        ndim, axis = x.ndim, self.channel_axis
        if ndim < 2:
            raise ValueError(
                f"Standardizer expects (N, features) or (N, C, ...) input, got {ndim}D"
            )
        if not -ndim <= axis < ndim:
            raise ValueError(f"channel_axis={axis} is out of range for a {ndim}D input")
        if features is not None and x.shape[axis] != features:
            raise ValueError(
                f"expected {features} features/channels on axis {axis}, "
                f"got {x.shape[axis]} (input shape {tuple(x.shape)})"
            )
        if fitting and math.prod(x.shape) == 0:
            raise ValueError(
                f"got an empty batch (shape {tuple(x.shape)}): it has no samples to fit "
                "(scikit-learn's StandardScaler raises on one too)"
            )

    def _batch_moments(self, batch: Any, previous: _Moments | None) -> _Moments:
        x = _as_data(batch)
        self._check(x, None if previous is None else previous.mean.size, fitting=True)
        axis = self.channel_axis % x.ndim
        if isinstance(x, np.ndarray):
            far = previous is not None and previous.far
            m = _numpy_moments(x, axis, self.nan_policy, far)
        else:
            m = _torch_moments(x, axis, self.nan_policy, self._stat_dtype(x.device))
        if not np.isfinite(m.var).all():  # NaN for features with only NaNs; inf: overflow
            bad = (m.counts() > 0) & ~(np.isfinite(m.mean) & np.isfinite(m.var))
            if bad.any():
                raise ValueError(
                    f"the statistics of feature(s) {np.flatnonzero(bad)[:10].tolist()} overflow "
                    "float64 (values too large to sum or square); rescale the data"
                )
        return m

    def partial_fit(self, batch: Any) -> Standardizer:
        """Add one batch to the statistics (atomic: a batch that raises changes nothing).

        Parameters
        ----------
        batch : Tensor, numpy array or tuple
            ``(N, C, ...)`` data (or ``(x, y, ...)``: the first item is used). Integer
            data is converted to float64; float32/float16 accumulate in float64.

        Returns
        -------
        Standardizer
            ``self``.

        Raises
        ------
        ValueError
            On an empty batch, ±Inf, NaN under ``nan_policy="raise"``, a feature
            count that differs from the fitted one, or statistics that overflow.

        Examples
        --------
        >>> import numpy as np
        >>> s = Standardizer()
        >>> for batch in np.split(np.arange(12.0).reshape(6, 2), 3):
        ...     s = s.partial_fit(batch)
        >>> s.mean_, s.n_samples_seen_
        (tensor([5., 6.], dtype=torch.float64), tensor([6., 6.], dtype=torch.float64))
        """
        current = self._moments() if self.is_fitted else None
        new = self._batch_moments(batch, current)
        if current is None:
            self._store(new)
            return self
        live = self._state is not None and current is self._state[0]  # _moments() checked it
        merged = current.merge(new)  # in place when it can (no NaN seen)
        if live and merged is current:  # the buffers' own memory was updated: no new tensors
            self._refresh()
        else:
            self._store(merged)
        return self

    def fit(self, data: Any) -> Standardizer:
        """Fit on a tensor/array, or on any iterable of batches (e.g. a ``DataLoader``).

        The previous statistics are replaced only when every batch has been read:
        a loader that raises part-way leaves the module as it was.

        Parameters
        ----------
        data : Tensor, numpy array or iterable
            One batch, or an iterable of batches (each a tensor, an array or an
            ``(x, ...)`` tuple).

        Returns
        -------
        Standardizer
            ``self``.

        Examples
        --------
        >>> import torch
        >>> x = torch.arange(20.0).reshape(10, 2)
        >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=3)
        >>> Standardizer().fit(loader).mean_
        tensor([ 9., 10.], dtype=torch.float64)
        """
        batches: Iterable[Any]
        if isinstance(data, Tensor | np.ndarray):
            batches = [data]
        elif isinstance(data, Iterable):
            batches = data
            show = self.progress if self.progress is not None else sys.stderr.isatty()
            if show and isinstance(data, Sized) and len(data) > 20:
                from tqdm.auto import tqdm

                batches = tqdm(data, desc="Standardizer.fit", leave=False)
        else:
            raise TypeError(
                f"fit() takes a tensor, an array or an iterable of batches, got {type(data).__name__}"
            )
        total: _Moments | None = None
        for batch in batches:
            new = self._batch_moments(batch, total)
            total = new if total is None else total.merge(new)
        if total is None:
            raise ValueError("fit() got no batches")
        self._store(total)
        return self

    def fit_transform(self, data: Tensor | np.ndarray) -> Tensor:
        """:meth:`fit` then :meth:`transform` one tensor or array (not an iterable of batches).

        Parameters
        ----------
        data : Tensor or numpy array

        Returns
        -------
        Tensor
            The standardized data.

        Examples
        --------
        >>> Standardizer().fit_transform(torch.tensor([[1.0], [3.0]]))
        tensor([[-1.],
                [ 1.]])
        """
        if not isinstance(data, Tensor | np.ndarray):
            raise TypeError(
                f"fit_transform() takes one tensor or array, got {type(data).__name__} "
                "(for an iterable of batches: fit(), then transform() each batch)"
            )
        return self.fit(data).transform(data)

    # --- transforming ------------------------------------------------------------------------
    def _affine(self, x: Any) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor], torch.dtype]:
        """Checked ``x`` as a tensor; ``mean_``, ``scale_``, ``1/scale_`` shaped for it, in its
        compute dtype.

        The converted statistics are cached for the next call with the same kind of input
        (the checks stay per call; this is what keeps ``transform`` as cheap as the bare ops).
        """
        if not isinstance(x, Tensor) or not x.is_floating_point():
            x = _as_tensor(x)
        b = self._buffers
        mean, scale = b["mean_"], b["scale_"]
        assert mean is not None and scale is not None
        axis, ndim = self.channel_axis, x.ndim
        key = (mean._version, scale._version, x.dtype, x.device, ndim, axis)
        cache = self._cache
        if (
            cache is not None
            and cache[0] is mean
            and cache[1] is scale
            and cache[2] == key
            and x.shape[axis] == cache[3][0].numel()  # (axis was validated for this ndim)
        ):
            return x, cache[3], cache[4]
        if mean.numel() == 0:
            raise RuntimeError(
                "this Standardizer is not fitted yet: call fit() or partial_fit() first"
            )
        self._check(x, mean.numel(), fitting=False)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        shape = [1] * ndim
        shape[axis] = -1
        # copies: partial_fit updates the buffers in place (through numpy, unseen by autograd)
        stats = (
            mean.to(x.device, acc, copy=True).view(shape),
            scale.to(x.device, acc, copy=True).view(shape),
            (1.0 / scale).to(x.device, acc).view(shape),
        )
        self.__dict__["_cache"] = (mean, scale, key, stats, acc)
        return x, stats, acc

    def transform(self, x: Tensor | np.ndarray) -> Tensor:
        """``(x - mean_) / scale_``, computed in float32 (float64 for float64 input).

        Computed as ``(x - mean_) * (1 / scale_)`` (within one rounding of the division,
        and faster), with the statistics converted once and cached between calls.

        Parameters
        ----------
        x : Tensor or numpy array
            Data shaped like the fitted batches (any number of samples).

        Returns
        -------
        Tensor
            In ``x``'s dtype (float64 for integer input); NaNs stay NaN.

        Examples
        --------
        >>> s = Standardizer().fit(torch.tensor([[0.0], [2.0]]))
        >>> s.transform(torch.tensor([[4.0]]))
        tensor([[3.]])
        """
        x, (mean, _, inverse), acc = self._affine(x)
        y = x if x.dtype is acc else x.to(acc)
        if self.with_mean:
            out = torch.sub(y, mean)
            if self.with_std:
                out.mul_(inverse)  # in place on our own temporary: one allocation, not two
        elif self.with_std:
            out = torch.mul(y, inverse)
        else:
            out = y.clone() if y is x else y
        return out if out.dtype is x.dtype else out.to(x.dtype)

    def inverse_transform(self, z: Tensor | np.ndarray) -> Tensor:
        """``z * scale_ + mean_`` in ``z``'s dtype (the inverse of :meth:`transform`).

        Parameters
        ----------
        z : Tensor or numpy array
            Standardized data.

        Returns
        -------
        Tensor
            In the original units, in ``z``'s dtype.

        Examples
        --------
        >>> s = Standardizer().fit(torch.tensor([[0.0], [2.0]]))
        >>> s.inverse_transform(torch.tensor([[3.0]]))
        tensor([[4.]])
        """
        z, (mean, scale, _), acc = self._affine(z)
        y = z if z.dtype is acc else z.to(acc)
        out = torch.mul(y, scale) if self.with_std else y.clone()
        if self.with_mean:
            out.add_(mean)
        return out if out.dtype is z.dtype else out.to(z.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """:meth:`transform` (the module's call: ``model(x)``)."""
        return self.transform(x)

    # --- scikit-learn interop ------------------------------------------------------------------
    @classmethod
    def from_sklearn(cls, scaler: Any) -> Standardizer:
        """A Standardizer with a fitted ``sklearn.preprocessing.StandardScaler``'s statistics.

        Uses ``nan_policy="ignore"`` (scikit-learn ignores NaNs), unlike the default
        ``"raise"``. Statistics the scaler did not compute (``var_`` with
        ``with_std=False``) are NaN.

        Parameters
        ----------
        scaler : sklearn.preprocessing.StandardScaler
            A fitted scaler (dense, ``(N, F)`` data).

        Returns
        -------
        Standardizer

        Examples
        --------
        >>> import numpy as np
        >>> from sklearn.preprocessing import StandardScaler
        >>> Standardizer.from_sklearn(StandardScaler().fit(np.array([[1.0], [3.0]]))).mean_
        tensor([2.], dtype=torch.float64)
        """
        if not hasattr(scaler, "n_samples_seen_"):
            raise ValueError("the StandardScaler is not fitted: call its fit() first")
        std = cls(with_mean=scaler.with_mean, with_std=scaler.with_std, nan_policy="ignore")
        features = int(scaler.n_features_in_)

        def stat(value: Any) -> np.ndarray:  # a private float64 copy (NaN: not computed)
            return np.full(features, np.nan) if value is None else np.array(value, np.float64)

        seen = np.broadcast_to(np.asarray(scaler.n_samples_seen_, dtype=np.float64), (features,))
        moments = _Moments(stat(scaler.mean_), stat(scaler.var_), seen.copy())
        std._store(moments, scale=None if scaler.scale_ is None else stat(scaler.scale_))
        return std

    def to_sklearn(self) -> Any:
        """A fitted ``StandardScaler`` with these statistics (``(N, F)`` data, channel axis 1).

        Its attributes have scikit-learn's own types (``n_samples_seen_`` a numpy
        scalar or array, ``var_``/``scale_`` ``None`` with ``with_std=False``), so it
        can ``partial_fit`` further.

        Returns
        -------
        sklearn.preprocessing.StandardScaler

        Examples
        --------
        >>> import numpy as np
        >>> scaler = Standardizer().fit(np.array([[1.0], [3.0]])).to_sklearn()
        >>> scaler.partial_fit(np.array([[5.0]])).mean_
        array([3.])
        """
        from sklearn.preprocessing import StandardScaler

        if not self.is_fitted:
            raise RuntimeError(
                "this Standardizer is not fitted yet: call fit() or partial_fit() first"
            )
        m = self._moments()
        scaler = StandardScaler(with_mean=self.with_mean, with_std=self.with_std)
        computed = self.with_mean or self.with_std  # sklearn computes nothing but counts otherwise
        scaler.mean_ = m.mean.copy() if computed else None
        scaler.var_ = m.var.copy() if self.with_std else None
        scaler.scale_ = (
            self.scale_.detach().cpu().double().numpy().copy() if self.with_std else None
        )
        seen = m.counts().astype(np.float64 if computed else np.int64)
        scaler.n_samples_seen_ = seen[0] if (seen == seen[0]).all() else seen
        scaler.n_features_in_ = int(m.mean.size)
        return scaler
