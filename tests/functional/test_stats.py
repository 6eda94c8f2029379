"""batch_norm_stats and merge_stats: exact, stable statistics (float64 two-pass is the oracle)."""

from __future__ import annotations

import itertools

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays

from normlab.functional import batch_norm_stats, merge_stats


def _two_pass(x: torch.Tensor, channel_axis: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    xd = x.double().movedim(channel_axis, 0).reshape(x.shape[channel_axis], -1)
    mean = xd.mean(1)
    return mean, ((xd - mean[:, None]) ** 2).mean(1)


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 7), (2, 3, 5, 4), (2, 3, 2, 3, 2)])
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_stats_match_two_pass(shape: tuple[int, ...], channel_axis: int) -> None:
    x = torch.randn(shape, dtype=torch.float64) * 3 + 2
    mean, var, count = batch_norm_stats(x, channel_axis=channel_axis)
    m, v = _two_pass(x, channel_axis)
    torch.testing.assert_close(mean, m)
    torch.testing.assert_close(var, v)
    assert torch.equal(count, torch.full_like(count, x.numel() // x.shape[channel_axis]))


def test_large_offset_is_stable_in_float32() -> None:
    x = (torch.randn(4096, 2, dtype=torch.float64) + 1e4).float()
    _, var, _ = batch_norm_stats(x)
    _, ref = _two_pass(x)
    torch.testing.assert_close(var.double(), ref, rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_float32(dtype: torch.dtype) -> None:
    x = (torch.randn(512, 4) * 2 + 30).to(dtype)
    mean, var, count = batch_norm_stats(x)
    assert mean.dtype == var.dtype == count.dtype == torch.float32
    m, v = _two_pass(x.float())
    torch.testing.assert_close(mean.double(), m, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), v, rtol=1e-5, atol=1e-5)
    mean64, _, _ = batch_norm_stats(x, dtype=torch.float64)
    assert mean64.dtype == torch.float64


def test_mask_ignores_invalid_positions_even_nan() -> None:
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    x = x.masked_fill(~mask[:, None], float("nan"))
    mean, var, count = batch_norm_stats(x, mask=mask)
    valid = torch.stack([x[:, c][mask] for c in range(2)])  # (C, n)
    torch.testing.assert_close(mean, valid.mean(1))
    torch.testing.assert_close(var, valid.var(1, correction=0))
    assert torch.equal(count, torch.full((2,), 9.0, dtype=torch.float64))


def test_errors() -> None:
    x = torch.randn(3, 2, 5)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        batch_norm_stats(x, mask=torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"expected \(3, 5\), got \(3, 2\)"):
        batch_norm_stats(x, mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="channel_axis=3 is out of range for a 3D input"):
        batch_norm_stats(x, channel_axis=3)
    with pytest.raises(TypeError, match="batch statistics need a floating-point input"):
        batch_norm_stats(torch.ones(3, 2, dtype=torch.int64))


def test_empty_input_gives_zero_count() -> None:
    mean, var, count = batch_norm_stats(torch.randn(0, 3))
    assert count.tolist() == [0, 0, 0] and mean.tolist() == [0, 0, 0] and var.tolist() == [0, 0, 0]


@settings(max_examples=60, deadline=None)
@given(
    data=arrays(
        np.float64,
        st.tuples(st.integers(1, 40), st.integers(1, 3)),
        elements=st.floats(-1e6, 1e6, allow_nan=False),
    ),
    cuts=st.lists(st.integers(0, 40), max_size=5),
)
def test_any_split_merges_to_one_shot(data: np.ndarray, cuts: list[int]) -> None:
    x = torch.from_numpy(data)
    bounds = sorted({0, x.shape[0], *(c for c in cuts if c <= x.shape[0])})
    c = x.shape[1]
    acc = (
        torch.zeros(c, dtype=x.dtype),
        torch.zeros(c, dtype=x.dtype),
        torch.zeros(c, dtype=x.dtype),
    )
    for lo, hi in itertools.pairwise(bounds):
        acc = merge_stats(*acc, *batch_norm_stats(x[lo:hi]))
    mean, var, count = batch_norm_stats(x)
    scale = float(x.abs().max()) + 1.0
    torch.testing.assert_close(acc[0], mean, rtol=1e-9, atol=1e-9 * scale)
    torch.testing.assert_close(acc[1], var, rtol=1e-8, atol=1e-8 * scale**2)
    assert torch.equal(acc[2], count)


def test_merge_with_empty_side_is_identity_even_with_garbage() -> None:
    m, v, n = torch.tensor([1.5]), torch.tensor([2.0]), torch.tensor([4.0])
    nan = torch.tensor([float("nan")])
    out = merge_stats(m, v, n, nan, nan, torch.tensor([0.0]))
    assert [t.item() for t in out] == [1.5, 2.0, 4.0]
    out = merge_stats(nan, nan, torch.tensor([0.0]), m, v, n)
    assert [t.item() for t in out] == [1.5, 2.0, 4.0]
