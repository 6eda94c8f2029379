"""fold_batchnorm folding a BatchNorm into the layer *after* it (pytorch/pytorch#144403):
outputs equal to the eval model's, and the reasons where that is not exact."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import normlab.nn as nlnn
from normlab.nn.utils import fold_batchnorm, fold_bn_conv_weights, is_batchnorm

from .test_fold_batchnorm import randomize

TOL = {"rtol": 1e-5, "atol": 1e-5}


class _Untraceable(nn.Module):
    """Wraps a Sequential behind data-dependent control flow: the Sequential matching path."""

    def __init__(self, seq: nn.Sequential) -> None:
        super().__init__()
        self.seq = seq

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 1e9:
            return x
        return self.seq(x)


def _check(model: nn.Module, x: Tensor):
    model = randomize(model).eval()
    with torch.no_grad():
        expected = model(x)
        folded, report = fold_batchnorm(model)
        torch.testing.assert_close(folded(x), expected, **TOL)
    return folded, report


PAIRS = {
    "bn1d_linear": (nn.BatchNorm1d(5), nn.Linear(5, 3), (4, 5)),
    "bn1d_last_linear": (nlnn.BatchNorm1d(5, channel_axis=-1), nn.Linear(5, 3), (4, 7, 5)),
    "bn2d_conv_valid": (nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, stride=2, dilation=2), (2, 4, 9, 9)),
    "bn2d_conv_groups": (
        nlnn.BatchNorm2d(4),
        nn.Conv2d(4, 6, 3, groups=2, bias=False),
        (2, 4, 6, 6),
    ),
    "reflect": (
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 5, 3, padding=1, padding_mode="reflect"),
        (2, 4, 6, 6),
    ),
    "replicate": (
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 5, 3, padding=2, padding_mode="replicate"),
        (2, 4, 6, 6),
    ),
    "circular": (
        nn.BatchNorm1d(6),
        nn.Conv1d(6, 3, 3, padding=1, padding_mode="circular", groups=3),
        (2, 6, 8),
    ),
    "bn3d_conv": (nn.BatchNorm3d(3), nn.Conv3d(3, 2, 2), (2, 3, 4, 4, 4)),
    "frozen": (nlnn.FrozenBatchNorm2d(4), nn.Conv2d(4, 2, 1), (2, 4, 3, 3)),
}


@pytest.mark.parametrize("traced", [True, False], ids=["fx", "sequential"])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_batchnorm_folds_into_the_layer_after_it(pair: str, traced: bool) -> None:
    bn, layer, shape = PAIRS[pair]
    seq = nn.Sequential(bn, layer)
    model = seq if traced else _Untraceable(seq)
    folded, report = _check(model, torch.randn(shape))
    prefix = "" if traced else "seq."
    assert report.method == ("fx" if traced else "sequential")
    assert report.folded == [(prefix + "1", prefix + "0")]
    assert report.direction == {prefix + "0": "next"}
    assert "(the layer after)" in str(report)
    assert not any(is_batchnorm(m) for m in folded.modules())


@pytest.mark.parametrize("traced", [True, False], ids=["fx", "sequential"])
@pytest.mark.parametrize(
    ("bn", "layer", "reason"),
    [
        (
            nn.BatchNorm2d(4),
            nn.Conv2d(4, 4, 3, padding=1),
            "pads with zeros (padding=(1, 1)): folding into it is exact only with padding=0",
        ),
        (
            nn.BatchNorm2d(4),
            nn.Conv2d(4, 4, 3, padding="same"),
            "pads with zeros (padding=same)",
        ),
        (nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 4, 3), "ConvTranspose2d after it is not exact"),
        (nn.BatchNorm2d(4), nn.Linear(4, 2), "only a BatchNorm1d over (N, C) or channel-last"),
        (nn.BatchNorm1d(4), nn.Linear(5, 2), "the layer after it has 5 input channels"),
        (nlnn.BatchNormAct2d(4), nn.Conv2d(4, 2, 1), "not the affine map of its running"),
        (nlnn.BatchNorm1d(4, channel_axis=-1), nn.Conv1d(4, 2, 1), "channel_axis=-1 is not"),
    ],
)
def test_inexact_folds_are_kept_with_the_reason(bn, layer, reason: str, traced: bool) -> None:
    seq = nn.Sequential(bn, layer)
    model = seq if traced else _Untraceable(seq)
    if isinstance(bn, nn.BatchNorm2d):  # (a Linear after it reads the last axis, W = 4)
        shape: tuple[int, ...] = (2, 4, 5, 4)
    elif isinstance(layer, nn.Linear):  # (N, C, L): the Linear reads L = 5
        shape = (2, 4, 5)
    else:
        shape = (2, 4, 4) if getattr(bn, "channel_axis", 1) == -1 else (2, 4, 5, 5)
    _folded, report = _check(model, torch.randn(shape))
    assert report.folded == []
    ((path, text),) = report.skipped
    assert reason in text, text
    if traced:  # both directions' reasons: nothing feeds it, and why not the layer after it
        assert text.startswith(
            "its input is not the output of a Conv/ConvTranspose/Linear module; "
            "nor into the layer after it (1): "
        ), text
    else:  # the Sequential path tries only the neighbour there is
        assert "nor into" not in text and path == "seq.0"


@pytest.mark.parametrize("traced", [True, False], ids=["fx", "sequential"])
def test_the_layer_before_is_preferred_and_folds_compose(traced: bool) -> None:
    """conv → BN → conv folds into the first conv; BN → conv → BN → BN folds the first BN
    into the conv after it, then the second into that same (already folded) conv."""
    seq = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 3),
        nn.ReLU(),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 5, 1),
        nn.BatchNorm2d(5),
        nn.BatchNorm2d(5),
    )
    model = seq if traced else _Untraceable(seq)
    _folded, report = _check(model, torch.randn(2, 3, 7, 7))
    p = "" if traced else "seq."
    assert report.direction[p + "1"] == "previous" and report.direction[p + "4"] == "next"
    assert report.direction[p + "6"] == "previous"
    assert (p + "5", p + "4") in report.folded and (p + "5", p + "6") in report.folded
    kept = dict(report.skipped)
    if traced:  # fx sees the folded conv feeding the last BN too
        assert report.direction["7"] == "previous" and not kept
    else:
        assert p + "7" in kept


def test_split_layer_folds_as_its_first_split_and_its_auxiliaries_go_with_it() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nlnn.SplitBatchNorm2d(4, num_splits=3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    _folded, report = _check(model, torch.randn(2, 3, 3, 3))
    assert report.folded == [("0", "1")] and report.skipped == []


@settings(max_examples=40, deadline=None)
@given(
    groups=st.sampled_from([1, 2, 3]),
    per_group_in=st.integers(1, 3),
    per_group_out=st.integers(1, 3),
    kernel=st.integers(1, 3),
    with_bias=st.booleans(),
    affine=st.booleans(),
)
def test_fold_bn_conv_weights_is_the_composition(
    groups: int, per_group_in: int, per_group_out: int, kernel: int, with_bias: bool, affine: bool
) -> None:
    """Oracle: the convolution of the batch norm's output, with torch's functional ops."""
    gen = torch.Generator().manual_seed(groups * 100 + per_group_in * 10 + kernel)
    c_in, c_out = groups * per_group_in, groups * per_group_out
    w = torch.randn(c_out, per_group_in, kernel, kernel, generator=gen, dtype=torch.float64)
    b = torch.randn(c_out, generator=gen, dtype=torch.float64) if with_bias else None
    rm = torch.randn(c_in, generator=gen, dtype=torch.float64)
    rv = torch.rand(c_in, generator=gen, dtype=torch.float64) + 0.1
    gamma = torch.randn(c_in, generator=gen, dtype=torch.float64) if affine else None
    beta = torch.randn(c_in, generator=gen, dtype=torch.float64) if affine else None
    x = torch.randn(2, c_in, 5, 5, generator=gen, dtype=torch.float64)
    normalized = nn.functional.batch_norm(x, rm, rv, gamma, beta, False, 0.0, 1e-3)
    expected = nn.functional.conv2d(normalized, w, b, groups=groups)
    new_w, new_b = fold_bn_conv_weights(w, b, rm, rv, 1e-3, gamma, beta, groups=groups)
    torch.testing.assert_close(nn.functional.conv2d(x, new_w, new_b, groups=groups), expected)


def test_fold_bn_conv_weights_errors() -> None:
    w, stats = torch.randn(4, 3), (torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match=r"weight \(4, 3\) with groups=1 does not read 5 input"):
        fold_bn_conv_weights(w, None, torch.zeros(5), torch.ones(5), 1e-5)
    with pytest.raises(ValueError, match=r"b must have shape \(4,\), got \(3,\)"):
        fold_bn_conv_weights(w, torch.zeros(3), *stats, 1e-5)
    with pytest.raises(ValueError, match=r"gamma must have shape \(3,\), got \(4,\)"):
        fold_bn_conv_weights(w, None, *stats, 1e-5, torch.ones(4))
    with pytest.raises(ValueError, match="groups must be a positive integer, got 0"):
        fold_bn_conv_weights(w, None, *stats, 1e-5, groups=0)
    with pytest.raises(ValueError, match="must be 1-D tensors of the same length"):
        fold_bn_conv_weights(w, None, torch.zeros(3), torch.ones(4), 1e-5)
