"""The ConvNet track: small_batch, noisy_bn and landscape run ConvNet units on image datasets only,
each model's claims come from its own units, and the claims say which model they were measured on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from normlab.lab.data import Dataset, load_dataset
from normlab.lab.experiments import REGISTRY, Claim
from normlab.lab.experiments._common import by_model

TRACK = ("small_batch", "noisy_bn", "landscape")


def _cnn(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in configs if c.get("model") == "cnn"]


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.mark.parametrize("name", TRACK)
def test_convnet_units_only_on_images(name: str) -> None:
    exp = REGISTRY[name]
    on_digits = exp.configs(quick=True, seeds=[0, 1], dataset="digits")
    on_synthetic = exp.configs(quick=True, seeds=[0, 1], dataset="synthetic")
    assert _cnn(on_digits) and not _cnn(on_synthetic)
    mlp_units = [c for c in on_digits if "model" not in c]
    assert mlp_units == on_synthetic  # the MLP's units (and their cache keys) are unchanged
    cnn_claims = [c for c in exp.claims if c.model == "cnn"]
    assert cnn_claims and all(c.name.endswith("_cnn") for c in cnn_claims)
    assert all("(ConvNet)" in c.statement and c.paper_value for c in cnn_claims)


@pytest.mark.parametrize("name", TRACK)
def test_convnet_units_run_and_give_their_own_claims(
    name: str, digits: Dataset, capped_training: None, tmp_path: Path
) -> None:
    """The ConvNet's units alone (12 steps): its claims have a value per seed, the MLP's have none."""
    exp = REGISTRY[name]
    configs = _cnn(exp.configs(quick=True, seeds=[0, 1], dataset="digits"))
    results = [(cfg, exp.run(cfg, digits)) for cfg in configs]
    assert by_model(results, "cnn") == results and not by_model(results, "mlp")
    claims = exp.evaluate(results, dataset="digits")
    assert [c.claim.name for c in claims] == [c.name for c in exp.claims]
    for c in claims:
        if c.claim.model == "cnn":
            assert c.n == 2, c.claim.name  # (a ratio of means may have no value after 12 steps)
        else:
            assert c.n == 0 and c.verdict == "inconclusive", c.claim.name
    assert "ConvNet" in exp.table(results)
    pngs = exp.plot(results, tmp_path)
    assert [p.name for p in pngs] == [f"{name}_cnn.png"] and pngs[0].stat().st_size > 5000


def test_claims_name_their_model() -> None:
    base = Claim("c", "s", "p", "q", ">", 0.0, "pv")
    assert base.model == "mlp" and base.for_model("mlp") is base
    cnn = base.for_model("cnn", paper_value="other")
    assert (cnn.name, cnn.model, cnn.statement, cnn.paper_value) == (
        "c_cnn",
        "cnn",
        "s (ConvNet)",
        "other",
    )
    with pytest.raises(ValueError, match="model must be 'mlp' or 'cnn', got 'rnn'"):
        Claim("c", "s", "p", "q", ">", 0.0, "pv", model="rnn")  # type: ignore[arg-type]
    assert (
        REGISTRY["noisy_bn"].claim("noisy_matches_bn", model="cnn").name == "noisy_matches_bn_cnn"
    )
