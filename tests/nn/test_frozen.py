"""FrozenBatchNorm2d: detectron2 semantics, BatchNorm2d checkpoints, recursive conversion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab.nn as nlnn


def _trained_bn(cls: type = nn.BatchNorm2d) -> nn.Module:
    bn = cls(4)
    for _ in range(3):
        bn(torch.randn(8, 4, 3, 3) * 2 + 1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    return bn.eval()


def test_loads_batchnorm2d_state_dict_and_matches_eval_output() -> None:
    bn = _trained_bn()
    frozen = nlnn.FrozenBatchNorm2d(4)
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-6)
    assert list(frozen.parameters()) == []
    frozen.train()
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-6)  # train() changes nothing


@pytest.mark.parametrize("cls", [nn.BatchNorm2d, nlnn.BatchNorm2d])
def test_convert_root_returns_new_module(cls: type) -> None:
    bn = _trained_bn(cls)
    frozen = nlnn.FrozenBatchNorm2d.convert_frozen_batchnorm(bn)
    assert isinstance(frozen, nlnn.FrozenBatchNorm2d) and frozen is not bn
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-6)


def test_convert_recursive_keeps_eval_outputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 3), nlnn.BatchNorm2d(4)),
        nn.Flatten(),
        nn.Linear(4, 2),
        nn.BatchNorm1d(2),
    )
    model.train()
    for _ in range(3):
        model(torch.randn(8, 3, 5, 5))
    model.eval()
    x = torch.randn(4, 3, 5, 5)
    before = model(x)
    out = nlnn.FrozenBatchNorm2d.convert_frozen_batchnorm(model)
    assert out is model
    assert isinstance(model[1], nlnn.FrozenBatchNorm2d) and isinstance(
        model[3][1], nlnn.FrozenBatchNorm2d
    )
    assert isinstance(model[6], nn.BatchNorm1d)  # only 2d BatchNorms are frozen
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_wrong_channels_message() -> None:
    with pytest.raises(RuntimeError, match=r"running_mean should contain 3 elements not 4"):
        nlnn.FrozenBatchNorm2d(4)(torch.randn(2, 3, 5, 5))
