"""Standardizer against scikit-learn's StandardScaler and float64 two-pass statistics."""

from __future__ import annotations

import itertools
import warnings

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


# --- issue 12, item 9 ---------------------------------------------------------------------------
def _sklearn_scale_constant(var: np.ndarray, mean: np.ndarray, n: np.ndarray) -> np.ndarray:
    """scikit-learn's own rule, from the installed version (private helper, read not copied)."""
    from sklearn.preprocessing._data import _is_constant_feature

    return np.asarray(_is_constant_feature(var, mean, n))


@pytest.mark.parametrize("batch", [1000, 128, 7])
@pytest.mark.parametrize("offset", [0.0, 1e4, 1.7e9, 1e12])
def test_constant_feature_rule_is_sklearns_on_large_offsets(batch: int, offset: float) -> None:
    # Unix timestamps (1.7e9 ± 30 s) used to get scale 1 and a transformed std of 29.6
    rng = np.random.default_rng(3)
    x = offset + rng.uniform(-30, 30, size=(1000, 4))
    x[:, 2] = offset  # truly constant
    x[:, 3] = offset + rng.normal(size=1000) * max(abs(offset), 1.0) * 1e-17  # within rounding
    ours = Standardizer()
    for b in _batches(x, batch):
        ours.partial_fit(b)
    ref = StandardScaler().fit(x)
    constant = ours.scale_.numpy() == 1.0
    np.testing.assert_array_equal(constant, ref.scale_ == 1.0)
    # streaming in float64 rounds each merged mean to the data's ulp (sklearn's partial_fit too)
    rtol = 1e-9 + np.spacing(offset) / 17.0
    np.testing.assert_allclose(ours.scale_.numpy(), ref.scale_, rtol=rtol)
    z = ours.transform(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(z.std(0), ref.transform(x).std(0), rtol=rtol, atol=1e-12)
    if offset == 1.7e9:
        np.testing.assert_allclose(z[:, :2].std(0), 1.0, rtol=1e-6)


def test_infinity_raises_under_every_policy_like_sklearn() -> None:
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    x[2, 1] = -np.inf
    x[3, 0] = np.inf
    with pytest.raises(ValueError, match="infinity"):
        StandardScaler().fit(x)  # the behaviour matched
    for policy in ("raise", "ignore"):
        s = Standardizer(nan_policy=policy).fit(np.ones((3, 3)) + np.eye(3))
        before = {k: v.clone() for k, v in s.state_dict().items()}
        with pytest.raises(
            ValueError,
            match=r"input contains 2 infinite value\(s\) \(\+Inf or -Inf\), the first at index "
            r"\(2, 1\); the Standardizer rejects them under every nan_policy",
        ):
            s.partial_fit(x)
        with pytest.raises(ValueError, match="infinite value"):
            s.partial_fit(torch.from_numpy(x).float())
        for k, v in s.state_dict().items():
            assert torch.equal(v, before[k]), k


def test_fit_is_atomic_when_the_loader_fails_part_way() -> None:
    old = np.random.default_rng(4).normal(5, 2, size=(50, 3))
    s = Standardizer().fit(old)
    before = {k: v.clone() for k, v in s.state_dict().items()}

    def loader():  # one good batch, then the loader dies
        yield np.zeros((10, 3))
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        s.fit(loader())
    assert s.is_fitted
    for k, v in s.state_dict().items():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(s(torch.from_numpy(old)), Standardizer().fit(old)(old))

    fresh = Standardizer()
    with pytest.raises(OSError, match="disk gone"):
        fresh.fit(loader())
    assert not fresh.is_fitted

    bad = np.ones((4, 3))
    bad[1, 1] = np.nan  # a NaN batch in the middle, and a batch of another width at the end
    for batches in ([np.ones((4, 3)), bad], [np.ones((4, 3)), np.ones((4, 2))]):
        with pytest.raises(ValueError):
            s.fit(batches)
        for k, v in s.state_dict().items():
            assert torch.equal(v, before[k]), k


def test_empty_batches_raise_like_sklearn() -> None:
    with pytest.raises(ValueError, match="0 sample"):
        StandardScaler().partial_fit(np.empty((0, 3)))  # the behaviour matched
    msg = r"got an empty batch \(shape \(0, 3\)\): it has no samples to fit"
    s = Standardizer()
    with pytest.raises(ValueError, match=msg):
        s.partial_fit(np.empty((0, 3)))
    with pytest.raises(ValueError, match=msg):
        s.fit([np.empty((0, 3)), np.empty((0, 3))])
    with pytest.raises(ValueError, match=r"empty batch \(shape \(2, 3, 0\)\)"):
        s.fit(torch.empty(2, 3, 0))
    with pytest.raises(ValueError, match=r"fit\(\) got no batches"):
        s.fit([])
    assert not s.is_fitted
    s.fit(np.ones((2, 3)))
    with pytest.raises(ValueError, match=msg):
        s.partial_fit(np.empty((0, 3)))
    assert s.n_samples_seen_.tolist() == [2, 2, 2]


def test_all_nan_feature_gives_nan_statistics_like_sklearn() -> None:
    x = np.array([[1.0, np.nan, 3.0], [2.0, np.nan, 3.0], [4.0, np.nan, 5.0]])
    ref = StandardScaler().fit(x)  # mean, var and scale NaN, n_samples_seen_ 0
    with pytest.warns(RuntimeWarning, match=r"feature\(s\) \[1\] have only NaN values so far"):
        s = Standardizer(nan_policy="ignore").fit(x)
    for name in ("mean_", "var_", "scale_"):
        np.testing.assert_allclose(getattr(s, name).numpy(), getattr(ref, name), equal_nan=True)
    np.testing.assert_array_equal(s.n_samples_seen_.numpy(), ref.n_samples_seen_)
    np.testing.assert_allclose(
        s.transform(torch.from_numpy(x)).numpy(), ref.transform(x), equal_nan=True
    )
    # values arriving later give the statistics of the values seen (sklearn keeps its NaN mean)
    more = np.array([[1.0, 5.0, 1.0], [2.0, 7.0, 1.0]])
    s.partial_fit(more)
    both = np.concatenate([x, more])
    np.testing.assert_allclose(s.mean_.numpy(), np.nanmean(both, 0), rtol=1e-14)
    np.testing.assert_allclose(s.var_.numpy(), np.nanvar(both, 0), rtol=1e-14)
    assert s.n_samples_seen_.tolist() == [5, 2, 5]


def test_eps_is_validated_and_replaces_the_rule() -> None:
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"eps must be a finite number >= 0 \(or None"):
            Standardizer(eps=bad)
    x = np.array([[0.0, 0.0], [1.0, 10.0]])  # variances 0.25 and 25
    s = Standardizer(eps=1.0).fit(x)
    assert s.scale_.tolist() == [1.0, 5.0]


@pytest.mark.parametrize(
    "convert",
    [
        lambda m: m.half(),
        lambda m: m.to(torch.float16),
        lambda m: m.bfloat16(),
        lambda m: m.float(),
        lambda m: m.to("cpu", torch.float16),
    ],
)
def test_module_dtype_conversion_keeps_float64_statistics(convert) -> None:
    x = np.random.default_rng(5).normal(7e4, 3.0, size=(100, 2))
    s = Standardizer().fit(x)
    expected = {k: v.clone() for k, v in s.state_dict().items()}
    model = convert(torch.nn.Sequential(s))
    for k, v in model[0].state_dict().items():
        assert v.dtype == torch.float64 and torch.equal(v, expected[k]), k
    h = torch.tensor([[6.5e4, 6.0e4]], dtype=torch.float16)  # 7e4 itself is inf in float16
    want = ((h.double() - expected["mean_"]) / expected["scale_"]).half()
    torch.testing.assert_close(model(h), want)
    assert model(h).dtype == torch.float16


def test_state_dict_round_trips_to_float64_precision() -> None:
    x = 1.7e9 + np.random.default_rng(6).normal(size=(64, 3)) * 1e-3
    fitted = Standardizer().fit(x)
    fresh = Standardizer().half()  # even into a converted module
    fresh.load_state_dict(fitted.state_dict())
    for k, v in fitted.state_dict().items():
        assert fresh.state_dict()[k].dtype == torch.float64
        assert torch.equal(fresh.state_dict()[k], v), k
    assert torch.equal(fresh(torch.from_numpy(x)), fitted(torch.from_numpy(x)))
    # loading continues the stream exactly as the original would
    more = np.random.default_rng(7).normal(size=(10, 3))
    assert torch.equal(fresh.partial_fit(more).var_, fitted.partial_fit(more).var_)
    state = fitted.state_dict()
    state["var_"] = state["var_"][:2]
    with pytest.raises(RuntimeError, match="Standardizer statistics must be 1-D of one length"):
        Standardizer().load_state_dict(state)


@pytest.mark.parametrize("with_mean", [True, False])
@pytest.mark.parametrize("with_std", [True, False])
@pytest.mark.parametrize("nan", [False, True])
def test_to_sklearn_can_partial_fit_further(with_mean: bool, with_std: bool, nan: bool) -> None:
    rng = np.random.default_rng(8)
    a, b = rng.normal(3, 2, size=(40, 3)), rng.normal(3, 2, size=(30, 3))
    if nan:
        a[[1, 5], 2] = np.nan
    ours = Standardizer(with_mean=with_mean, with_std=with_std, nan_policy="ignore").fit(a)
    scaler = ours.to_sklearn()
    alone = StandardScaler(with_mean=with_mean, with_std=with_std).fit(a)
    assert type(scaler.n_samples_seen_) is type(alone.n_samples_seen_)
    assert np.asarray(scaler.n_samples_seen_).dtype == np.asarray(alone.n_samples_seen_).dtype
    scaler.partial_fit(b)
    ref = StandardScaler(with_mean=with_mean, with_std=with_std).fit(np.concatenate([a, b]))
    for name in ("mean_", "var_", "scale_"):
        got, want = getattr(scaler, name), getattr(ref, name)
        assert (got is None) == (want is None), name
        if want is not None:
            np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_array_equal(scaler.n_samples_seen_, ref.n_samples_seen_)
    assert type(scaler.n_samples_seen_) is type(ref.n_samples_seen_)
    np.testing.assert_allclose(scaler.transform(b), ref.transform(b), rtol=1e-12)


def test_from_sklearn_checks_and_keeps_what_sklearn_computed() -> None:
    with pytest.raises(ValueError, match=r"the StandardScaler is not fitted: call its fit\(\)"):
        Standardizer.from_sklearn(StandardScaler())
    x = np.random.default_rng(9).normal(2, 3, size=(20, 2))
    ref = StandardScaler(with_std=False).fit(x)
    s = Standardizer.from_sklearn(ref)
    assert torch.isnan(s.var_).all()  # not computed by scikit-learn: unknown, not invented
    np.testing.assert_allclose(s(torch.from_numpy(x)).numpy(), ref.transform(x), rtol=1e-12)
    assert s.to_sklearn().var_ is None
    ref.mean_[0] = 99.0  # no memory shared with the scaler
    assert s.mean_[0] != 99.0


finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    data=arrays(np.float64, st.tuples(st.integers(2, 40), st.integers(1, 4)), elements=finite),
    offset=st.sampled_from([0.0, 1e3, 1.7e9]),
    holes=st.lists(st.tuples(st.integers(0, 39), st.integers(0, 3)), max_size=12),
    cuts=st.lists(st.integers(1, 39), max_size=5),
    as_torch=st.booleans(),
)
def test_streaming_any_split_equals_one_shot_and_sklearn(
    data: np.ndarray, offset: float, holes: list[tuple[int, int]], cuts: list[int], as_torch: bool
) -> None:
    x = data + offset
    for i, j in holes:  # NaNs anywhere, a whole column included
        if i < x.shape[0] and j < x.shape[1]:
            x[i, j] = np.nan
    bounds = sorted({0, len(x), *(c for c in cuts if c < len(x))})
    parts = [x[a:b] for a, b in itertools.pairwise(bounds)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns warn (sklearn too)
        split = Standardizer(nan_policy="ignore").fit(
            [torch.from_numpy(p) for p in parts] if as_torch else parts
        )
        one = Standardizer(nan_policy="ignore").fit(x)
        ref = StandardScaler().fit(x)
    seen = np.broadcast_to(ref.n_samples_seen_, (x.shape[1],))
    np.testing.assert_array_equal(split.n_samples_seen_.numpy(), seen)
    np.testing.assert_array_equal(one.n_samples_seen_.numpy(), seen)
    spread = float(np.nanmax(np.abs(data))) if np.isfinite(x).any() else 0.0
    ulp = np.spacing(offset + spread)  # the data's own rounding at its magnitude
    for s in (split, one):
        np.testing.assert_allclose(
            s.mean_.numpy(), ref.mean_, rtol=1e-12, atol=64 * ulp, equal_nan=True
        )
        np.testing.assert_allclose(
            s.var_.numpy(),
            ref.var_,
            rtol=1e-9,
            atol=1e-9 * spread**2 + 64 * len(x) * ulp * (spread + 1.0),
            equal_nan=True,
        )
        # the constant-feature rule agrees wherever it is not decided by rounding
        bound = seen * np.finfo(np.float64).eps * ref.var_ + (seen * ref.mean_ * 2.0**-52) ** 2
        clear = np.abs(ref.var_ - bound) > 0.5 * bound + 1e-9 * spread**2
        np.testing.assert_array_equal((s.scale_.numpy() == 1.0)[clear], (ref.scale_ == 1.0)[clear])


# --- the fast CPU path and the module's caches ----------------------------------------------------
@pytest.mark.parametrize("mu", [0.0, 3.9, 4.1, 100.0, 1e8])
@pytest.mark.parametrize("shape", [(1000, 8), (64, 3, 32, 32)])
def test_one_read_and_two_pass_variance_are_both_accurate(mu: float, shape: tuple) -> None:
    # |mean| <= 4 std takes the one-read formula, beyond it two passes: both near float64 exact
    x = np.random.default_rng(10).normal(mu, 1.0, size=shape)
    s = Standardizer().fit(x)
    axes = tuple(d for d in range(x.ndim) if d != 1)
    exact = np.var(x.astype(np.longdouble), axis=axes).astype(np.float64)
    np.testing.assert_allclose(s.var_.numpy(), exact, rtol=1e-11)
    np.testing.assert_allclose(s.mean_.numpy(), x.mean(axes), rtol=1e-13, atol=1e-13)


def test_float32_and_other_dtypes_accumulate_in_float64() -> None:
    x32 = (1e4 + torch.randn(500, 3, generator=torch.Generator().manual_seed(0))).float()
    exact = x32.double()
    s = Standardizer().fit(x32)
    torch.testing.assert_close(s.mean_, exact.mean(0), rtol=1e-13, atol=0)
    torch.testing.assert_close(s.var_, exact.var(0, correction=0), rtol=1e-10, atol=0)
    for x in (x32.half(), x32.bfloat16(), x32.round().int(), x32.numpy().astype(np.float16)):
        got = Standardizer().fit(x)
        ref = torch.as_tensor(np.asarray(x if isinstance(x, np.ndarray) else x.double())).double()
        torch.testing.assert_close(got.mean_, ref.mean(0), rtol=1e-13, atol=0)
    with pytest.raises(TypeError, match=r"expected real numbers, got a torch\.complex64 tensor"):
        Standardizer().fit(torch.ones(2, 2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="expected real numbers, got a <U1 array"):
        Standardizer().fit(np.array([["a", "b"]]))


def test_nan_skipping_per_channel_on_images_and_channels_last() -> None:
    rng = np.random.default_rng(11)
    x = rng.normal(2, 3, size=(6, 3, 4, 5))
    x[0, 1, 2, 3] = x[4, 1, 0, 0] = x[5, 2, 1, 1] = np.nan
    s = Standardizer(nan_policy="ignore").fit([x[:2], x[2:]])
    flat = np.moveaxis(x, 1, -1).reshape(-1, 3)
    np.testing.assert_allclose(s.mean_.numpy(), np.nanmean(flat, 0), rtol=1e-13)
    np.testing.assert_allclose(s.var_.numpy(), np.nanvar(flat, 0), rtol=1e-12)
    assert s.n_samples_seen_.tolist() == [120, 118, 119]
    last = Standardizer(channel_axis=-1, nan_policy="ignore").fit(np.moveaxis(x, 1, -1))
    torch.testing.assert_close(last.var_, s.var_, rtol=1e-13, atol=0)


def test_device_path_statistics_agree_with_the_cpu_path() -> None:
    # tensors off the CPU go through functional.batch_norm_stats: check its wrapper here on CPU
    from normlab.preprocessing._standardizer import _numpy_moments, _torch_moments

    x = np.random.default_rng(12).normal(5, 2, size=(7, 3, 4))
    x[:, 2] = np.nan  # an all-NaN channel
    x[1, 0, 1] = np.nan
    a = _numpy_moments(x, 1, "ignore", far=False)
    b = _torch_moments(torch.from_numpy(x), 1, "ignore", torch.float64)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-13, equal_nan=True)
    np.testing.assert_allclose(a.var, b.var, rtol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(a.counts(), b.counts())
    with pytest.raises(
        ValueError, match=r"input contains 1 NaN value\(s\), the first at index \(1, 0, 1\)"
    ):
        _torch_moments(torch.from_numpy(x[:, :2]), 1, "raise", torch.float64)


def test_overflowing_statistics_raise() -> None:
    with pytest.raises(ValueError, match=r"feature\(s\) \[1\] overflow float64"):
        Standardizer().fit(np.array([[1.0, 1e300], [2.0, -1e300]]))
    with pytest.raises(ValueError, match=r"feature\(s\) \[0\] overflow float64"):
        Standardizer().fit(np.array([[1.7e308], [1.7e308]]))


def test_transform_follows_every_change_of_the_statistics() -> None:
    x = torch.randn(32, 3, dtype=torch.float64)
    s = Standardizer().fit(x)
    first = s(x)
    s.partial_fit(x * 10 + 5)  # the buffers change in place
    torch.testing.assert_close(s(x), (x - s.mean_) / s.scale_)
    assert not torch.allclose(s(x), first)
    s.mean_.fill_(1.0)  # a user's in-place edit is seen by transform and by the next fit
    torch.testing.assert_close(s(x), (x - 1.0) / s.scale_)
    n = s.n_samples_seen_[0].item()
    s.partial_fit(torch.ones(int(n), 3, dtype=torch.float64))
    torch.testing.assert_close(s.mean_, torch.ones(3, dtype=torch.float64))
    s.scale_ = torch.full((3,), 2.0, dtype=torch.float64)  # replaced outright
    torch.testing.assert_close(s(x), (x - 1.0) / 2.0)


def test_gradient_is_not_changed_by_a_fit_between_forward_and_backward() -> None:
    x = torch.randn(16, 2, dtype=torch.float64, requires_grad=True)
    s = Standardizer().fit(x.detach() * 3)
    scale = s.scale_.clone()
    y = s(x)
    s.partial_fit(x.detach() * 100)  # statistics updated in place while y's graph is alive
    y.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, (1 / scale).expand(16, 2))


def test_copies_are_independent() -> None:
    import copy
    import pickle

    s = Standardizer().fit(np.random.default_rng(13).normal(size=(20, 2)))
    before = s.mean_.clone()
    for other in (copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        other.partial_fit(np.full((20, 2), 50.0))
        assert torch.equal(s.mean_, before)
        assert other.mean_[0] > 20


def test_constructor_arguments_are_validated() -> None:
    with pytest.raises(TypeError, match="channel_axis must be an int, got True"):
        Standardizer(channel_axis=True)
    with pytest.raises(ValueError, match="channel_axis=2 is out of range for a 2D input"):
        Standardizer(channel_axis=2).fit(np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"got an empty tuple as a batch"):
        Standardizer().fit([()])
    with pytest.raises(TypeError, match=r"expected a dense tensor, got layout torch\.sparse_coo"):
        Standardizer().fit(torch.eye(3).to_sparse())
    s = Standardizer()
    with pytest.raises(TypeError, match=r"fit_transform\(\) takes one tensor or array, got list"):
        s.fit_transform([np.ones((2, 2))])
    assert not s.is_fitted


def test_share_memory_and_data_swaps_do_not_leave_stale_statistics() -> None:
    x = np.random.default_rng(14).normal(size=(10, 2))
    s = Standardizer().fit(x)
    s.share_memory()  # moves the buffers' storage under the same tensor objects
    s.partial_fit(x + 100)
    ref = Standardizer().fit(np.concatenate([x, x + 100]))
    torch.testing.assert_close(s.mean_, ref.mean_, rtol=1e-14, atol=0)
    s.mean_.data = torch.zeros(2, dtype=torch.float64)  # swapped storage, no version bump
    s.partial_fit(np.zeros((20, 2)))
    torch.testing.assert_close(s.mean_, torch.zeros(2, dtype=torch.float64))


def test_transform_checks_every_call_even_with_cached_statistics() -> None:
    s = Standardizer().fit(torch.randn(10, 4))
    s(torch.randn(3, 4))  # caches the float32 statistics
    with pytest.raises(ValueError, match=r"expected 4 features/channels on axis 1, got 1"):
        s(torch.randn(3, 1))  # would broadcast silently without the check
    s.channel_axis = 0
    with pytest.raises(ValueError, match=r"expected 4 features/channels on axis 0, got 3"):
        s(torch.randn(3, 4))
    assert s(torch.randn(4, 7)).shape == (4, 7)
