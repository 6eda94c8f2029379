"""Momentum conventions and BatchNorm from Keras weights (the Keras formula written out is the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normlab.nn.utils import batchnorm_from_keras, convert_momentum


@pytest.mark.parametrize(
    ("value", "source", "target", "expected"),
    [
        (0.99, "keras", "torch", 0.01),
        (0.1, "torch", "flax", 0.9),
        (0.9, "flax", "keras", 0.9),
        (0.3, "torch", "torch", 0.3),
    ],
)
def test_convert_momentum(value: float, source: str, target: str, expected: float) -> None:
    assert convert_momentum(value, source, target) == pytest.approx(expected)


def test_convert_momentum_errors() -> None:
    with pytest.raises(ValueError, match="unknown momentum convention 'tf'"):
        convert_momentum(0.9, "tf", "torch")
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 1.5"):
        convert_momentum(1.5, "keras", "torch")


def _keras_step(
    x: np.ndarray, state: dict[str, np.ndarray], *, training: bool, m: float, eps: float
) -> np.ndarray:
    """keras.layers.BatchNormalization's formula over the last axis."""
    axes = tuple(range(x.ndim - 1))
    if training:
        mean, var = x.mean(axes), x.var(axes)  # biased, as tf.nn.moments
        state["mean"] = m * state["mean"] + (1 - m) * mean
        state["var"] = m * state["var"] + (1 - m) * var
    else:
        mean, var = state["mean"], state["var"]
    return state["gamma"] * (x - mean) / np.sqrt(var + eps) + state["beta"]


@pytest.mark.parametrize("shape", [(16, 5), (4, 7, 5)])
def test_batchnorm_from_keras_equals_keras_in_both_modes(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    state = {
        "gamma": rng.uniform(0.5, 1.5, 5),
        "beta": rng.normal(size=5),
        "mean": rng.normal(size=5),
        "var": rng.uniform(0.5, 2, 5),
    }
    bn = batchnorm_from_keras(
        state["gamma"], state["beta"], state["mean"], state["var"], momentum=0.9, epsilon=1e-3
    )
    for _step in range(4):
        x = rng.normal(2, 3, size=shape).astype(np.float32)
        ref = _keras_step(x.astype(np.float64), state, training=True, m=0.9, eps=1e-3)
        np.testing.assert_allclose(
            bn.train()(torch.from_numpy(x)).detach().numpy(), ref, rtol=1e-4, atol=1e-4
        )
    np.testing.assert_allclose(bn.running_var.numpy(), state["var"], rtol=1e-5)
    x = rng.normal(size=shape).astype(np.float32)
    ref = _keras_step(x.astype(np.float64), state, training=False, m=0.9, eps=1e-3)
    np.testing.assert_allclose(
        bn.eval()(torch.from_numpy(x)).detach().numpy(), ref, rtol=1e-4, atol=1e-4
    )


def test_batchnorm_from_keras_errors() -> None:
    with pytest.raises(
        ValueError, match="moving_mean and moving_variance must be 1-D of the same length"
    ):
        batchnorm_from_keras(None, None, np.zeros(3), np.ones(4))
