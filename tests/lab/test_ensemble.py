"""Batched ensembles equal sequential training of each member with torch.optim (1e-5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normlab.lab.data import load_dataset
from normlab.lab.ensemble import EnsembleMLP, TrainConfig, _member_batches, train_ensemble
from normlab.lab.models import mlp


def _sequential(
    model: torch.nn.Sequential, data, cfg: TrainConfig, seed: int, lr: float
) -> torch.nn.Sequential:
    opt = (
        torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum)
        if cfg.optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=lr)
    )
    draw = _member_batches(len(data.y_train), cfg.batch_size, seed)
    model.train()
    for step in range(cfg.total_steps(len(data.y_train))):
        idx = draw(step)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize(
    ("norm", "optimizer", "momentum"),
    # (Adam amplifies rounding noise on near-zero gradients, so it is checked where those are rare;
    #  GroupNorm uses 2 groups of 8 channels: 2-channel groups are too ill-conditioned to compare.)
    [
        ("bn", "sgd", 0.9),
        ("none", "sgd", 0.0),
        ("layer", "adam", 0.0),
        ("group", "sgd", 0.5),
        ("bn_after", "sgd", 0.9),
    ],
)
def test_ensemble_equals_sequential(norm: str, optimizer: str, momentum: float) -> None:
    data = load_dataset("synthetic")
    seeds, lrs = [0, 1, 2], [0.05, 0.1, 0.02] if optimizer == "sgd" else [1e-3, 3e-3, 2e-3]
    cfg = TrainConfig(
        optimizer=optimizer, lr=lrs, momentum=momentum, batch_size=32, steps=25, eval_every=10
    )
    kwargs = {"num_groups": 2} if norm == "group" else None

    def make(seed: int) -> torch.nn.Sequential:
        return mlp(
            data.in_features,
            2,
            16,
            data.num_classes,
            norm=norm,
            init="he",
            seed=seed,
            norm_kwargs=kwargs,
        )

    results, trained = train_ensemble([make(s) for s in seeds], data, cfg, seeds=seeds)
    for k, s in enumerate(seeds):
        ref = _sequential(make(s), data, cfg, s, lrs[k])
        for (name, a), (_, b) in zip(trained[k].state_dict().items(), ref.state_dict().items()):
            # 25 SGD steps (momentum 0.9) amplify fp32 rounding differences of batched vs single
            # matmuls to a few 1e-5 relative on some CPUs: rtol 1e-4 still catches any real error.
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5, msg=name)
        with torch.no_grad():
            acc = (ref(data.x_test).argmax(1) == data.y_test).float().mean().item()
        assert results[k].final_test_acc == pytest.approx(acc, abs=1e-6)
        assert results[k].steps == [0, 10, 20, 25]


def test_forward_hidden_and_roundtrip() -> None:
    data = load_dataset("synthetic")
    members = [mlp(data.in_features, 3, 8, data.num_classes, norm="bn", seed=s) for s in range(4)]
    ens = EnsembleMLP(members).eval()
    logits, pre, post = ens.forward_hidden(data.x_test[:5])
    assert logits.shape == (4, 5, data.num_classes) and len(pre) == len(post) == 3
    for k, m in enumerate(members):
        torch.testing.assert_close(logits[k], m.eval()(data.x_test[:5]), rtol=1e-5, atol=1e-6)
    for a, b in zip(ens.to_models(), members):
        for (na, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(ta, tb), na


def test_divergence_is_recorded_per_member() -> None:
    data = load_dataset("synthetic")
    seeds = [0, 1]
    models = [mlp(data.in_features, 4, 32, data.num_classes, init="he", seed=s) for s in seeds]
    cfg = TrainConfig(lr=[0.05, 50.0], batch_size=32, steps=40, eval_every=10)
    results, _ = train_ensemble(models, data, cfg, seeds=seeds)
    assert not results[0].diverged and results[0].final_test_acc > 0.5
    assert results[1].diverged and results[1].diverged_step is not None


def test_errors() -> None:
    data = load_dataset("synthetic")
    models = [mlp(data.in_features, 1, 4, data.num_classes, seed=0)]
    with pytest.raises(ValueError, match="need one seed per model: 1 models, 2 seeds"):
        train_ensemble(models, data, TrainConfig(steps=1), seeds=[0, 1])
    with pytest.raises(ValueError, match="give exactly one of epochs and steps"):
        train_ensemble(models, data, TrainConfig(), seeds=[0])
    with pytest.raises(ValueError, match="same architecture"):
        EnsembleMLP([models[0], mlp(data.in_features, 2, 4, data.num_classes)])
