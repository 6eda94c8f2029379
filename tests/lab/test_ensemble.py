"""Batched ensembles equal each member trained alone with torch.optim; stacking is opt-in; MicroBatch is Ghost BN."""

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
    TrainConfig,
    evaluate,
    member_batches,
    stack_layers,
    train_ensemble,
)
from normlab.lab.models import MicroBatch, mlp


@pytest.fixture(scope="module")
def data() -> Dataset:
    return load_dataset("synthetic")


def _sequential(
    model: nn.Sequential, data: Dataset, cfg: TrainConfig, seed: int, lr: float
) -> nn.Sequential:
    """The oracle: one member, torch.optim, the same data order."""
    opt = (
        torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum)
        if cfg.optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=lr)
    )
    draw = member_batches(len(data.y_train), cfg.batch_size, [seed])
    model.train()
    for step in range(cfg.total_steps(len(data.y_train))):
        idx = draw(step)[0]
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize(
    ("norm", "optimizer", "momentum", "extra"),
    # (Adam amplifies rounding noise on near-zero gradients, so it is checked where those are rare;
    #  GroupNorm uses 2 groups of 8 channels: 2-channel groups are too ill-conditioned to compare.)
    [
        ("bn", "sgd", 0.9, {}),
        ("none", "sgd", 0.0, {}),
        ("layer", "adam", 0.0, {}),
        ("group", "sgd", 0.5, {"norm_kwargs": {"num_groups": 2}}),
        ("bn_after", "sgd", 0.9, {}),
        ("renorm", "sgd", 0.9, {"norm_kwargs": {"r_max": 2.0, "d_max": 1.0}}),
        ("bn", "sgd", 0.9, {"micro_batch": 8}),
    ],
)
def test_ensemble_equals_sequential(
    data: Dataset, norm: str, optimizer: str, momentum: float, extra: dict[str, Any]
) -> None:
    seeds = [0, 1, 2]
    lrs = [0.05, 0.1, 0.02] if optimizer == "sgd" else [2e-3] * 3
    cfg = TrainConfig(
        optimizer=optimizer, lr=lrs, momentum=momentum, batch_size=32, steps=12, eval_every=5
    )

    def make(seed: int) -> nn.Sequential:
        return mlp(
            data.in_features, 2, 16, data.num_classes, norm=norm, init="he", seed=seed, **extra
        )

    results, ens = train_ensemble([make(s) for s in seeds], data, cfg, seeds=seeds)
    trained = ens.to_models()
    for k, s in enumerate(seeds):
        ref = _sequential(make(s), data, cfg, s, lrs[k])
        for (name, a), (_, b) in zip(trained[k].state_dict().items(), ref.state_dict().items()):
            # Batched and single matmuls round differently; a nearly dead ReLU before a BN
            # (bn_after) amplifies that by orders of magnitude within ~20 steps (float64 too), so
            # the comparison stops at 12 steps, where every case agrees to ~1e-6.
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5, msg=name)
        with torch.no_grad():
            acc = (ref(data.x_test).argmax(1) == data.y_test).float().mean().item()
        assert results[k].final_test_acc == pytest.approx(acc, abs=1e-6)
        assert results[k].steps == [0, 5, 10, 12]


def test_forward_outputs_and_roundtrip(data: Dataset) -> None:
    members = [mlp(data.in_features, 3, 8, data.num_classes, norm="bn", seed=s) for s in range(4)]
    for m in members:  # non-trivial running statistics
        m.train()(data.x_train[:64])
    ens = Ensemble(members).eval()
    x = data.x_test[:5]
    logits = ens(x)
    assert logits.shape == (4, 5, data.num_classes)
    for k, m in enumerate(members):
        torch.testing.assert_close(logits[k], m.eval()(x), rtol=1e-5, atol=1e-6)
    outs = ens.outputs(x)
    assert len(outs) == len(members[0]) and torch.equal(outs[-1], logits)
    for a, b in zip(ens.to_models(), members):
        for (na, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(ta, tb), na


def test_outputs_in_training_mode_leave_the_model_unchanged(data: Dataset) -> None:
    ens = Ensemble(
        [mlp(data.in_features, 2, 8, data.num_classes, norm="bn", seed=s) for s in (0, 1)]
    )
    ens.eval()
    before = [b.clone() for b in ens.buffers()]
    train_out = ens.outputs(data.x_test[:32], train=True)
    eval_out = ens.outputs(data.x_test[:32])
    assert not torch.allclose(train_out[1], eval_out[1])  # batch vs running statistics
    assert all(torch.equal(a, b) for a, b in zip(before, ens.buffers())) and not ens.training
    # batch statistics: each unit of member 0 has mean ≈ 0 after its BN
    torch.testing.assert_close(train_out[1][0].mean(0), torch.zeros(8), atol=1e-5, rtol=0)


def test_members_train_on_their_own_inputs(data: Dataset) -> None:
    """A list of datasets (same samples and labels, transformed) = training each on its own."""
    doubled = Dataset(
        data.name,
        data.x_train * 2 - 1,
        data.y_train,
        data.x_test * 2 - 1,
        data.y_test,
        data.image_shape,
        data.num_classes,
        "doubled",
    )
    cfg = TrainConfig(lr=0.1, batch_size=32, steps=15, eval_every=None)
    make = [mlp(data.in_features, 2, 16, data.num_classes, init="he", seed=s) for s in (0, 1)]
    results, _ = train_ensemble(make, [data, doubled], cfg, seeds=[0, 1])
    alone, _ = train_ensemble(
        [mlp(data.in_features, 2, 16, data.num_classes, init="he", seed=1)], doubled, cfg, seeds=[1]
    )
    assert results[1].final_test_acc == pytest.approx(alone[0].final_test_acc, abs=1e-6)
    with pytest.raises(ValueError, match="share their labels and input shapes"):
        shuffled = Dataset(
            data.name,
            data.x_train,
            data.y_train.flip(0),
            data.x_test,
            data.y_test,
            data.image_shape,
            data.num_classes,
            "x",
        )
        train_ensemble(make, [data, shuffled], cfg, seeds=[0, 1])
    with pytest.raises(ValueError, match="need one dataset per model: 2 models, 1 datasets"):
        train_ensemble(make, [data], cfg, seeds=[0, 1])


def test_evaluate_accepts_shared_per_member_and_indexed_inputs(data: Dataset) -> None:
    ens = Ensemble([mlp(data.in_features, 1, 8, data.num_classes, seed=s) for s in (0, 1)])
    x, y = data.x_test, data.y_test
    shared = evaluate(ens, x, y, chunk=7)
    stacked = evaluate(ens, torch.stack([x, x]), y)
    indexed = evaluate(ens, x.unsqueeze(0), y, which=torch.tensor([0, 0]))
    for other in (stacked, indexed):
        torch.testing.assert_close(shared[0], other[0])
        torch.testing.assert_close(shared[1], other[1])


def test_divergence_is_recorded_per_member_and_frozen(data: Dataset) -> None:
    seeds = [0, 1]
    models = [mlp(data.in_features, 4, 32, data.num_classes, init="he", seed=s) for s in seeds]
    cfg = TrainConfig(lr=[0.05, 50.0], batch_size=32, steps=40, eval_every=10)
    results, ens = train_ensemble(models, data, cfg, seeds=seeds)
    assert not results[0].diverged and results[0].final_test_acc > 0.5
    assert results[1].diverged and results[1].diverged_step is not None
    assert results[1].steps[-1] <= results[1].diverged_step + 10  # no curve after divergence
    assert torch.isfinite(ens.layers[0].weight[0]).all()  # the healthy member is untouched


def test_member_batches_depend_on_the_seed_only() -> None:
    alone = member_batches(100, 10, [7])
    together = member_batches(100, 10, [3, 7])
    for step in (0, 5, 9, 10, 23):  # across epochs
        assert torch.equal(alone(step)[0], together(step)[1])
    epoch = torch.cat([alone(s)[0] for s in range(10)])
    assert sorted(epoch.tolist()) == list(range(100))  # a permutation per epoch
    with pytest.raises(ValueError, match="batch_size=200 exceeds the 100 training samples"):
        member_batches(100, 200, [0])


def test_errors(data: Dataset) -> None:
    models = [mlp(data.in_features, 1, 4, data.num_classes, seed=0)]
    with pytest.raises(ValueError, match="need one seed per model: 1 models, 2 seeds"):
        train_ensemble(models, data, TrainConfig(steps=1), seeds=[0, 1])
    with pytest.raises(ValueError, match="give exactly one of epochs and steps"):
        train_ensemble(models, data, TrainConfig(), seeds=[0])
    with pytest.raises(ValueError, match="need one lr per model: 1 models, 2 learning rates"):
        train_ensemble(models, data, TrainConfig(steps=1, lr=[0.1, 0.2]), seeds=[0])
    with pytest.raises(ValueError, match="optimizer must be 'sgd' or 'adam', got 'rmsprop'"):
        train_ensemble(models, data, TrainConfig(steps=1, optimizer="rmsprop"), seeds=[0])
    two = [mlp(data.in_features, 1, 4, data.num_classes, seed=s) for s in (0, 1)]
    with pytest.raises(ValueError, match="per-member learning rates need optimizer='sgd'"):
        train_ensemble(
            two, data, TrainConfig(steps=1, optimizer="adam", lr=[0.1, 0.2]), seeds=[0, 1]
        )
    with pytest.raises(ValueError, match="same architecture"):
        Ensemble([models[0], mlp(data.in_features, 2, 4, data.num_classes)])
    with pytest.raises(ValueError, match="same architecture"):
        Ensemble([models[0], mlp(data.in_features, 1, 5, data.num_classes)])
    with pytest.raises(ValueError, match="at least one member"):
        Ensemble([])


def test_stacking_is_opt_in() -> None:
    class Stateful(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("count", torch.zeros(()))

    with pytest.raises(TypeError, match="cannot stack Stateful layers: register a stacker"):
        stack_layers([Stateful(), Stateful()])
    relu = nn.ReLU()
    assert stack_layers([relu, nn.ReLU()]) is relu  # elementwise and stateless: shared


def test_micro_batch_bn_is_ghost_bn() -> None:
    """normlab's GhostBatchNorm1d is the oracle: outputs, gradients and running statistics."""
    torch.manual_seed(0)
    x = torch.randn(32, 6, dtype=torch.float64) * 3 + 1
    ghost = nlnn.GhostBatchNorm1d(6, virtual_batch_size=4, momentum=0.3).double()
    micro = MicroBatch(nlnn.BatchNorm1d(6, momentum=0.3).double(), 4)
    with torch.no_grad():
        for m in (ghost.weight, micro.norm.weight):
            m.copy_(torch.linspace(0.5, 2, 6))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ghost(xa), micro(xb)
    torch.testing.assert_close(ya, yb)
    (ya * torch.arange(6.0, dtype=torch.float64)).sum().backward()
    (yb * torch.arange(6.0, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ghost.weight.grad, micro.norm.weight.grad)
    torch.testing.assert_close(ghost.running_mean, micro.norm.running_mean)
    torch.testing.assert_close(ghost.running_var, micro.norm.running_var)
    assert int(micro.norm.num_batches_tracked) == 1
    torch.testing.assert_close(ghost.eval()(x), micro.eval()(x))
    copy.deepcopy(micro.train())  # no autograd graph is kept between forwards


def test_micro_batch_renorm_uses_the_running_statistics_before_the_step() -> None:
    """Each micro-batch is corrected toward the same (pre-step) running statistics; with
    r_max = 1, d_max = 0 Renorm is BN, and the counter moves once per step."""
    torch.manual_seed(1)
    x = torch.randn(16, 5) * 2 + 3
    bn = MicroBatch(nlnn.BatchNorm1d(5), 4)
    rn = MicroBatch(nlnn.BatchRenorm1d(5, r_max=1.0, d_max=0.0), 4)
    torch.testing.assert_close(bn(x), rn(x))
    torch.testing.assert_close(bn.norm.running_var, rn.norm.running_var)
    loose = MicroBatch(nlnn.BatchRenorm1d(5, r_max=3.0, d_max=5.0), 4)
    loose(x)
    loose(x)
    assert int(loose.norm.num_batches_tracked) == 2
    with pytest.raises(
        ValueError, match="a batch of 10 samples is not a whole number of micro-batches of 4"
    ):
        bn(torch.randn(10, 5))
    with pytest.raises(ValueError, match="micro-batch size must be >= 2, got 1"):
        MicroBatch(nlnn.BatchNorm1d(5), 1)
    with pytest.raises(TypeError, match="MicroBatch wraps a batch-norm layer, got Linear"):
        MicroBatch(nn.Linear(2, 2), 2)  # type: ignore[arg-type]


def test_functional_call_leaves_a_batch_norm_ensemble_as_it_was() -> None:
    """Each stacked parameter has one name (a layer registered twice made torch.func's
    functional_call turn the stacked γ/β into plain tensors)."""
    from torch.func import functional_call

    ens = Ensemble([mlp(8, 2, 16, 3, norm="bn", init="he", seed=s) for s in range(3)]).train()
    before = {k: v.clone() for k, v in ens.state_dict().items()}
    params = dict(ens.named_parameters())
    x = torch.randn(3, 10, 8)
    out = functional_call(ens, {k: v * 2.0 for k, v in params.items()}, (x,))
    assert out.shape == (3, 10, 3)
    for name, p in ens.named_parameters():
        assert type(p) is nn.Parameter, name
        torch.testing.assert_close(p, before[name])
