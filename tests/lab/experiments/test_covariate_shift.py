"""covariate_shift: Santurkar's Definition 2.1 on the ensemble against plain torch, and the claims."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.lab.data import Dataset
from normlab.lab.ensemble import Ensemble
from normlab.lab.experiments import REGISTRY, Results
from normlab.lab.experiments.covariate_shift import gradient_shift
from normlab.lab.experiments.noisy_bn import DEPTH
from normlab.lab.experiments.noisy_bn import model as arm_model

EXP = REGISTRY["covariate_shift"]


def _oracle(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, lr: float) -> list[list[float]]:
    """Definition 2.1 with plain torch on one model: per Linear after the first, (‖G − G'‖, cos)."""
    model = model.train()
    params = list(model.named_parameters())
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), [p for _, p in params])
    for n, b in model.named_buffers():  # the first forward moved the running statistics
        b.copy_(buffers[n])
    linears = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    out = []
    for j in linears[1:]:
        w = model[j].weight
        g = grads[[p is w for _, p in params].index(True)]
        saved = [p.detach().clone() for _, p in params]
        with torch.no_grad():
            for (name, p), gp in zip(params, grads):
                if int(name.split(".")[0]) < j:
                    p -= lr * gp
        g2 = torch.autograd.grad(F.cross_entropy(model(x), y), [w])[0]
        with torch.no_grad():
            for (_, p), s in zip(params, saved):
                p.copy_(s)
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
        out.append(
            [float((g - g2).norm()), float(F.cosine_similarity(g.flatten(), g2.flatten(), 0))]
        )
    return out


@pytest.mark.parametrize("arm", ["plain", "bn"])
def test_gradient_shift_matches_torch_on_each_member(arm: str, synthetic: Dataset) -> None:
    torch.manual_seed(0)
    models = [arm_model(synthetic, arm, s) for s in (0, 1)]
    ens = Ensemble(models).train()
    x, y = synthetic.x_train[:32], synthetic.y_train[:32]
    before = [p.detach().clone() for p in ens.parameters()]
    buffers = [b.clone() for b in ens.buffers()]
    out = gradient_shift(ens, x, y, lr=0.5)
    assert out["l2"].shape == (2, DEPTH) and out["cos"].shape == (2, DEPTH)
    for k, member in enumerate(models):
        ref = torch.tensor(_oracle(member, x, y, 0.5))  # (DEPTH, 2)
        torch.testing.assert_close(out["l2"][k], ref[:, 0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out["cos"][k], ref[:, 1], rtol=1e-4, atol=1e-5)
    assert (out["l2"] > 0).all()  # the earlier layers moved: the gradient changed
    assert all(torch.equal(a, b) for a, b in zip(before, ens.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, ens.buffers()))


def test_noise_is_drawn_once_for_g_and_g_prime(synthetic: Dataset) -> None:
    ens = Ensemble([arm_model(synthetic, "noisy_bn", s) for s in (0, 1)]).train()
    gens = [
        m.generator
        for m in ens.modules()
        if isinstance(getattr(m, "generator", None), torch.Generator)
    ]
    states = [g.get_state() for g in gens]
    x, y = synthetic.x_train[:32], synthetic.y_train[:32]
    still = gradient_shift(ens, x, y, lr=0.0)  # no update: G' is G when the noise is the same
    assert gens and float(still["l2"].abs().max()) == 0.0
    torch.testing.assert_close(still["cos"], torch.ones_like(still["cos"]))
    assert all(
        torch.equal(s, g.get_state()) for s, g in zip(states, gens)
    )  # training's draws untouched
    assert float(gradient_shift(ens, x, y, lr=0.5)["l2"].min()) > 0


def _results(l2: dict[str, float], cos: dict[str, float], loss: dict[str, float]) -> Results:
    out: Results = []
    for arm in ("plain", "bn", "noisy_bn"):
        members: list[dict[str, Any]] = []
        for i in range(5):
            wiggle = 1 + 0.05 * i
            members.append(
                {
                    "seed": i,
                    "final_test_acc": 0.9,
                    "diverged": False,
                    "train_loss": [float("nan"), loss[arm] * wiggle, loss[arm] * wiggle],
                    "l2": [[l2[arm] * wiggle] * 3] * 4,
                    "cos": [[cos[arm] + 0.01 * i] * 3] * 4,
                    "norm": [[1.0] * 3] * 4,
                }
            )
        out.append(({"arm": arm, "seeds": list(range(5))}, {"members": members}))
    return out


def test_claims_on_hand_made_measures() -> None:
    arms = ("plain", "bn", "noisy_bn")
    larger = _results(
        dict(zip(arms, (1.0, 2.0, 3.0))),
        dict(zip(arms, (0.9, 0.7, 0.5))),
        dict(zip(arms, (0.5, 0.1, 0.1))),
    )
    claims = {c.claim.name: c for c in EXP.evaluate(larger, dataset="digits")}
    assert claims["bn_shift_not_smaller"].estimate == pytest.approx(2.0)
    assert claims["bn_shift_not_smaller"].verdict == "confirmed"
    assert claims["bn_cosine_not_higher"].values == pytest.approx([-0.2] * 5)
    assert claims["bn_cosine_not_higher"].verdict == "confirmed"
    assert claims["bn_trains_better"].estimate == pytest.approx(0.2)
    assert claims["bn_trains_better"].verdict == "confirmed"
    # BN reducing the shift as Ioffe & Szegedy proposed: the claim is refuted
    smaller = _results(
        dict(zip(arms, (1.0, 0.3, 0.3))),
        dict(zip(arms, (0.5, 0.9, 0.9))),
        dict(zip(arms, (0.1, 0.5, 0.5))),
    )
    claims = {c.claim.name: c for c in EXP.evaluate(smaller, dataset="digits")}
    assert [
        claims[n].verdict
        for n in ("bn_shift_not_smaller", "bn_cosine_not_higher", "bn_trains_better")
    ] == ["refuted"] * 3


def test_quick_run_probes_every_member(synthetic: Dataset, capped_training: None) -> None:
    configs = EXP.configs(quick=True, seeds=[0, 1], dataset="synthetic")
    assert [c["arm"] for c in configs] == ["plain", "bn", "noisy_bn"]
    metrics = EXP.run(configs[1], synthetic)
    m = metrics["members"][0]
    assert m["probe_steps"] == [0, 12]  # step 0 and the end of the capped run
    assert len(m["l2"]) == 2 and len(m["l2"][0]) == DEPTH
    assert all(v > 0 for row in m["l2"] for v in row)
