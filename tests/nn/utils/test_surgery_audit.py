"""add_batchnorm / remove_batchnorm and audit_batchnorm."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import normlab.nn as nlnn
from normlab.nn.utils import add_batchnorm, audit_batchnorm, remove_batchnorm


def _plain() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(6, 5),
        nn.Dropout(0.1),
        nn.Linear(5, 2),
        nn.Softmax(dim=1),
    )


def _layout(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model]


def test_add_before_activation_removes_the_biases() -> None:
    model = add_batchnorm(_plain())
    assert _layout(model) == [
        "Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "Tanh", "Flatten",
        "Linear", "BatchNorm1d", "Dropout", "Linear", "BatchNorm1d", "Softmax",
    ]  # fmt: skip
    assert all(m.bias is None for m in model if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert isinstance(model[1], nlnn.BatchNorm2d) and model[1].num_features == 4
    assert model(torch.randn(4, 3, 5, 5)).shape == (4, 2)


def test_add_after_activation_keeps_biases_where_bn_does_not_follow() -> None:
    model = add_batchnorm(
        _plain(), "after_activation", bn_classes={2: nn.BatchNorm2d}, momentum=0.2
    )
    assert _layout(model)[:8] == [
        "Conv2d",
        "ReLU",
        "BatchNorm2d",
        "Conv2d",
        "Tanh",
        "BatchNorm2d",
        "Flatten",
        "Linear",
    ]
    assert model[0].bias is not None and model[2].momentum == 0.2
    assert (
        _layout(model)[8] == "BatchNorm1d" and model[7].bias is None
    )  # Linear → Dropout: BN right after
    assert type(model[2]) is nn.BatchNorm2d
    add_batchnorm(model, "after_activation")  # idempotent
    assert len(model) == 13


def test_nested_sequential_and_named_children() -> None:
    from collections import OrderedDict

    inner = nn.Sequential(OrderedDict(fc=nn.Linear(3, 3), act=nn.ReLU()))
    model = add_batchnorm(nn.Sequential(inner, nn.Linear(3, 1)))
    assert list(inner._modules) == ["fc", "fc_bn", "act"]
    assert _layout(model) == ["Sequential", "Linear", "BatchNorm1d"]


def test_remove_is_the_reverse() -> None:
    plain = _plain()
    model = remove_batchnorm(add_batchnorm(_plain()))
    assert _layout(model) == _layout(plain)
    for m in model:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert isinstance(m.bias, nn.Parameter) and torch.equal(
                m.bias, torch.zeros_like(m.bias)
            )


def test_remove_outside_sequential_uses_identity() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.bn = nn.BatchNorm1d(2)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn(self.fc(x))

    net = remove_batchnorm(Net())
    assert isinstance(net.bn, nn.Identity)
    assert isinstance(remove_batchnorm(nn.BatchNorm1d(2)), nn.Identity)


def test_surgery_errors() -> None:
    with pytest.raises(
        TypeError, match=r"add_batchnorm expects an nn\.Sequential model, got Linear"
    ):
        add_batchnorm(nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=r"position must be one of \('before_activation', 'after_activation'\), got 'x'",
    ):
        add_batchnorm(_plain(), "x")  # type: ignore[arg-type]


# --- audit --------------------------------------------------------------------------------


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)  # bias, feeds bn only: wasted
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)  # bias, output also used by the residual: not wasted
        self.bn2 = nn.BatchNorm2d(4, momentum=0.9)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        y = self.conv2(x)
        return self.bn2(y) + y


def _trained(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    model.train()
    with torch.no_grad():
        model(torch.randn(shape))
    return model.eval()


def test_audit_clean_model_has_no_findings() -> None:
    model = _trained(
        nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()), (4, 3, 5, 5)
    )
    report = audit_batchnorm(model, torch.randn(2, 3, 5, 5))
    assert len(report) == 0 and str(report) == "audit_batchnorm: no problems found"


def test_audit_static_findings() -> None:
    model = Branchy()
    with torch.no_grad():
        model.bn.running_var[0] = 0.0
        model.bn.running_mean[1] = float("nan")
    report = audit_batchnorm(model)
    found = {(f.module, f.code) for f in report}
    assert found == {
        ("conv", "bias-before-bn"),
        ("bn", "untracked"),
        ("bn2", "untracked"),
        ("bn", "nonfinite-stats"),
        ("bn", "near-zero-var"),
        ("bn2", "momentum"),
    }
    by_code = {f.code: f for f in report}
    assert by_code["bias-before-bn"].fix == "construct the layer with bias=False"
    assert "1 running statistic value(s) are NaN/Inf" in by_code["nonfinite-stats"].problem
    assert "1 of 4 channels have running variance < eps=1e-05" in by_code["near-zero-var"].problem
    assert "use torch momentum = 1 − keras_momentum = 0.1" in by_code["momentum"].fix
    text = str(report)
    assert "audit_batchnorm: 6 finding(s)" in text and "so the bias is wasted" in text


def test_audit_untraceable_model_uses_sequential_order() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))

        def forward(self, x: Tensor) -> Tensor:
            return self.body(x) if x.sum() > 0 else self.body(-x)

    model = _trained(Untraceable(), (4, 3))
    assert audit_batchnorm(model).codes() == {"bias-before-bn"}
    assert audit_batchnorm(model)[0].module == "body.0"


def test_audit_with_example_input() -> None:
    model = _trained(
        nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nlnn.BatchNorm2d(4)), (4, 3, 5, 5)
    )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    assert (
        audit_batchnorm(model, torch.randn(1, 3, 5, 5)).codes() == set()
    )  # grad enabled: training
    with torch.no_grad():
        report = audit_batchnorm(model, torch.randn(1, 3, 3, 3))
    assert report.codes() == {"train-mode-inference", "single-value"}
    assert "input (1, 4, 1, 1) gives each channel a single value per batch" in report[1].problem
    with torch.inference_mode():
        assert "train-mode-inference" in audit_batchnorm(model, torch.randn(2, 3, 5, 5)).codes()
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_audit_reports_a_failing_example() -> None:
    model = _trained(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)), (4, 3, 5, 5))
    report = audit_batchnorm(model, torch.randn(2, 5, 5, 5))
    assert report.codes() == {"example-failed"}
    assert report[0].problem.startswith("the example forward raised RuntimeError")


def test_remove_keeps_a_fused_activation() -> None:
    """A BatchNormAct loses its normalization, not its activation (it used to vanish whole)."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nlnn.BatchNormAct2d(4, negative_slope=0.2), nn.Flatten()
    )
    remove_batchnorm(model)
    assert isinstance(model[1], nn.LeakyReLU) and model[1].negative_slope == 0.2
    assert model[0].bias is not None
    single = remove_batchnorm(nlnn.BatchNormAct1d(3, activation="silu"))
    assert isinstance(single, nn.SiLU)
