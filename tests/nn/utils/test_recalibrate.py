"""recalibrate_batchnorm: running stats = mean of batch means / unbiased variances of the BN inputs."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import normlab.nn as nlnn
from normlab.nn.utils import recalibrate_batchnorm


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, momentum=0.3),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(4, 5, 1),
        nlnn.BatchNorm2d(5),
    )


def _oracle(model: nn.Sequential, batches: list[Tensor]) -> dict[int, tuple[Tensor, Tensor]]:
    """Batch means / unbiased vars of each BN's input, BNs in train mode, the rest in eval (torch ops)."""
    sums: dict[int, list[Tensor]] = {1: [], 5: []}
    model.eval()
    for m in (model[1], model[5]):
        m.train()
    with torch.no_grad():
        for x in batches:
            for i, layer in enumerate(model):
                if i in sums:
                    sums[i].append(
                        torch.stack([x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)])
                    )
                x = layer(x)
    return {i: tuple(torch.stack(v).double().mean(0).float()) for i, v in sums.items()}  # type: ignore[misc]


def test_running_stats_are_the_averages_of_batch_statistics() -> None:
    model = _model()
    batches = [torch.randn(6, 3, 7, 7) * (1 + i) + i for i in range(5)]
    expected = _oracle(_model(), batches)
    model.train()
    model[3].eval()  # a mixed set of flags to be restored
    flags = [m.training for m in model.modules()]
    out = recalibrate_batchnorm(model, [(x, torch.zeros(6)) for x in batches], progress=False)
    assert out is model
    for i, (mean, var) in expected.items():
        torch.testing.assert_close(model[i].running_mean, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model[i].running_var, var, rtol=1e-5, atol=1e-5)
        assert int(model[i].num_batches_tracked) == 5
    assert model[1].momentum == 0.3 and model[5].momentum == 0.1
    assert [m.training for m in model.modules()] == flags


def test_num_batches_limits_and_plain_tensors_work() -> None:
    model = _model()
    batches = [torch.randn(4, 3, 5, 5) + i for i in range(4)]
    expected = _oracle(_model(), batches[:2])
    recalibrate_batchnorm(model, iter(batches), num_batches=2, progress=False)
    torch.testing.assert_close(model[1].running_mean, expected[1][0], rtol=1e-5, atol=1e-5)
    assert int(model[5].num_batches_tracked) == 2


def test_only_batchnorm_buffers_change() -> None:
    model = _model()
    params = {k: v.clone() for k, v in model.named_parameters()}
    recalibrate_batchnorm(model, [torch.randn(4, 3, 5, 5)], progress=False)
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k])


def test_nonfinite_batches_are_left_out_with_a_warning() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    good = torch.randn(8, 3)
    bad = good.clone()
    bad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"0: 1 of 2 batches had non-finite statistics"):
        recalibrate_batchnorm(model, [bad, good], progress=False)
    torch.testing.assert_close(model[0].running_mean, good.mean(0))
    torch.testing.assert_close(model[0].running_var, good.var(0))


def test_errors() -> None:
    with pytest.raises(ValueError, match="num_batches must be at least 1, got 0"):
        recalibrate_batchnorm(_model(), [], num_batches=0)
    with pytest.raises(ValueError, match="the model has no BatchNorm with running statistics"):
        recalibrate_batchnorm(nn.Linear(2, 2), [torch.randn(2, 2)])
    with pytest.raises(ValueError, match="data yielded no batches"):
        recalibrate_batchnorm(_model(), [], progress=False)
    with pytest.raises(
        TypeError, match="data must yield tensors or tuples/lists whose first element"
    ):
        recalibrate_batchnorm(_model(), [{"x": 1}], progress=False)
