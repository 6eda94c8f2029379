"""SplitBatchNorm (timm's AdvProp/AugMix layer) against its definition: one torch BatchNorm per part."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import normlab.nn as nlnn
from normlab.nn.utils import convert_batchnorm, replace_all_batch_norm_modules_

SPLIT = {1: nlnn.SplitBatchNorm1d, 2: nlnn.SplitBatchNorm2d, 3: nlnn.SplitBatchNorm3d}
TORCH = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _shape(spatial: int, n: int, c: int = 3) -> tuple[int, ...]:
    return (n, c, *([4] * spatial)) if spatial > 1 else (n, c, 5)


def _randomize(layers: list[nn.Module]) -> None:
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
            layer.running_mean.fill_(0.1 * i)


class _TimmLike(nn.BatchNorm2d):
    """The state layout of timm's SplitBatchNorm2d: the first split's tensors at the top level,
    the others under ``aux_bn.<i>``."""

    def __init__(self, c: int, num_splits: int) -> None:
        super().__init__(c)
        self.aux_bn = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(num_splits - 1))


@pytest.mark.parametrize("spatial", [1, 2, 3])
@pytest.mark.parametrize("num_splits,momentum", [(2, 0.1), (3, None)])
def test_each_part_is_its_own_batchnorm(spatial: int, num_splits: int, momentum) -> None:
    """Oracle: torch BatchNorms, one per part, on the parts; eval: the first one on everything."""
    torch.manual_seed(0)
    layer = SPLIT[spatial](3, momentum=momentum, num_splits=num_splits)
    oracle = [TORCH[spatial](3, momentum=momentum) for _ in range(num_splits)]
    _randomize(oracle)
    layer.load_state_dict(
        {
            **oracle[0].state_dict(),
            **{
                f"aux_bn.{i}.{k}": v
                for i, o in enumerate(oracle[1:])
                for k, v in o.state_dict().items()
            },
        }
    )
    for step in range(3):
        x = torch.randn(_shape(spatial, 2 * num_splits)) * (1 + step) + step
        parts = x.split(2)
        xs = x.clone().requires_grad_()
        ps = [p.clone().requires_grad_() for p in parts]
        y = layer(xs)
        expected = torch.cat([bn(p) for bn, p in zip(oracle, ps)])
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y)
        (y * g).sum().backward()
        (expected * g).sum().backward()
        torch.testing.assert_close(xs.grad, torch.cat([p.grad for p in ps]), rtol=1e-4, atol=1e-5)
    splits = [layer, *layer.aux_bn]
    for mine, ref in zip(splits, oracle):
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(
                getattr(mine, name), getattr(ref, name), rtol=1e-5, atol=1e-6
            )
        torch.testing.assert_close(mine.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)
    layer.eval()
    oracle[0].eval()
    x = torch.randn(_shape(spatial, 3))  # any batch size in eval
    torch.testing.assert_close(layer(x), oracle[0](x), rtol=1e-5, atol=1e-6)


def test_timm_checkpoint_layout_loads() -> None:
    timm_like = _TimmLike(4, num_splits=3)
    _randomize([timm_like, *timm_like.aux_bn])
    ours = nlnn.SplitBatchNorm2d(4, num_splits=3)
    assert set(ours.state_dict()) == set(timm_like.state_dict())
    ours.load_state_dict(timm_like.state_dict())
    torch.testing.assert_close(ours.aux_bn[1].running_mean, timm_like.aux_bn[1].running_mean)


def test_mask_is_split_with_the_batch() -> None:
    torch.manual_seed(0)
    layer = nlnn.SplitBatchNorm1d(3, channel_axis=-1)
    x = torch.randn(4, 6, 3)
    mask = torch.rand(4, 6) > 0.3
    y = layer(x, mask)
    refs = [nlnn.BatchNorm1d(3, channel_axis=-1) for _ in range(2)]
    expected = torch.cat([refs[i](x[2 * i : 2 * i + 2], mask[2 * i : 2 * i + 2]) for i in (0, 1)])
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(layer.aux_bn[0].running_var, refs[1].running_var)


def test_errors() -> None:
    with pytest.raises(ValueError, match="num_splits must be an integer >= 2, got 1"):
        nlnn.SplitBatchNorm2d(4, num_splits=1)
    layer = nlnn.SplitBatchNorm2d(4, num_splits=3)
    with pytest.raises(
        ValueError,
        match=r"SplitBatchNorm2d\(4\): the batch size 7 is not a multiple of num_splits=3",
    ):
        layer(torch.randn(7, 4, 2, 2))
    with pytest.raises(ValueError, match="Split BN has no synchronized form"):
        nlnn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(layer))
    with pytest.raises(ValueError, match="it is a 'bnact' layer and a split layer is plain"):
        nlnn.SplitBatchNorm2d.convert_split_batchnorm(nn.Sequential(nlnn.BatchNormAct2d(4)))


def test_convert_from_plain_batchnorm_by_rank_keeps_state_and_options() -> None:
    """timm's convert_splitbn_model, through the registry: each layer becomes the split layer of
    its rank (timm's makes every one a SplitBatchNorm2d); the first split shares the tensors,
    the auxiliary ones start from copies."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nlnn.BatchNorm2d(4, nonfinite="raise", momentum=0.05),
        nn.Flatten(),
        nn.Linear(36, 5),
        nn.BatchNorm1d(5),
    )
    for _ in range(2):
        model(torch.randn(6, 3, 5, 5))
    model.eval()
    x = torch.randn(4, 3, 5, 5)
    expected = model(x)
    bn2, bn1 = model[1], model[4]
    converted = nlnn.SplitBatchNorm2d.convert_split_batchnorm(model, num_splits=3)
    assert converted is model
    assert type(model[1]) is nlnn.SplitBatchNorm2d and type(model[4]) is nlnn.SplitBatchNorm1d
    assert model[1].weight is bn2.weight and model[1].running_mean is bn2.running_mean
    assert model[1].nonfinite == "raise" and model[1].momentum == 0.05
    for aux in model[1].aux_bn:
        assert aux.nonfinite == "raise" and aux.momentum == 0.05 and not aux.training
        assert aux.running_var is not bn2.running_var
        torch.testing.assert_close(aux.running_var, bn2.running_var)
        torch.testing.assert_close(aux.weight, bn2.weight)
    assert len(model[4].aux_bn) == 2 and model[4].running_mean is bn1.running_mean
    torch.testing.assert_close(model(x), expected)


def test_registry_and_converters_know_the_kind() -> None:
    assert nlnn.layer_class("split", 2) is nlnn.SplitBatchNorm2d
    layer = nlnn.SplitBatchNorm2d(4, num_splits=3, eps=1e-3)
    description = nlnn.describe(layer)
    assert description.kind == "split" and description.config["num_splits"] == 3
    for _ in range(2):
        layer(torch.randn(6, 4, 3, 3) + 1)
    layer.eval()
    x = torch.randn(2, 4, 3, 3)
    expected = layer(x)
    # after training, drop the auxiliary splits: the first one stays (AdvProp)
    plain = convert_batchnorm(nn.Sequential(layer), nn.BatchNorm2d)[0]
    assert type(plain) is nn.BatchNorm2d and plain.eps == 1e-3
    torch.testing.assert_close(plain(x), expected)
    frozen = nlnn.FrozenBatchNorm2d.convert_frozen_batchnorm(layer)
    torch.testing.assert_close(frozen(x), expected)
    back = convert_batchnorm(nn.Sequential(plain), nlnn.SplitBatchNorm2d, num_splits=2)[0]
    assert type(back) is nlnn.SplitBatchNorm2d and back.num_splits == 2
    torch.testing.assert_close(back(x), expected)


@pytest.mark.parametrize("training", [True, False])
def test_fx_traces_the_split_layer(training: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nlnn.SplitBatchNorm2d(4, num_splits=2))
    model.train(training)
    graph = fx.symbolic_trace(model)
    x = torch.randn(4, 3, 3, 3)
    reference = nn.Sequential(nn.Conv2d(3, 4, 1), nlnn.SplitBatchNorm2d(4, num_splits=2))
    reference.load_state_dict(model.state_dict())
    reference.train(training)
    torch.testing.assert_close(graph(x), reference(x))


def test_replace_all_batch_norm_modules_reaches_every_split() -> None:
    layer = replace_all_batch_norm_modules_(nlnn.SplitBatchNorm2d(4, num_splits=3))
    assert all(m.running_mean is None and not m.track_running_stats for m in (layer, *layer.aux_bn))
    assert list(layer.state_dict()) == [
        "weight",
        "bias",
        *[f"aux_bn.{i}.{k}" for i in range(2) for k in ("weight", "bias")],
    ]
