"""Standardizer against scikit-learn's StandardScaler and float64 two-pass statistics."""

from __future__ import annotations

import itertools

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays
from sklearn.preprocessing import StandardScaler

from normlab.preprocessing import Standardizer


def _batches(x: np.ndarray, size: int) -> list[np.ndarray]:
    return [x[i : i + size] for i in range(0, len(x), size)]


def test_matches_sklearn_partial_fit_to_1e_10() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(3, 5, size=(1000, 7)) * rng.uniform(0.01, 100, size=7)
    x[:, 3] = 2.5  # a constant feature: scale 1, as scikit-learn
    ours, ref = Standardizer(), StandardScaler()
    for b in _batches(x, 37):
        ours.partial_fit(b)
        ref.partial_fit(b)
    for name in ("mean_", "var_", "scale_"):
        np.testing.assert_allclose(
            getattr(ours, name).numpy(), getattr(ref, name), rtol=1e-10, atol=1e-12
        )
    assert ours.scale_[3] == 1.0
    xt = torch.from_numpy(x)
    np.testing.assert_allclose(ours.transform(xt).numpy(), ref.transform(x), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ours.inverse_transform(ours.transform(xt)).numpy(), x, rtol=1e-10)
    assert ours.transform(xt).dtype == torch.float64
    assert ours.transform(xt.float()).dtype == torch.float32


@pytest.mark.parametrize("batch", [10_000, 7, 100])
def test_large_offset_variance_within_1e_6(batch: int) -> None:
    rng = np.random.default_rng(1)
    x = 1e8 + rng.normal(size=(10_000, 3))
    s = Standardizer()
    for b in _batches(x, batch):
        s.partial_fit(b)
    two_pass = ((x - x.mean(0)) ** 2).mean(0)
    np.testing.assert_allclose(s.var_.numpy(), two_pass, rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    data=arrays(
        np.float64, st.tuples(st.integers(2, 30), st.integers(1, 4)), elements=st.floats(-1e4, 1e4)
    ),
    cuts=st.lists(st.integers(1, 29), max_size=4),
)
def test_any_split_gives_one_shot_statistics(data: np.ndarray, cuts: list[int]) -> None:
    one = Standardizer().fit(data)
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    split = Standardizer().fit([data[a:b] for a, b in itertools.pairwise(bounds)])
    scale = float(np.abs(data).max()) + 1
    torch.testing.assert_close(split.mean_, one.mean_, rtol=1e-9, atol=1e-9 * scale)
    torch.testing.assert_close(split.var_, one.var_, rtol=1e-8, atol=1e-8 * scale**2)


def test_channels_and_channels_last_and_dataloader() -> None:
    x = torch.randn(50, 3, 4, 4) * torch.tensor([1.0, 10.0, 0.1]).view(1, 3, 1, 1) + 5
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.zeros(50)), batch_size=8
    )
    s = Standardizer().fit(loader)
    z = s(x)
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std((0, 2, 3), correction=0), torch.ones(3), atol=1e-5, rtol=0)
    last = Standardizer(channel_axis=-1).fit(x.permute(0, 2, 3, 1))
    torch.testing.assert_close(last.mean_, s.mean_)


def test_nan_policies() -> None:
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    x[1, 2] = np.nan
    with pytest.raises(
        ValueError, match=r"input contains 1 NaN value\(s\), the first at index \(1, 2\)"
    ):
        Standardizer().fit(x)
    s = Standardizer(nan_policy="ignore").fit(x)
    ref = StandardScaler().fit(x)
    np.testing.assert_allclose(s.mean_.numpy(), ref.mean_)
    np.testing.assert_allclose(s.var_.numpy(), ref.var_)
    assert s.n_samples_seen_.tolist() == [4, 4, 3]
    z = s.transform(torch.from_numpy(x))
    assert torch.isnan(z[1, 2]) and torch.isfinite(z[0]).all()


def test_module_behaviour_state_dict_and_sequential() -> None:
    x = torch.randn(64, 5) * 3 + 2
    fitted = Standardizer().fit(x)
    fresh = Standardizer()
    fresh.load_state_dict(fitted.state_dict())
    torch.testing.assert_close(fresh(x), fitted(x))
    model = torch.nn.Sequential(Standardizer().fit(x), torch.nn.Linear(5, 2))
    assert model(x).shape == (64, 2)
    assert "features=5" in repr(fitted)


def test_sklearn_round_trip() -> None:
    x = np.random.default_rng(2).normal(size=(40, 3))
    ref = StandardScaler().fit(x)
    s = Standardizer.from_sklearn(ref)
    assert s.nan_policy == "ignore"
    np.testing.assert_allclose(
        s.transform(torch.from_numpy(x)).numpy(), ref.transform(x), rtol=1e-12
    )
    back = s.to_sklearn()
    np.testing.assert_allclose(back.transform(x), ref.transform(x), rtol=1e-12)


def test_errors() -> None:
    with pytest.raises(
        RuntimeError, match=r"not fitted yet: call fit\(\) or partial_fit\(\) first"
    ):
        Standardizer().transform(torch.randn(3, 2))
    s = Standardizer().fit(torch.randn(10, 4))
    with pytest.raises(ValueError, match=r"expected 4 features/channels on axis 1, got 3"):
        s.transform(torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"expects \(N, features\) or \(N, C, ...\) input, got 1D"):
        s.transform(torch.randn(4))
    with pytest.raises(ValueError, match="nan_policy must be 'raise' or 'ignore'"):
        Standardizer(nan_policy="drop")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected a tensor, a numpy array or an"):
        Standardizer().partial_fit("abc")
