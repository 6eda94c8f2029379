"""internal_covariate_shift, landscape_probe, gradient_report against plain autograd on copies."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

import normlab.nn as nlnn
from normlab.diagnostics import gradient_report, internal_covariate_shift, landscape_probe

loss_fn = nn.functional.cross_entropy


def _model(dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(8, 8, bias=False),
        nlnn.BatchNorm1d(8),
        nn.Tanh(),
        nn.Linear(8, 3),
    )


def _batch() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)


LAYERS = ["0", "1", "4", "5", "7"]


def _grads(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[float, dict[str, Tensor]]:
    """Loss and per-parameter gradients of a fresh copy (its buffers get the forward's updates)."""
    m = copy.deepcopy(model)
    m.zero_grad()
    loss = loss_fn(m(batch[0]), batch[1])
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in m.named_parameters()}


def _layer(tensors: dict[str, Tensor], layer: str) -> Tensor:
    return torch.cat(
        [v.flatten().double() for k, v in tensors.items() if k.rpartition(".")[0] == layer]
    )


def _moved(model: nn.Module, delta: dict[str, Tensor]) -> nn.Module:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n in delta:
                p.sub_(delta[n])
    return m


def test_gradient_report_matches_autograd() -> None:
    model, batch = _model(), _batch()
    loss, grads = _grads(model, batch)
    report = gradient_report(model, loss_fn, batch)
    assert list(report.grad_norms) == LAYERS
    assert report.loss == pytest.approx(loss, rel=1e-6)
    for layer in LAYERS:
        assert report.grad_norms[layer] == pytest.approx(
            float(_layer(grads, layer).norm()), rel=1e-5
        )
        params = {n: p.detach() for n, p in model.named_parameters()}
        assert report.param_norms[layer] == pytest.approx(
            float(_layer(params, layer).norm()), rel=1e-6
        )
    total = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))
    assert report.total_norm == pytest.approx(total, rel=1e-5)


def test_landscape_probe_matches_autograd() -> None:
    model, batch = _model(), _batch()
    steps = [0.05, 0.2, 1.0]
    probe = landscape_probe(model, loss_fn, batch, steps)
    loss, g = _grads(model, batch)
    g_norm = math.sqrt(sum(float(v.double().square().sum()) for v in g.values()))
    assert probe.loss == pytest.approx(loss, rel=1e-6) and probe.grad_norm == pytest.approx(
        g_norm, rel=1e-5
    )
    betas = []
    for i, eta in enumerate(steps):
        loss_eta, g_eta = _grads(_moved(model, {n: eta * v for n, v in g.items()}), batch)
        diff = math.sqrt(sum(float((g[n] - g_eta[n]).double().square().sum()) for n in g))
        assert probe.losses[i] == pytest.approx(loss_eta, rel=1e-5)
        assert probe.grad_diffs[i] == pytest.approx(diff, rel=1e-4, abs=1e-7)
        betas.append(diff / (eta * g_norm))
    assert probe.loss_range == pytest.approx(max(probe.losses) - min(probe.losses))
    assert probe.beta_smoothness == pytest.approx(max(betas), rel=1e-4)
    assert probe.as_dict()["step_sizes"] == steps


def test_internal_covariate_shift_matches_definition() -> None:
    model, batch, lr = _model(), _batch(), 0.5
    shift = internal_covariate_shift(model, loss_fn, batch, lr)
    assert list(shift) == LAYERS
    _, g = _grads(model, batch)
    assert shift["0"].l2 == 0.0 and shift["0"].cosine == pytest.approx(1.0)
    for i, layer in enumerate(LAYERS[1:], start=1):
        earlier = {n: lr * v for n, v in g.items() if n.rpartition(".")[0] in LAYERS[:i]}
        _, g_after = _grads(_moved(model, earlier), batch)
        a, b = _layer(g, layer), _layer(g_after, layer)
        assert shift[layer].l2 == pytest.approx(float((a - b).norm()), rel=1e-4, abs=1e-7)
        assert shift[layer].cosine == pytest.approx(float(a @ b / (a.norm() * b.norm())), rel=1e-5)
        assert shift[layer].grad_norm == pytest.approx(float(a.norm()), rel=1e-5)
    assert shift["7"].l2 > 0


@pytest.mark.parametrize("training", [True, False])
def test_parameters_buffers_grads_flags_and_rng_restored_bit_exactly(training: bool) -> None:
    model, batch = _model(dropout=0.3), _batch()
    model.train(training)
    with torch.no_grad():
        model(batch[0])  # non-default running stats
    loss_fn(model(batch[0]), batch[1]).backward()  # existing .grad must survive
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    first = gradient_report(model, loss_fn, batch)
    internal_covariate_shift(model, loss_fn, batch, 0.1)
    landscape_probe(model, loss_fn, batch, [0.1, 0.3])
    again = gradient_report(model, loss_fn, batch)
    assert first == again  # same dropout masks, same buffers every time
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    assert [m.training for m in model.modules()] == flags


def test_probe_errors() -> None:
    model, batch = _model(), _batch()
    with pytest.raises(TypeError, match=r"batch must be a pair \(x, y\), got Tensor"):
        gradient_report(model, loss_fn, batch[0])
    with pytest.raises(ValueError, match="lr must be a positive finite number, got 0"):
        internal_covariate_shift(model, loss_fn, batch, 0)
    with pytest.raises(
        ValueError, match=r"step_sizes must be a non-empty sequence of positive numbers, got \[\]"
    ):
        landscape_probe(model, loss_fn, batch, [])
    with pytest.raises(
        ValueError, match="step_sizes must be a non-empty sequence of positive numbers"
    ):
        landscape_probe(model, loss_fn, batch, [0.1, -1.0])
    frozen = _model().requires_grad_(False)
    with pytest.raises(ValueError, match="the model has no trainable parameters"):
        gradient_report(frozen, loss_fn, batch)
    with pytest.raises(ValueError, match=r"loss_fn\(model\(x\), y\) must return a scalar tensor"):
        gradient_report(model, lambda out, y: out, batch)
