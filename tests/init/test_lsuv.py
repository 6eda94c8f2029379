"""lsuv_ is all or nothing: bad data or a non-finite output restores every weight (issue 12, item 10)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab.init as ni


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize(
    ("poison", "counts"), [(float("nan"), "2 NaN and 0"), (float("inf"), "0 NaN and 2")]
)
def test_non_finite_data_raises_and_leaves_the_weights(poison: float, counts: str) -> None:
    model = _mlp()
    before = _snapshot(model)
    x = torch.randn(32, 4)
    x[3, 1] = x[7, 2] = poison
    for data in (x, (x, torch.zeros(32))):
        with pytest.raises(
            ValueError,
            match=rf"lsuv_: the data contains {counts} infinite value\(s\); clean it first "
            r"\(no weight was changed\)",
        ):
            ni.lsuv_(model, data)
        _assert_unchanged(model, before)


class _Exp(nn.Module):
    """A layer whose output overflows once the rescaled layer before it grows its output."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.exp(self.a(x) * 200))


def test_a_layer_output_turning_non_finite_mid_way_restores_every_weight() -> None:
    torch.manual_seed(1)
    model = _Exp().train()
    before = _snapshot(model)
    with pytest.raises(
        ValueError, match=r"lsuv_: layer 'b' has output variance (nan|inf) after 0 rescaling"
    ):
        ni.lsuv_(model, torch.randn(64, 4))
    _assert_unchanged(model, before)  # layer 'a' had been rescaled already: rolled back too
    assert model.training


def test_too_few_output_values_or_empty_data_raise_and_restore() -> None:
    model = nn.Sequential(nn.Linear(4, 1))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"layer '0' gave 1 output value\(s\), a variance needs"):
        ni.lsuv_(model, torch.randn(1, 4))  # used to write NaN into the weights
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"lsuv_ needs a non-empty batch, got shape \(0, 4\)"):
        ni.lsuv_(model, torch.randn(0, 4))
    _assert_unchanged(model, before)


def test_a_failing_forward_restores_the_weights() -> None:
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.calls = nn.Linear(4, 4), 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 3:  # after the orthogonal init and a first rescaling
                raise KeyboardInterrupt
            return self.fc(x)

    model = Boom()
    before = _snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        ni.lsuv_(model, torch.randn(16, 4) * 10)
    _assert_unchanged(model, before)


def test_layers_that_do_not_run_are_left_alone_with_a_warning() -> None:
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.unused = nn.Linear(4, 16), nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    model = Head()
    unused = model.unused.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match=r"layer\(s\) \['unused'\] did not run on the data"):
        variances = ni.lsuv_(model, torch.randn(64, 4))  # used to raise IndexError
    assert list(variances) == ["body"] and abs(variances["body"] - 1) <= 0.1
    assert torch.equal(model.unused.weight, unused)


def test_arguments_and_data_types_are_checked_before_any_change() -> None:
    model = _mlp()
    before = _snapshot(model)
    loader = torch.utils.data.DataLoader(torch.randn(8, 4))
    with pytest.raises(TypeError, match=r"lsuv_ takes a tensor or an \(x, \.\.\.\) batch, got"):
        ni.lsuv_(model, loader)
    for tol in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="tol must be a finite number > 0"):
            ni.lsuv_(model, torch.randn(8, 4), tol=tol)
    with pytest.raises(ValueError, match="max_iters must be an int >= 1, got 0"):
        ni.lsuv_(model, torch.randn(8, 4), max_iters=0)
    lazy = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(ValueError, match=r"lsuv_: layer '0' has an uninitialized \(lazy\) param"):
        ni.lsuv_(lazy, torch.randn(8, 4))
    _assert_unchanged(model, before)


def test_half_precision_model() -> None:
    # torch's QR has no 16-bit CPU kernel: orthogonal_ rounds a float32 matrix
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(torch.bfloat16)
    variances = ni.lsuv_(model, torch.randn(256, 8, dtype=torch.bfloat16), tol=0.1)
    assert all(abs(v - 1) <= 0.1 for v in variances.values()), variances
    w = torch.empty(6, 6, dtype=torch.float16)
    ni.orthogonal_(w, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close((w.float() @ w.float().T), torch.eye(6), atol=2e-3, rtol=0)


def test_initialize_refuses_lazy_layers_before_changing_anything() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LazyLinear(3))
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"initialize: layer '2' has an uninitialized \(lazy\)"):
        ni.initialize(model)
    assert torch.equal(model[0].weight, before)
