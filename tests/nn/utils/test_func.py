"""torch.func with normlab's layers: replace_all_batch_norm_modules_, and vmap over
functional_call of an ensemble (torch's model-ensembling tutorial) against a loop over the members."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

import normlab.nn as nlnn
from normlab.nn.utils import replace_all_batch_norm_modules_

NORMS = {
    "torch": lambda c: nn.BatchNorm1d(c),
    "bn": lambda c: nlnn.BatchNorm1d(c),
    "bnact": lambda c: nlnn.BatchNormAct1d(c, activation="silu"),
    "bnact_inplace": lambda c: nlnn.BatchNormAct1d(c, activation="elu"),  # keeps only its output
    "ghost": lambda c: nlnn.GhostBatchNorm1d(c, virtual_batch_size=4),
    "sync": lambda c: nlnn.SyncBatchNorm(c),
    "split": lambda c: nlnn.SplitBatchNorm1d(c),
    "renorm": lambda c: nlnn.BatchRenorm1d(c, r_max=1.5, d_max=0.5),
}


def _member(norm: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), NORMS[norm](8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():  # members that differ in their statistics too
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model


def _ensemble(members: list[nn.Module]):
    params, buffers = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")

    def call(p, b, x):
        return functional_call(base, (p, b), (x,))

    return params, buffers, call


@pytest.mark.parametrize("norm", [n for n in NORMS if n != "renorm"])
@pytest.mark.parametrize("training", [True, False])
def test_vmap_ensemble_without_running_stats_matches_a_loop(norm: str, training: bool) -> None:
    """torch.func's recipe: stop tracking, stack the parameters, vmap functional_call."""
    members = [replace_all_batch_norm_modules_(_member(norm, s)).train(training) for s in range(3)]
    params, buffers, call = _ensemble(members)
    assert not buffers  # nothing left to stack
    x = torch.randn(3, 16, 5)  # a different minibatch per member
    out = vmap(call)(params, buffers, x)
    expected = torch.stack([m(xi) for m, xi in zip(members, x)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    def loss(p, b, xi):
        return call(p, b, xi).square().mean()

    if norm == "bnact_inplace":  # torch.func.grad differentiates through the backward
        with pytest.raises(RuntimeError, match=r"torch\.func\.grad/jacrev use too"):
            vmap(grad(loss))(params, buffers, x)
        return
    grads = vmap(grad(loss))(params, buffers, x)
    for k, (m, xi) in enumerate(zip(members, x)):
        m.zero_grad()
        m(xi).square().mean().backward()
        for name, p in m.named_parameters():  # (unused in eval: a split layer's auxiliary γ/β)
            expected_grad = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(grads[name][k], expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("training", [True, False])
def test_vmap_ensemble_with_stacked_running_stats_matches_a_loop(norm: str, training: bool) -> None:
    """Without the recipe: the running buffers are stacked too, and each member's slice moves
    as that member's own buffers do in a plain forward (as torch's BatchNorm does under vmap)."""
    members = [_member(norm, s).train(training) for s in range(3)]
    params, buffers, call = _ensemble(members)
    x = torch.randn(16, 5)  # the same minibatch for every member
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to a slow per-sample loop, no warning
        out = vmap(call, in_dims=(0, 0, None))(params, buffers, x)
    expected = torch.stack([m(x) for m in members])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for name, stacked in buffers.items():
        torch.testing.assert_close(
            stacked, torch.stack([m.get_buffer(name) for m in members]), rtol=1e-6, atol=1e-7
        )
    if training:
        assert all(int(v.min()) == 1 for n, v in buffers.items() if "num_batches" in n)


def test_vmap_nonfinite_skip_is_decided_per_member() -> None:
    """A member whose batch is NaN in one channel keeps that channel's running statistics (the
    default nonfinite='skip', decided on the device under vmap); the loop agrees."""
    members = [_member("bn", s).train() for s in range(2)]
    params, buffers, call = _ensemble(members)
    x = torch.randn(2, 16, 5)
    x[1, 3, 2] = float("nan")  # member 1, feature 2 of the input: NaN in every hidden channel
    vmap(call)(params, buffers, x)
    with pytest.warns(RuntimeWarning, match="non-finite batch statistics"):
        for m, xi in zip(members, x):
            m(xi)
    for name in ("1.running_mean", "1.running_var"):
        mine = buffers[name]
        loop = torch.stack([m.get_buffer(name) for m in members])
        torch.testing.assert_close(mine, loop, equal_nan=True)
    assert torch.isfinite(buffers["1.running_mean"]).all()  # NaN channels were skipped


def test_vmap_with_nonfinite_raise_says_why_it_cannot_run() -> None:
    members = [
        nn.Sequential(nn.Linear(5, 4), nlnn.BatchNorm1d(4, nonfinite="raise")) for _ in range(2)
    ]
    params, buffers, call = _ensemble(members)
    with pytest.raises(RuntimeError, match="nonfinite='raise' decides on the host"):
        vmap(call, in_dims=(0, 0, None))(params, buffers, torch.randn(8, 5))


def test_replace_all_matches_torch_func_and_leaves_frozen_layers() -> None:
    """Same result as torch.func.replace_all_batch_norm_modules_ on torch's layers; normlab's
    layers behave like a torch BatchNorm with track_running_stats=False."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),
        nlnn.BatchNorm2d(4),
        nlnn.GhostBatchNorm2d(4, virtual_batch_size=8),
        nlnn.FrozenBatchNorm2d(4),
    )
    ours = replace_all_batch_norm_modules_(copy.deepcopy(model))
    theirs = torch.func.replace_all_batch_norm_modules_(copy.deepcopy(model))
    for a, b in zip(ours.modules(), theirs.modules()):
        for name in ("running_mean", "running_var", "num_batches_tracked", "track_running_stats"):
            assert getattr(a, name, "-") is getattr(b, name, "-") or torch.equal(
                getattr(a, name), getattr(b, name)
            )
    assert ours[1].running_mean is None and ours[2].running_mean is None
    assert ours[4].running_mean is not None  # frozen: a fixed affine map, nothing to track
    ours.eval()
    x = torch.randn(6, 3, 2, 2)
    plain = nn.BatchNorm2d(4, track_running_stats=False).eval()
    h = ours[0](x)
    torch.testing.assert_close(ours[2](h), plain(h))
    torch.testing.assert_close(ours[3](h), plain(h))


def test_replace_all_refuses_batch_renorm_and_changes_nothing() -> None:
    model = nn.Sequential(nlnn.BatchNorm1d(4), nlnn.BatchRenorm1d(4))
    with pytest.raises(ValueError, match=r"1 \(BatchRenorm1d\) corrects toward its running"):
        replace_all_batch_norm_modules_(model)
    assert model[0].track_running_stats and model[0].running_mean is not None
    with pytest.raises(TypeError, match=r"expects an nn\.Module, got list"):
        replace_all_batch_norm_modules_([model])  # type: ignore[arg-type]
