"""freeze_batchnorm (surviving model.train()), unfreeze_batchnorm, convert_batchnorm."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import Tensor, nn

import normlab.nn as nlnn
from normlab.nn.utils import convert_batchnorm, freeze_batchnorm, is_frozen, unfreeze_batchnorm


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nlnn.BatchNorm2d(2)
    )


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("mode", ["stats", "all"])
def test_stats_freeze_survives_train_and_uses_running_stats(mode: str) -> None:
    model = _model()
    model(torch.randn(8, 3, 6, 6))  # some non-default running stats
    frozen_buffers = {
        k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k
    }
    freeze_batchnorm(model, mode)  # type: ignore[arg-type]
    model.train()  # the usual per-epoch call must not unfreeze
    assert model.training and all(not bn.training for bn in _bns(model))
    x = torch.randn(8, 3, 6, 6)
    reference = copy.deepcopy(model).eval()
    y = model(x)
    torch.testing.assert_close(y, reference(x))  # normalized with the running statistics
    for k, v in model.state_dict().items():
        if k in frozen_buffers:
            assert torch.equal(v, frozen_buffers[k]), k
    y.sum().backward()
    affine_grad = [bn.weight.grad is not None for bn in _bns(model)]
    assert affine_grad == ([True, True] if mode == "stats" else [False, False])


def test_affine_freeze_keeps_statistics_live() -> None:
    model = _model()
    freeze_batchnorm(model, "affine")
    model.train()
    assert all(bn.training for bn in _bns(model))
    assert all(not p.requires_grad for bn in _bns(model) for p in bn.parameters())
    before = _bns(model)[0].running_mean.clone()
    model(torch.randn(4, 3, 6, 6))
    assert not torch.equal(_bns(model)[0].running_mean, before)


def test_unfreeze_reverts_exactly() -> None:
    model = _model()
    _bns(model)[1].bias.requires_grad_(False)  # a user's own setting must come back
    model.eval()
    freeze_batchnorm(model, "all")
    assert all(is_frozen(bn) for bn in _bns(model))
    model.train()  # requested while frozen
    unfreeze_batchnorm(model)
    assert [bn.training for bn in _bns(model)] == [True, True]
    assert [p.requires_grad for bn in _bns(model) for p in bn.parameters()] == [
        True,
        True,
        True,
        False,
    ]
    assert all(not is_frozen(bn) and "train" not in bn.__dict__ for bn in _bns(model))
    model.eval()
    freeze_batchnorm(model, "stats")
    unfreeze_batchnorm(model)
    assert [bn.training for bn in _bns(model)] == [False, False]


def test_refreeze_changes_mode_and_frozen_models_copy_and_pickle() -> None:
    model = _model()
    freeze_batchnorm(model, "stats")
    freeze_batchnorm(model, "affine")  # replaces the mode
    model.train()
    assert all(bn.training for bn in _bns(model))
    freeze_batchnorm(model, "stats")
    clone = copy.deepcopy(model)
    clone.train()
    assert all(not bn.training for bn in _bns(clone))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = pickle.loads(pickle.dumps(model))
    loaded.train()
    assert all(not bn.training for bn in _bns(loaded))


def test_freeze_errors() -> None:
    with pytest.raises(
        ValueError,
        match=r"freeze_batchnorm mode must be one of \('stats', 'affine', 'all'\), got 'x'",
    ):
        freeze_batchnorm(_model(), "x")  # type: ignore[arg-type]
    model = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match=r"0 has no running statistics .* use mode='affine'"):
        freeze_batchnorm(model, "stats")
    freeze_batchnorm(model, "affine")
    bn = _model()[1]
    freeze_batchnorm(bn)
    with pytest.raises(ValueError, match="training mode is expected to be boolean"):
        bn.train("yes")  # type: ignore[arg-type]


class FrozenBatchNorm2d(nn.Module):
    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        for name, fill in (
            ("weight", 1.0),
            ("bias", 0.0),
            ("running_mean", 0.0),
            ("running_var", 1.0),
        ):
            self.register_buffer(name, torch.full((num_features,), fill))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale.reshape(1, -1, 1, 1) + (self.bias - self.running_mean * scale).reshape(
            1, -1, 1, 1
        )


def _trained() -> nn.Sequential:
    model = _model()
    for _ in range(3):
        model(torch.randn(8, 3, 6, 6))
    with torch.no_grad():
        for bn in _bns(model):
            bn.weight.uniform_(0.5, 2)
            bn.bias.normal_()
    return model.eval()


def test_convert_torch_to_normlab_and_back_keeps_everything() -> None:
    model = _trained()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    state = copy.deepcopy(model.state_dict())
    convert_batchnorm(model, nlnn.BatchNorm2d, backend="reference")
    assert all(type(bn) is nlnn.BatchNorm2d and bn.backend == "reference" for bn in _bns(model))
    assert all(not bn.training for bn in _bns(model))
    torch.testing.assert_close(model(x), expected)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    convert_batchnorm(model, {nlnn.BatchNorm2d: nn.BatchNorm2d})
    assert all(type(bn) is nn.BatchNorm2d for bn in _bns(model))
    torch.testing.assert_close(model(x), expected)


def test_convert_to_and_from_frozen() -> None:
    model = _trained()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    convert_batchnorm(model, FrozenBatchNorm2d)
    assert all(type(m) is FrozenBatchNorm2d for m in (model[1], model[4]))
    torch.testing.assert_close(model(x), expected)
    convert_batchnorm(model, nn.BatchNorm2d)
    model.eval()
    torch.testing.assert_close(model(x), expected)
    assert isinstance(model[1].weight, nn.Parameter)


def test_convert_a_batchnorm_root_and_keep_settings() -> None:
    bn = nn.BatchNorm1d(3, eps=1e-3, momentum=None)
    bn.weight.requires_grad_(False)
    new = convert_batchnorm(bn, nlnn.BatchNorm1d)
    assert isinstance(new, nlnn.BatchNorm1d) and new.eps == 1e-3 and new.momentum is None
    assert not new.weight.requires_grad and new.training


def test_convert_errors() -> None:
    with pytest.raises(
        TypeError, match=r"target_cls must be an nn\.Module class or a mapping of classes, got 3"
    ):
        convert_batchnorm(_model(), 3)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"cannot build BatchNorm2d\(4, .*\) for 1: .*unexpected keyword"
    ):
        convert_batchnorm(_model(), nlnn.BatchNorm2d, colour="red")
    with pytest.raises(
        ValueError, match=r"1 has a 'weight' tensor but the new BatchNorm2d has none"
    ):
        convert_batchnorm(_model(), nn.BatchNorm2d, affine=False)
