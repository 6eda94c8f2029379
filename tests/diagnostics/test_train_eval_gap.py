"""train_eval_gap against the long way (each layer's inputs collected, outputs computed per layer),
and recalibrate_batchnorm(layers=...) taking its answer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

import normlab.nn as nlnn
from normlab.diagnostics import train_eval_gap
from normlab.nn.utils import freeze_batchnorm, recalibrate_batchnorm

BN = (1, 5)  # the batch norms of _model()


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(4, 5, 1),
        nlnn.BatchNormAct2d(5, activation="elu"),
    )
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2)
        model[1].running_var.fill_(3.0)  # far from the data's
        model[5].running_mean.uniform_(-0.2, 0.2)
    return model


def _batches(k: int = 4) -> list[Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(6, 3, 5, 5, generator=gen) + 0.5 for _ in range(k)]


def _long_way(model: nn.Sequential, batches: list[Tensor]) -> dict[str, dict[str, float]]:
    """Batch norms in training mode, the rest in eval; at each batch norm, its inputs kept, its
    train output from a fresh copy, its eval output from the layer in eval mode."""
    work = copy.deepcopy(model).eval()
    inputs: dict[int, list[Tensor]] = {i: [] for i in BN}
    diff = dict.fromkeys(BN, 0.0)
    spread = dict.fromkeys(BN, 0.0)
    with torch.no_grad():
        for x in batches:
            for i, layer in enumerate(work):
                if i in BN:
                    inputs[i].append(x)
                    y_train = copy.deepcopy(layer).train()(x).double()
                    y_eval = layer(x).double()
                    diff[i] += float((y_eval - y_train).square().sum())
                    centered = y_train - y_train.mean((0, 2, 3), keepdim=True)
                    spread[i] += float(centered.square().sum())
                    x = y_train.float()
                else:
                    x = layer(x)
    out = {}
    for i in BN:
        xs = torch.cat(inputs[i]).double()
        mu, var = xs.mean((0, 2, 3)), xs.var((0, 2, 3), unbiased=False)
        bn = model[i]
        rm, rv, eps = bn.running_mean.double(), bn.running_var.double(), bn.eps
        s_run, s_pop = torch.sqrt(rv + eps), torch.sqrt(var + eps)
        per_channel = ((mu - rm) / s_run) ** 2 + var * (1 / s_run - 1 / s_pop) ** 2
        out[str(i)] = {
            "output_gap": math.sqrt(diff[i] / spread[i]),
            "stats_gap": float(per_channel.mean().sqrt()),
            "mean_shift": float(((rm - mu).abs() / s_pop).max()),
            "var_ratio": float(torch.maximum(s_run / s_pop, s_pop / s_run).square().max()),
        }
    return out


def test_measures_equal_the_long_way_and_are_ranked() -> None:
    model, batches = _model(), _batches()
    expected = _long_way(model, batches)
    gap = train_eval_gap(model, batches, threshold=0.05)
    assert [g.layer for g in gap] == sorted(expected, key=lambda k: -expected[k]["output_gap"])
    for g in gap:
        assert g.batches == 4 and g.type == type(model[int(g.layer)]).__name__
        for key, value in expected[g.layer].items():
            assert getattr(g, key) == pytest.approx(value, rel=1e-6), (g.layer, key)
    assert gap.flagged == [g.layer for g in gap if g.stats_gap > 0.05]
    assert "recalibrate" in str(gap) and "train/eval gap" in str(gap)


def test_the_model_is_left_bit_exactly_as_it_was() -> None:
    model = _model().train()
    model[3].eval()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    train_eval_gap(model, [(x, torch.zeros(6)) for x in _batches()])  # (input, target) pairs
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nlnn.BatchNorm1d(3, channel_axis=-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x, x[..., 0] > -0.5)  # padded positions: where feature 0 is low


def test_masked_positions_are_left_out() -> None:
    model = _Masked()
    with torch.no_grad():
        model.bn.running_mean.fill_(0.3)
        model.bn.weight.fill_(2.0)
    x = torch.randn(4, 7, 3) + 1
    mask = x[..., 0] > -0.5
    gap = train_eval_gap(model, [x])[0]
    valid = x[mask].double()  # (n, 3)
    mu, var = valid.mean(0), valid.var(0, unbiased=False)
    assert gap.mean_shift == pytest.approx(float(((0.3 - mu).abs() / (var + 1e-5).sqrt()).max()))
    with torch.no_grad():
        y_train = copy.deepcopy(model.bn).train()(x, mask)[mask].double()
        y_eval = copy.deepcopy(model.bn).eval()(x, mask)[mask].double()
    expected = (y_eval - y_train).square().sum() / (y_train - y_train.mean(0)).square().sum()
    assert gap.output_gap == pytest.approx(float(expected.sqrt()), rel=1e-6)


def test_frozen_layers_have_no_gap() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nlnn.FrozenBatchNorm1d(4))
    model.add_module("3", nn.BatchNorm1d(4))
    freeze_batchnorm(model[3])
    gap = train_eval_gap(model, [torch.randn(8, 3)])
    assert [g.layer for g in gap] == ["1"]


def test_recalibrating_the_flagged_layers_only() -> None:
    """recalibrate_batchnorm(layers=gap.flagged): those layers get what a full recalibration
    gives them; the others keep their buffers bit-exactly; afterwards nothing is flagged."""
    model, batches = _model(), _batches()
    recalibrate_batchnorm(model, batches, progress=False, layers=["5"])  # layer 5 is fine
    assert model[1].num_batches_tracked == 0
    gap = train_eval_gap(model, batches, threshold=0.3)
    assert gap.flagged == ["1"]
    full = recalibrate_batchnorm(copy.deepcopy(model), batches, progress=False)
    untouched = {k: v.clone() for k, v in model[5].state_dict().items()}
    recalibrate_batchnorm(model, batches, progress=False, layers=gap.flagged)
    for key, value in full[1].state_dict().items():
        torch.testing.assert_close(model[1].state_dict()[key], value, rtol=0, atol=0)
    for key, value in untouched.items():
        assert torch.equal(model[5].state_dict()[key], value), key
    assert train_eval_gap(model, batches, threshold=0.3).flagged == []


def test_errors() -> None:
    model = _model()
    with pytest.raises(ValueError, match="no batch norm with running statistics"):
        train_eval_gap(nn.Linear(2, 2), [torch.randn(2, 2)])
    with pytest.raises(ValueError, match="batches yielded no batch"):
        train_eval_gap(model, [])
    with pytest.raises(ValueError, match="num_batches must be at least 1, got 0"):
        train_eval_gap(model, _batches(), num_batches=0)
    with pytest.raises(ValueError, match=r"threshold must be a finite number >= 0, got -1"):
        train_eval_gap(model, _batches(), threshold=-1)
    with pytest.raises(TypeError, match="train_eval_gap: data must yield tensors"):
        train_eval_gap(model, [{"x": 1}])
    with pytest.raises(
        ValueError, match=r"'4' is not a BatchNorm with running statistics in the model"
    ):
        recalibrate_batchnorm(model, _batches(), layers=["4"], progress=False)
