"""fold_batchnorm / fold_conv_bn_weights: equal outputs to the eval model, torch's fuse as oracle."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

import normlab.nn as nlnn
from normlab.nn.utils import FoldReport, fold_batchnorm, fold_conv_bn_weights, is_batchnorm

TOL = {"rtol": 1e-5, "atol": 1e-5}


class FrozenBatchNorm2d(nn.Module):
    """Stand-in with detectron2 semantics: buffers only, float eps, not a ``_BatchNorm``."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class BNReLU2d(nlnn.BatchNorm2d):
    """A BatchNormAct-like layer: folding it would drop the activation."""

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        return torch.relu(super().forward(input, mask))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters in every BatchNorm."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not is_batchnorm(m):
                continue
            c = m.num_features if hasattr(m, "num_features") else m.running_mean.numel()
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.2)
            if isinstance(getattr(m, "weight", None), Tensor):
                m.weight.copy_(torch.randn(c, generator=gen))
                m.bias.copy_(torch.randn(c, generator=gen))
    return model


class BasicBlock(nn.Module):
    """ResNet basic block: two conv-BN pairs and a (conv-BN) shortcut branch."""

    def __init__(self, c_in: int, c_out: int, stride: int, bn: type[nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = bn(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.bn2 = bn(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), bn(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetish(nn.Module):
    def __init__(self, bn: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = bn(8)
        self.layer1 = BasicBlock(8, 8, 1, bn)
        self.layer2 = BasicBlock(8, 16, 2, bn)
        self.head = nn.Linear(16, 5)
        self.head_bn = nn.BatchNorm1d(5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.head_bn(self.head(x.mean((2, 3))))


def vggish() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nlnn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
        nlnn.BatchNorm1d(10),
    )


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Sequential(nn.Conv2d(8, 8, 1), nlnn.BatchNorm2d(8)),
        )
        self.conv = nn.Conv2d(8, 4, 1)
        self.bn = nn.BatchNorm2d(4)  # not inside a Sequential: cannot be matched without fx

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        if x.sum() > 0:
            x = x * 2
        return self.bn(self.conv(x))


def _check_equal(model: nn.Module, x: Tensor) -> tuple[nn.Module, FoldReport]:
    model = randomize(model).eval()
    before = copy.deepcopy(model.state_dict())
    folded, report = fold_batchnorm(model)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL)
    for k, v in model.state_dict().items():  # original untouched
        assert torch.equal(v, before[k]), k
    assert not folded.training
    return folded, report


def test_resnet_with_branches_folds_every_pair_and_matches() -> None:
    folded, report = _check_equal(ResNetish(), torch.randn(4, 3, 8, 8))
    assert isinstance(folded, fx.GraphModule)
    assert report.method == "fx" and report.skipped == []
    assert sorted(bn for _, bn in report.folded) == sorted(
        [
            "stem_bn",
            "layer1.bn1",
            "layer1.bn2",
            "layer2.bn1",
            "layer2.bn2",
            "layer2.shortcut.1",
            "head_bn",
        ]
    )
    assert not any(is_batchnorm(m) for m in folded.modules())
    names = dict(folded.named_parameters())
    assert "layer2.conv1.weight" in names and "layer2.conv1.bias" in names  # names kept


def test_vgg_with_normlab_and_torch_batchnorm() -> None:
    _, report = _check_equal(vggish(), torch.randn(3, 3, 8, 8))
    assert [layer for layer, _ in report.folded] == ["0", "4", "8"]


def test_frozen_batchnorm_stand_in_folds() -> None:
    model = ResNetish(bn=FrozenBatchNorm2d)
    _, report = _check_equal(model, torch.randn(2, 3, 8, 8))
    assert "layer2.shortcut.1" in [bn for _, bn in report.folded]


@pytest.mark.parametrize(
    ("layer", "bn", "shape"),
    [
        (nn.Conv1d(4, 6, 3, groups=2), nn.BatchNorm1d(6), (2, 4, 9)),
        (nn.Conv3d(2, 4, 3, padding=1), nlnn.BatchNorm3d(4), (2, 2, 4, 4, 4)),
        (nn.ConvTranspose1d(4, 6, 3, stride=2), nn.BatchNorm1d(6), (2, 4, 5)),
        (
            nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, bias=False),
            nlnn.BatchNorm2d(6),
            (2, 4, 5, 5),
        ),
        (nn.ConvTranspose3d(6, 9, 2, groups=3), nn.BatchNorm3d(9), (2, 6, 3, 3, 3)),
        (nn.Linear(7, 5), nn.BatchNorm1d(5, affine=False), (3, 7)),
    ],
)
def test_every_layer_kind(layer: nn.Module, bn: nn.Module, shape: tuple[int, ...]) -> None:
    _, report = _check_equal(nn.Sequential(layer, bn), torch.randn(shape))
    assert report.folded == [("0", "1")]


def test_untraceable_model_falls_back_to_sequential_matching() -> None:
    folded, report = _check_equal(Untraceable(), torch.randn(2, 3, 6, 6))
    assert report.method == "sequential" and report.trace_error
    assert type(folded) is Untraceable
    assert report.folded == [("features.0", "features.1"), ("features.3.0", "features.3.1")]
    assert report.skipped == [
        ("bn", "not directly after or before a Conv/Linear inside an nn.Sequential")
    ]
    assert isinstance(folded.features[1], nn.Identity)


def test_inplace_fallback_modifies_the_model_itself() -> None:
    model = randomize(Untraceable()).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    folded, _ = fold_batchnorm(model, inplace=True)
    assert folded is model and isinstance(model.features[1], nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, **TOL)


def test_inplace_fx_keeps_the_original_working() -> None:
    model = randomize(ResNetish()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        folded, _ = fold_batchnorm(model, inplace=True)
        torch.testing.assert_close(folded(x), expected, **TOL)
        torch.testing.assert_close(model(x), expected, **TOL)


class Reasons(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_shared_out = nn.Conv2d(3, 4, 1)
        self.bn_shared_out = nn.BatchNorm2d(4)
        self.conv_nostats = nn.Conv2d(4, 4, 1)
        self.bn_nostats = nn.BatchNorm2d(4, track_running_stats=False)
        self.conv_act = nn.Conv2d(4, 4, 1)
        self.bn_act = BNReLU2d(4)
        self.bn_after_relu = nn.BatchNorm2d(4)
        self.unused_bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv_shared_out(x)
        x = self.bn_shared_out(y) + y
        x = self.bn_nostats(self.conv_nostats(x))
        x = self.bn_act(self.conv_act(x))
        return self.bn_after_relu(torch.relu(x))


def test_report_says_why_each_batchnorm_was_kept() -> None:
    _, report = _check_equal(Reasons(), torch.randn(3, 3, 5, 5))
    reasons = dict(report.skipped)
    assert report.folded == []
    assert reasons["bn_shared_out"] == "the output of conv_shared_out has other users"
    assert reasons["bn_nostats"].startswith("no running statistics (track_running_stats=False)")
    assert reasons["bn_act"].startswith("its eval forward is not the affine map")
    assert (
        reasons["bn_after_relu"]
        == "its input is not the output of a Conv/ConvTranspose/Linear module"
    )
    assert reasons["unused_bn"] == "not called by the traced forward"
    text = str(report)
    assert "fold_batchnorm (fx): 0 folded, 5 kept" in text and "bn_act" in text


def test_custom_forward_and_hooks_are_not_folded() -> None:
    class StdConv(nn.Conv2d):  # weight standardization: a different function
        def forward(self, x: Tensor) -> Tensor:
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / self.weight.std()
            return self._conv_forward(x, w, self.bias)

    hooked = nn.Conv2d(4, 4, 1)
    hooked.register_forward_hook(lambda m, a, o: o * 2)
    model = nn.Sequential(StdConv(3, 4, 1), nn.BatchNorm2d(4), hooked, nn.BatchNorm2d(4))
    _, report = _check_equal(model, torch.randn(2, 3, 4, 4))
    reasons = dict(report.skipped)
    assert reasons["1"] == (
        "its input is not the output of a Conv/ConvTranspose/Linear module; nor into the layer "
        "after it (2): the layer or the BatchNorm has hooks"
    )
    assert reasons["3"] == "the layer or the BatchNorm has hooks"


def test_channel_mismatch_and_channels_last_axis_reasons() -> None:
    class Mismatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv1d(3, 4, 1),
                nlnn.BatchNorm1d(4, channel_axis=-1),
                nn.Flatten(),
                nn.Linear(16, 4),
                nn.BatchNorm1d(4),
            )

        def forward(self, x: Tensor) -> Tensor:
            if x.sum() > 1e9:  # untraceable: exercise the Sequential path's checks
                return x
            return self.features(x)

    _, report = _check_equal(Mismatch(), torch.randn(2, 3, 4))
    assert report.method == "sequential"
    assert (
        dict(report.skipped)["features.1"]
        == "channel_axis=-1 is not the convolution's channel axis"
    )
    assert report.folded == [("features.3", "features.4")]


def test_agrees_with_torch_fuse_conv_bn_eval() -> None:
    conv, bn = nn.Conv2d(3, 6, 3, groups=3), nn.BatchNorm2d(6)
    randomize(nn.Sequential(conv, bn)).eval()
    ours, _ = fold_batchnorm(nn.Sequential(conv, bn))
    theirs = fuse_conv_bn_eval(conv, bn)
    folded_conv = next(m for m in ours.modules() if isinstance(m, nn.Conv2d))
    torch.testing.assert_close(folded_conv.weight, theirs.weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(folded_conv.bias, theirs.bias, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fold_conv_bn_weights_matches_torch(transpose: bool, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn((5, 6, 3, 3) if transpose else (6, 5, 3, 3), generator=gen)
    b = torch.randn(6, generator=gen) if with_bias else None
    rm, rv = torch.randn(6, generator=gen), torch.rand(6, generator=gen) + 0.1
    gamma, beta = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    ours = fold_conv_bn_weights(w, b, rm, rv, 1e-3, gamma, beta, transpose=transpose)
    theirs = fuse_conv_bn_weights(w, b, rm, rv, 1e-3, gamma, beta, transpose=transpose)
    torch.testing.assert_close(ours[0], theirs[0].detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1].detach(), rtol=1e-6, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(
    groups=st.sampled_from([1, 2, 3]),
    per_group_in=st.integers(1, 3),
    per_group_out=st.integers(1, 3),
    transpose=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_fold_conv_bn_weights_property(
    groups: int, per_group_in: int, per_group_out: int, transpose: bool, seed: int
) -> None:
    """conv_{w'}(x) + b' == BN(conv_w(x) + b) for grouped (transposed) convolutions."""
    torch.manual_seed(seed)
    c_in, c_out = groups * per_group_in, groups * per_group_out
    cls = nn.ConvTranspose2d if transpose else nn.Conv2d
    conv = cls(c_in, c_out, 2, groups=groups).double()
    bn = randomize(nn.Sequential(nn.BatchNorm2d(c_out)), seed).double().eval()[0]
    w, b = fold_conv_bn_weights(
        conv.weight,
        conv.bias,
        bn.running_mean,
        bn.running_var,
        bn.eps,
        bn.weight,
        bn.bias,
        transpose=transpose,
        groups=groups,
    )
    x = torch.randn(2, c_in, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        expected = bn(conv(x))
        conv.weight.copy_(w)
        conv.bias.copy_(b)
        torch.testing.assert_close(conv(x), expected, rtol=1e-10, atol=1e-10)


def test_fold_conv_bn_weights_defaults_and_inputs_untouched() -> None:
    w, rm, rv = torch.randn(4, 2), torch.randn(4), torch.rand(4) + 0.5
    w0 = w.clone()
    new_w, new_b = fold_conv_bn_weights(w, None, rm, rv, 1e-5)
    s = torch.rsqrt(rv + 1e-5)
    torch.testing.assert_close(new_w, w * s[:, None])
    torch.testing.assert_close(new_b, -rm * s)
    assert torch.equal(w, w0)


def test_fold_conv_bn_weights_errors() -> None:
    rm, rv = torch.zeros(4), torch.ones(4)
    with pytest.raises(
        ValueError, match=r"running_mean and running_var must be 1-D tensors of the same length"
    ):
        fold_conv_bn_weights(torch.ones(4, 2), None, rm, torch.ones(3), 1e-5)
    with pytest.raises(ValueError, match=r"weight \(3, 2\) has 3 output channels, BatchNorm has 4"):
        fold_conv_bn_weights(torch.ones(3, 2), None, rm, rv, 1e-5)
    with pytest.raises(
        ValueError, match=r"transposed weight \(2, 4, 3\) with groups=2 does not have 4 output"
    ):
        fold_conv_bn_weights(torch.ones(2, 4, 3), None, rm, rv, 1e-5, transpose=True, groups=2)
    with pytest.raises(ValueError, match=r"groups must be a positive integer, got 0"):
        fold_conv_bn_weights(torch.ones(4, 2), None, rm, rv, 1e-5, groups=0)
    with pytest.raises(ValueError, match=r"gamma must have shape \(4,\), got \(3,\)"):
        fold_conv_bn_weights(torch.ones(4, 2), None, rm, rv, 1e-5, torch.ones(3))


def test_fold_batchnorm_errors() -> None:
    with pytest.raises(TypeError, match=r"fold_batchnorm expects an nn\.Module, got int"):
        fold_batchnorm(3)  # type: ignore[arg-type]
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))
    model.lock = threading.Lock()  # type: ignore[assignment]
    with pytest.raises(TypeError, match=r"the model cannot be deep-copied .*; pass inplace=True"):
        fold_batchnorm(model)
