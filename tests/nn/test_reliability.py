"""Regression tests of the reliability issue: every entry point validates before a kernel runs.

Each case once crashed the process, returned garbage, or poisoned state silently.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings

import pytest
import torch
from torch import nn

import normlab.nn as nlnn
from normlab.functional import Ramp, batch_norm, batch_norm_train
from normlab.kernels import FusedKernel, fused_available

needs_fused = pytest.mark.skipif(not fused_available(), reason="no C++ compiler/ninja")

# every layer class, with an input of the right rank for 3 channels
LAYERS = [
    (nlnn.BatchNorm1d, (4, 3)),
    (nlnn.BatchNorm2d, (4, 3, 5, 5)),
    (nlnn.BatchNorm3d, (4, 3, 2, 3, 3)),
    (nlnn.BatchNormAct1d, (4, 3, 6)),
    (nlnn.BatchNormAct2d, (4, 3, 5, 5)),
    (nlnn.BatchRenorm2d, (4, 3, 5, 5)),
    (nlnn.GhostBatchNorm2d, (4, 3, 5, 5)),
    (nlnn.SyncBatchNorm, (4, 3, 5, 5)),
]
BACKENDS = ["auto", "reference", "native", *(["fused"] if fused_available() else [])]


# --- item 1: channel counts ----------------------------------------------------------------
def test_huge_channel_mismatch_raises_instead_of_crashing() -> None:
    """BatchNorm1d(3) on (2, 400000) killed the process with SIGSEGV (train, default backend)."""
    with pytest.raises(RuntimeError, match="running_mean should contain 400000 elements not 3"):
        nlnn.BatchNorm1d(3)(torch.randn(2, 400_000))
    with (
        torch.no_grad(),
        pytest.raises(RuntimeError, match="running_mean should contain 4000000 elements not 3"),
    ):
        nlnn.BatchNorm1d(3).eval()(torch.randn(2, 4_000_000))


@pytest.mark.parametrize(("cls", "shape"), LAYERS, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_layer_checks_channels_like_torch(
    cls: type, shape: tuple[int, ...], training: bool, backend: str
) -> None:
    """The layer built for 64 channels fed 3, and for 2 channels fed 3: torch's error, state intact."""
    for features in (64, 2):
        layer = cls(features, backend=backend).train(training)
        before = copy.deepcopy(layer.state_dict())
        with pytest.raises(
            RuntimeError, match=f"running_mean should contain 3 elements not {features}"
        ):
            layer(torch.randn(shape))
        for k, v in layer.state_dict().items():
            assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_running_stats_the_weight_is_checked(backend: str) -> None:
    layer = nlnn.BatchNorm2d(64, track_running_stats=False, backend=backend)
    with pytest.raises(RuntimeError, match="weight should contain 3 elements not 64"):
        layer(torch.randn(8, 3, 4, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_checks_every_per_channel_tensor(backend: str) -> None:
    """A 3-element weight on 64 channels returned Inf/NaN on every backend but the reference."""
    x = torch.randn(8, 64, 4, 4)
    ok, bad = torch.ones(64), torch.ones(3)
    cases = [
        ({"running_mean": bad, "running_var": ok}, "running_mean should contain 64 elements not 3"),
        ({"running_mean": ok, "running_var": bad}, "running_var should contain 64 elements not 3"),
        ({"weight": bad}, "weight should contain 64 elements not 3"),
        ({"bias": bad}, "bias should contain 64 elements not 3"),
    ]
    for training in (True, False):
        for given, match in cases:
            args = {"running_mean": ok.clone() - 1, "running_var": ok.clone(), **given}
            with pytest.raises(RuntimeError, match=match):
                batch_norm(x, training=training, backend=backend, **args)
    with pytest.raises(RuntimeError, match="weight should contain 64 elements not 3"):
        batch_norm_train(x, bad, None, 1e-5, backend=backend)


def test_functional_input_checks() -> None:
    with pytest.raises(
        TypeError, match=r"batch_norm expects a floating-point input, got torch\.int64"
    ):
        batch_norm(torch.ones(4, 3, dtype=torch.long), None, None, training=True)
    with pytest.raises(TypeError, match=r"batch_norm expects a torch\.Tensor input, got list"):
        batch_norm([[1.0, 2.0]], None, None, training=True)  # type: ignore[arg-type]
    long_mean = torch.zeros(3, dtype=torch.long)
    with pytest.raises(TypeError, match="running_mean must be a floating-point tensor"):
        batch_norm(torch.randn(4, 3), long_mean, torch.ones(3), training=True)
    with pytest.raises(RuntimeError, match="expect parameter to have scalar type of Float"):
        batch_norm(torch.randn(4, 3), long_mean, torch.ones(3))  # eval: torch's own check
    with pytest.raises(ValueError, match="needs both running_mean and running_var, or neither"):
        batch_norm(torch.randn(4, 3), torch.zeros(3), None, training=True)


@needs_fused
def test_cpp_kernels_check_their_arguments() -> None:
    """No future Python path can reach the C++ kernels unchecked (TORCH_CHECK)."""
    ops = torch.ops.normlab_fused
    x = torch.randn(4, 64, 3)
    with pytest.raises(RuntimeError, match="weight should contain 64 elements not 3"):
        ops.forward_train(x, torch.ones(3), None, 1e-5, 0, 0.0, None)
    with pytest.raises(RuntimeError, match="running_var should contain 64 elements not 3"):
        ops.forward_eval(x, torch.zeros(64), torch.ones(3), None, None, 1e-5, 0, 0.0)
    with pytest.raises(RuntimeError, match="mean should contain 64 elements not 2"):
        ops.backward_train(
            x, x, None, None, torch.zeros(2), torch.ones(64), 0, 0.0, [True, True, True], None
        )
    with pytest.raises(RuntimeError, match="the gradient has shape"):
        ops.backward_train(
            x[:2], x, None, None, torch.zeros(64), torch.ones(64), 0, 0.0, [True, True, True], None
        )
    with pytest.raises(TypeError, match="expected a floating-point input"):
        ops.stats(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="eps must be a non-negative finite number"):
        ops.forward_train(x, None, None, -1.0, 0, 0.0, None)
    with pytest.raises(RuntimeError, match="invstd should contain 64 elements not 1"):
        ops.invert_act(x, torch.zeros(64), torch.ones(1), None, None, 1.0)


# --- item 5: constructor arguments ---------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (nlnn.BatchNorm2d, {"eps": -1}, "eps must be a non-negative finite number, got -1"),
        (
            nlnn.BatchNorm2d,
            {"eps": float("nan")},
            "eps must be a non-negative finite number, got nan",
        ),
        (nlnn.BatchNorm2d, {"momentum": -0.1}, r"momentum must be a number in \[0, 1\] or None"),
        (nlnn.BatchNorm2d, {"momentum": 1.5}, r"momentum must be a number in \[0, 1\] or None"),
        (nlnn.BatchNorm2d, {"affine": "yes"}, "affine must be True or False, got 'yes'"),
        (nlnn.BatchNorm2d, {"channel_axis": -1}, r"BatchNorm2d channel_axis must be 1, got -1"),
        (nlnn.BatchRenorm2d, {"d_max": float("nan")}, "d_max must be a finite number, got nan"),
        (nlnn.BatchRenorm2d, {"r_max": float("inf")}, "r_max must be a finite number, got inf"),
        (
            nlnn.BatchNormAct2d,
            {"negative_slope": float("nan")},
            "negative_slope must be a finite number, got nan",
        ),
        (
            nlnn.BatchNormAct2d,
            {"activation": "elu", "alpha": -1.0},
            "alpha must be a finite number > 0",
        ),
        (
            nlnn.GhostBatchNorm2d,
            {"virtual_batch_size": 2.5},
            r"virtual_batch_size must be an integer >= 2, got 2\.5",
        ),
        (
            nlnn.GhostBatchNorm2d,
            {"virtual_batch_size": True},
            "virtual_batch_size must be an integer >= 2, got True",
        ),
        (nlnn.FrozenBatchNorm2d, {"eps": -1e-5}, "eps must be a non-negative finite number"),
    ],
)
def test_constructors_validate_and_name_the_argument(cls: type, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(4, **kwargs)


@pytest.mark.parametrize("num_features", [0, -3, 2.5, True])
def test_num_features_must_be_a_positive_int(num_features: object) -> None:
    with pytest.raises(ValueError, match="num_features must be a positive integer"):
        nlnn.BatchNorm1d(num_features)  # type: ignore[arg-type]


def test_functional_eps_and_momentum() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="eps must be a non-negative finite number, got -1"):
        batch_norm(x, None, None, training=True, eps=-1)
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\]"):
        batch_norm(x, torch.zeros(3), torch.ones(3), training=True, momentum=2.0)
    with pytest.raises(ValueError, match="eps must be a non-negative finite number"):
        batch_norm_train(x, None, None, float("nan"))


# --- item 6: a non-finite running buffer ---------------------------------------------------
def test_nonfinite_buffer_is_reported_on_load_and_healthy_channels_keep_learning() -> None:
    """One NaN in a checkpoint made nonfinite='skip' skip every later batch, for every channel."""
    source = nn.BatchNorm1d(4)
    state = source.state_dict()
    state["running_var"][2] = float("nan")
    layer = nlnn.BatchNorm1d(4)
    with pytest.warns(
        RuntimeWarning,
        match=r"running statistics loaded are non-finite \(NaN/Inf\) in channel\(s\) 2.*reset_running_stats",
    ):
        layer.load_state_dict(state)
    x = torch.randn(16, 4) + 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # healthy batch: no warning, every healthy channel moves
        layer(x)
    torch.testing.assert_close(layer.running_mean[[0, 1, 3]], 0.1 * x.mean(0)[[0, 1, 3]])
    assert int(layer.num_batches_tracked) == 1
    assert math.isnan(float(layer.running_var[2]))


def test_nonfinite_buffer_is_reported_on_first_use() -> None:
    layer = nlnn.BatchNorm2d(3)
    with torch.no_grad():
        layer.running_mean[1] = float("inf")
    with pytest.warns(
        RuntimeWarning, match=r"running statistics in use are non-finite .* channel\(s\) 1"
    ):
        layer(torch.randn(4, 3, 2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(4, 3, 2, 2))  # reported once


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_per_channel_policy_on_every_backend(backend: str, policy: str) -> None:
    layer = nlnn.BatchNorm1d(3, backend=backend, nonfinite=policy)
    x = torch.randn(8, 3)
    x[0, 2] = float("nan")
    if policy == "raise":
        with pytest.raises(FloatingPointError, match=r"in channel\(s\) 2"):
            layer(x)
        assert (
            torch.equal(layer.running_mean, torch.zeros(3)) and int(layer.num_batches_tracked) == 0
        )
        return
    with pytest.warns(RuntimeWarning, match=r"in channel\(s\) 2"):
        layer(x)
    assert layer.running_mean[2] == 0 and layer.running_var[2] == 1
    torch.testing.assert_close(layer.running_mean[:2], 0.1 * x[:, :2].mean(0))


# --- item 7: non-finite input gives torch's statistics ----------------------------------------
@needs_fused
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_statistics_of_nonfinite_input_match_torch(layout: str) -> None:
    x = torch.randn(4, 4, 3, 3)
    x[0, 1, 0, 0] = float("nan")
    x[1, 2, 1, 1] = float("inf")
    x[0, 3, 0, 0] = float("-inf")  # the channel's first value: the shift must not be Inf
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    mean, var = FusedKernel.stats(x)
    ref_mean, ref_var = torch.batch_norm_update_stats(x, None, None, 0.0)
    torch.testing.assert_close(mean, ref_mean, equal_nan=True)
    torch.testing.assert_close(var, ref_var, equal_nan=True)
    ours, ref = nlnn.BatchNorm2d(4, backend="fused", nonfinite="propagate"), nn.BatchNorm2d(4)
    ours(x), ref(x)
    torch.testing.assert_close(ours.running_var, ref.running_var, equal_nan=True)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, equal_nan=True)


# --- item 8: the mask in eval -----------------------------------------------------------------
@pytest.mark.parametrize("cls", [nlnn.BatchNorm1d, nlnn.BatchNormAct1d, nlnn.BatchRenorm1d])
def test_mask_applies_in_eval_as_in_training(cls: type) -> None:
    torch.manual_seed(0)
    layer = cls(3)
    x = torch.randn(4, 3, 6)
    mask = torch.arange(6) < torch.tensor([[6], [4], [2], [5]])
    x = x.masked_fill(~mask[:, None, :], float("nan"))  # padding holds NaN
    y_train = layer(x, mask)
    assert torch.isfinite(y_train).all()
    layer.eval()
    y_eval = layer(x, mask)
    assert torch.isfinite(y_eval).all()
    pad = y_eval.transpose(1, 2)[~mask]  # (positions, C): the padded ones output f(beta)
    expected = (
        layer.bias if cls is not nlnn.BatchNormAct1d else nn.functional.leaky_relu(layer.bias, 0.01)
    )
    torch.testing.assert_close(pad, expected.detach().expand_as(pad))
    with pytest.raises(TypeError, match=r"mask must be a bool tensor, got torch\.float32"):
        layer(x, mask.float())


# --- item 11: pickling and TorchScript ---------------------------------------------------------
def test_renorm_with_paper_schedule_pickles_and_saves() -> None:
    r_max, d_max = nlnn.BatchRenorm2d.paper_schedule()
    layer = nlnn.BatchRenorm2d(4, r_max=r_max, d_max=d_max)
    layer(torch.randn(4, 4, 3, 3))
    clone = pickle.loads(pickle.dumps(layer))
    assert clone.limits() == layer.limits() and isinstance(clone.r_max, Ramp)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(4, 4, 3, 3)
    torch.testing.assert_close(loaded.eval()(x), layer.eval()(x))


@pytest.mark.parametrize(
    "cls", [nlnn.BatchNorm2d, nlnn.BatchRenorm2d, nlnn.BatchNormAct2d, nlnn.SyncBatchNorm]
)
def test_torchscript_says_to_use_export(cls: type) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), cls(4))
    with pytest.raises(
        RuntimeError, match=r"cannot be compiled by torch\.jit\.script.*torch\.export\.export"
    ):
        torch.jit.script(model)


def test_old_pickles_without_newer_options_load() -> None:
    layer = nlnn.BatchNorm1d(3)
    state = layer.__dict__.copy()
    del state["channel_axis"], state["_buffers_checked"]
    revived = nlnn.BatchNorm1d.__new__(nlnn.BatchNorm1d)
    revived.__setstate__(state)
    assert revived.channel_axis == 1
    revived(torch.randn(4, 3))
