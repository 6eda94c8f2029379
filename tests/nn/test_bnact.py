"""BatchNormAct: BN + activation from the output alone, against torch's BN followed by the activation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab.nn as nlnn
from normlab.kernels import fused_available

ACTS = [
    ("leaky_relu", {"negative_slope": 0.1}, lambda: nn.LeakyReLU(0.1)),
    ("elu", {"alpha": 1.0}, lambda: nn.ELU(1.0)),
    ("identity", {}, lambda: nn.Identity()),
    ("relu", {}, lambda: nn.ReLU()),
    ("silu", {}, lambda: nn.SiLU()),
    ("gelu", {}, lambda: nn.GELU()),
]


@pytest.mark.parametrize(("activation", "kwargs", "torch_act"), ACTS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("backend", ["reference", "native", "fused"])
def test_matches_batchnorm_then_activation(
    activation: str, kwargs: dict, torch_act, layout: str, backend: str
) -> None:
    if backend == "fused" and not fused_available():
        pytest.skip("no C++ compiler/ninja: the fused kernels cannot be built here")
    torch.manual_seed(0)
    ours = nlnn.BatchNormAct2d(6, activation=activation, backend=backend, **kwargs)
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.uniform_(-1.5, 1.5)  # negative γ too: the inversion keeps the sign
        bn.bias.normal_()
    ours.load_state_dict(bn.state_dict())
    ref = nn.Sequential(bn, torch_act())
    for _step in range(3):
        x = torch.randn(8, 6, 5, 4) * 2 + 1
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ref(xa), ours(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.weight.grad, bn.weight.grad, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(ours.bias.grad, bn.bias.grad, rtol=1e-5, atol=1e-4)
        ours.zero_grad()
        bn.zero_grad()
    torch.testing.assert_close(ours.running_var, bn.running_var)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_1d_without_affine() -> None:
    ours, bn = nlnn.BatchNormAct1d(5, affine=False), nn.BatchNorm1d(5, affine=False)
    x = torch.randn(16, 5, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y, yr = ours(x), nn.functional.leaky_relu(bn(xr), 0.01)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    yr.sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(seen.values())


def test_saved_activation_memory_of_a_20_layer_stack() -> None:
    def stack(fused: bool) -> nn.Sequential:
        layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1, bias=False)]
        for i in range(20):
            layers += (
                [nlnn.BatchNormAct2d(16, negative_slope=0.01)]
                if fused
                else [nn.BatchNorm2d(16), nn.LeakyReLU(0.01)]
            )
            if i < 19:
                layers.append(nn.Conv2d(16, 16, 3, padding=1, bias=False))
        return nn.Sequential(*layers)

    x = torch.randn(8, 3, 32, 32, requires_grad=True)
    ratio = _saved_bytes(stack(True), x) / _saved_bytes(stack(False), x)
    assert ratio <= 0.6, f"saved-activation memory ratio {ratio:.2f}"
    if (
        fused_available()
    ):  # the fused path (picked by auto for large input) saves only the output too
        fused = stack(True)
        for m in fused:
            if isinstance(m, nlnn.BatchNormAct2d):
                m.backend = "fused"
        fused_ratio = _saved_bytes(fused, x) / _saved_bytes(stack(False), x)
        assert fused_ratio == pytest.approx(ratio), "the fused path must not save more"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"activation": "tanh"},
            "activation must be one of 'identity', 'relu', 'leaky_relu', 'elu', 'silu', 'gelu', got 'tanh'",
        ),
        ({"activation": "elu", "alpha": 0.0}, "alpha must be a finite number > 0, got 0.0"),
        (
            {"activation": "leaky_relu", "negative_slope": float("nan")},
            "negative_slope must be a finite number, got nan",
        ),
        (
            {"activation": "leaky_relu", "negative_slope": -0.1},
            "negative_slope must be >= 0, got -0.1",
        ),
        ({"activation": None}, "BatchNormAct needs an activation; use 'identity' for none"),
    ],
)
def test_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        nlnn.BatchNormAct2d(4, **kwargs)


@pytest.mark.parametrize("activation", ["leaky_relu", "relu", "silu"])
def test_mask_matches_masked_batchnorm_then_activation(activation: str) -> None:
    """Masked positions output f(β) and get no gradient; the rest equals BN-with-mask + f."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6)
    mask = torch.arange(6) < torch.tensor([[6], [4], [2], [5]])
    ours, bn = nlnn.BatchNormAct1d(3, activation=activation), nlnn.BatchNorm1d(3)
    act = {"leaky_relu": nn.LeakyReLU(0.01), "relu": nn.ReLU(), "silu": nn.SiLU()}[activation]
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa, mask), act(bn(xb, mask))
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    assert torch.all(xa.grad.transpose(1, 2)[~mask] == 0)


def test_non_invertible_activations_keep_the_input() -> None:
    """relu/silu/gelu cannot rebuild x from y: they keep x (no worse than BN + activation)."""
    x = torch.randn(8, 3, 16, 16, requires_grad=True)
    for activation in ("relu", "silu", "gelu"):
        layer = nlnn.BatchNormAct2d(3, activation=activation)
        ref = nn.Sequential(
            nn.BatchNorm2d(3), {"relu": nn.ReLU(), "silu": nn.SiLU(), "gelu": nn.GELU()}[activation]
        )
        assert _saved_bytes(layer, x) <= _saved_bytes(ref, x)


def test_fused_bf16_takes_the_activation_mask_from_the_output() -> None:
    if not fused_available():
        pytest.skip("no C++ compiler/ninja: the fused kernels cannot be built here")
    torch.manual_seed(0)
    x = (torch.randn(16, 8, 6, 6) * 2).to(torch.bfloat16)
    grads = {}
    for backend in ("fused", "reference"):
        m = nlnn.BatchNormAct2d(8, negative_slope=0.1, backend=backend).to(torch.bfloat16)
        xr = x.clone().requires_grad_()
        y = m(xr)
        y.backward(torch.ones_like(y))
        grads[backend] = (xr.grad.float(), m.weight.grad.float())
    for got, want in zip(grads["fused"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
