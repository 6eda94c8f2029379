"""ConvNet ensembles: grouped convolutions and K·C-channel batch norm equal each member run alone
(torch as the oracle); MicroBatch on images is Ghost BN; the ConvNet factory's shapes and errors."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab.nn as nlnn
from normlab.lab.data import Dataset, load_dataset
from normlab.lab.ensemble import (
    Ensemble,
    StackedConv2d,
    TrainConfig,
    make_optimizer,
    member_major,
    train_step,
)
from normlab.lab.models import MicroBatch, convnet


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def _grads(ens: Ensemble) -> list[dict[str, torch.Tensor]]:
    """Each member's gradients, unstacked like its parameters (the stacked gradients written into
    a copy's parameters, then :meth:`Ensemble.to_models`)."""
    g = copy.deepcopy(ens)
    with torch.no_grad():
        for p, src in zip(g.parameters(), ens.parameters()):
            assert src.grad is not None
            p.copy_(src.grad)
    return [dict(m.named_parameters()) for m in g.to_models()]


@pytest.mark.parametrize(
    ("norm", "extra"),
    [
        ("bn", {}),
        ("none", {}),
        ("group", {"norm_kwargs": {"num_groups": 2}}),
        ("renorm", {"norm_kwargs": {"r_max": 2.0, "d_max": 1.0}}),
        ("bn", {"micro_batch": 4}),
    ],
)
def test_conv_ensemble_equals_its_members(
    digits: Dataset, norm: str, extra: dict[str, Any]
) -> None:
    """Outputs, every parameter's gradient, and one SGD step (parameters and running statistics)
    equal K members run one by one with torch.optim, each on its own batch."""
    k, n = 3, 16
    members = [
        convnet(digits.image_shape, 10, channels=(4, 8), norm=norm, init="he", seed=s, **extra)
        for s in range(k)
    ]
    if norm == "renorm":
        # With the default running statistics (0, 1) and unclipped r, d, Renorm's output where
        # the convolution gives exactly 0 (blank digit borders) is 0 in exact arithmetic: its
        # sign after rounding, hence ReLU's gradient, flips between kernels and layouts. Other
        # running statistics move that value away from 0.
        for m in members:
            for layer in m.modules():
                if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
                    layer.running_mean.fill_(0.3)
                    layer.running_var.fill_(2.0)
    alone = [copy.deepcopy(m).train() for m in members]
    ens = Ensemble(members).train()
    assert any(isinstance(layer, StackedConv2d) for layer in ens.layers)
    idx = torch.randint(0, len(digits.y_train), (k, n), generator=torch.Generator().manual_seed(0))
    x, y = digits.x_train[idx], digits.y_train[idx]  # (K, N, 64), (K, N)
    lrs = torch.tensor([0.05, 0.1, 0.02])
    opt = make_optimizer(ens, TrainConfig(lr=1.0, momentum=0.9))

    logits = ens(x)
    F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1).sum().backward()
    grads = _grads(ens)
    for i, model in enumerate(alone):
        out = model(x[i])
        torch.testing.assert_close(logits[i], out, rtol=1e-5, atol=1e-5)
        F.cross_entropy(out, y[i]).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None
            torch.testing.assert_close(grads[i][name], p.grad, rtol=1e-5, atol=1e-5, msg=name)

    # one SGD step (momentum 0.9; each member's lr carried by its loss weight)
    fresh = Ensemble(members).train()
    opt = make_optimizer(fresh, TrainConfig(lr=1.0, momentum=0.9))
    train_step(fresh, opt, x, y, lrs)
    for i, member in enumerate(members):
        ref = copy.deepcopy(member).train()
        o = torch.optim.SGD(ref.parameters(), lr=float(lrs[i]), momentum=0.9)
        F.cross_entropy(ref(x[i]), y[i]).backward()
        o.step()
        got = fresh.to_models()[i].state_dict()
        for name, t in ref.state_dict().items():
            torch.testing.assert_close(got[name].float(), t.float(), rtol=1e-5, atol=1e-5, msg=name)
    # eval mode (running statistics), one shared input batch
    fresh.eval()
    shared = digits.x_test[:9]
    for i, model in enumerate(fresh.to_models()):
        torch.testing.assert_close(fresh(shared)[i], model.eval()(shared), rtol=1e-5, atol=1e-5)


def test_outputs_are_member_major_images(digits: Dataset) -> None:
    members = [convnet(digits.image_shape, 10, channels=(4, 8), norm="bn", seed=s) for s in (0, 1)]
    ens = Ensemble(members).eval()
    x = digits.x_test[:5]
    outs = ens.outputs(x)
    assert outs[1].shape == (2, 5, 4, 8, 8)  # conv → (K, N, C, H, W)
    assert outs[-1].shape == (2, 5, 10)
    with torch.no_grad():
        first_conv = members[1][1](members[1][0](x))
    torch.testing.assert_close(outs[1][1], first_conv, rtol=1e-5, atol=1e-6)
    h = torch.arange(6.0).view(1, 6, 1, 1)  # (N=1, K·C=2·3, 1, 1)
    assert member_major(h, 2)[1, 0, :, 0, 0].tolist() == [3.0, 4.0, 5.0]  # member 1: channels 3–5


def test_micro_batch_on_images_is_ghost_bn() -> None:
    """normlab's GhostBatchNorm2d is the oracle: each micro-batch of 4 images normalized over 4·H·W."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, 5, 5, dtype=torch.float64) * 2 + 1
    ghost = nlnn.GhostBatchNorm2d(3, virtual_batch_size=4, momentum=0.3).double()
    micro = MicroBatch(nlnn.BatchNorm2d(3, momentum=0.3).double(), 4)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ghost(xa), micro(xb)
    torch.testing.assert_close(ya, yb)
    w = torch.randn_like(ya)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ghost.running_var, micro.norm.running_var)
    # every micro-batch of 4 images has per-channel mean 0 over its 4·5·5 values
    torch.testing.assert_close(
        yb.detach().view(4, 4, 3, 25).mean((1, 3)),
        torch.zeros(4, 3, dtype=torch.float64),
        atol=1e-10,
        rtol=0,
    )


def test_convnet_shapes_and_errors() -> None:
    digits_net = convnet((1, 8, 8), 10, norm="bn")
    assert [type(m).__name__ for m in digits_net].count("Conv2d") == 2
    assert digits_net(torch.rand(3, 64)).shape == (3, 10)
    fashion = convnet((1, 28, 28), 10, norm="group")
    assert [type(m).__name__ for m in fashion].count("Conv2d") == 3
    assert fashion(torch.rand(2, 784)).shape == (2, 10)
    with pytest.raises(ValueError, match="convnet supports norm none, bn, renorm, ghost, group"):
        convnet((1, 8, 8), 10, norm="layer")
    with pytest.raises(ValueError, match=r"convnet needs images \(C, H, W\), got shape \(20,\)"):
        convnet((20,), 4)
    with pytest.raises(TypeError, match="StackedConv2d stacks Conv2d layers with numeric zero"):
        Ensemble([nn.Sequential(nn.Conv2d(1, 1, 3, padding="same")) for _ in range(2)])
