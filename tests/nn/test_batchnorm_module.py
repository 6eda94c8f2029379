"""normlab.nn.BatchNorm*: torch's surface, interop, and the behaviour beyond torch."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import normlab.nn as nlnn

# --- torch's surface -------------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (nlnn.BatchNorm1d, torch.nn.BatchNorm1d),
        (nlnn.BatchNorm2d, torch.nn.BatchNorm2d),
        (nlnn.BatchNorm3d, torch.nn.BatchNorm3d),
    ],
)
def test_same_surface_as_torch(ours: type, theirs: type) -> None:
    kw = {"eps": 1e-3, "momentum": None, "affine": False, "track_running_stats": True}
    a, b = theirs(7, **kw), ours(7, **kw)
    assert isinstance(b, _BatchNorm)
    assert repr(b) == repr(a)
    assert list(b.state_dict()) == list(a.state_dict())
    assert b._version == a._version
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(b, attr) == getattr(a, attr)
    c = ours(7, dtype=torch.float64)
    assert c.weight.dtype == torch.float64 and c.running_var.dtype == torch.float64


def test_state_dict_without_num_batches_tracked_loads() -> None:
    old = torch.nn.BatchNorm2d(3).state_dict()
    del old["num_batches_tracked"]
    m = nlnn.BatchNorm2d(3)
    m.load_state_dict(old)  # version-1 checkpoints predate the counter
    assert int(m.num_batches_tracked) == 0


def test_reset_parameters_and_running_stats() -> None:
    m = nlnn.BatchNorm1d(4)
    m(torch.randn(8, 4) * 3 + 2)
    with torch.no_grad():
        m.weight.fill_(3.0)
    m.reset_running_stats()
    assert torch.equal(m.running_mean, torch.zeros(4))
    assert torch.equal(m.running_var, torch.ones(4))
    assert int(m.num_batches_tracked) == 0
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(4))


def test_extra_repr_names_non_default_options() -> None:
    m = nlnn.BatchNorm1d(4, channel_axis=-1, nonfinite="raise", backend="reference")
    text = repr(m)
    assert (
        "nonfinite='raise'" in text and "backend='reference'" in text and "channel_axis=-1" in text
    )


# --- errors: the same messages as torch -------------------------------------------


@pytest.mark.parametrize(
    ("cls", "x", "match"),
    [
        (nlnn.BatchNorm1d, torch.randn(2, 3, 4, 5), r"expected 2D or 3D input \(got 4D input\)"),
        (nlnn.BatchNorm2d, torch.randn(2, 3, 4), r"expected 4D input \(got 3D input\)"),
        (nlnn.BatchNorm3d, torch.randn(2, 3, 4, 4), r"expected 5D input \(got 4D input\)"),
    ],
)
def test_wrong_ndim_message_matches_torch(cls: type, x: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(3)(x)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_single_value_per_channel_message_matches_torch(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    cls = nlnn.BatchNorm2d if x.dim() == 4 else nlnn.BatchNorm1d
    with pytest.raises(ValueError) as ours:
        cls(3)(x)
    torch_cls = torch.nn.BatchNorm2d if x.dim() == 4 else torch.nn.BatchNorm1d
    with pytest.raises(ValueError) as theirs:
        torch_cls(3)(x)
    assert str(ours.value) == str(theirs.value)
    assert str(ours.value).startswith(
        "Expected more than 1 value per channel when training, got input size"
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nonfinite": "ignore"}, "nonfinite must be one of"),
        ({"single_sample": "mean"}, "single_sample must be one of"),
        (
            {"backend": "cuda"},
            "backend must be one of 'auto', 'reference', 'native', 'fused', got 'cuda'",
        ),
        (
            {"channel_axis": 2},
            r"BatchNorm1d channel_axis must be 1 or -1 \(for \(N, L, C\) input\), got 2",
        ),
    ],
)
def test_constructor_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        nlnn.BatchNorm1d(3, **kwargs)  # type: ignore[arg-type]


def test_explicit_native_backend_rejects_mask() -> None:
    m = nlnn.BatchNorm1d(3, backend="native")
    with pytest.raises(ValueError, match="backend='native' does not support mask"):
        m(torch.randn(4, 3, 5), mask=torch.ones(4, 5, dtype=torch.bool))


# --- empty batch: exactly torch 2.13 ----------------------------------------------


def test_empty_batch_like_torch() -> None:
    a, b = torch.nn.BatchNorm2d(3), nlnn.BatchNorm2d(3)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ya, yb = a(x), b(x)
    assert yb.shape == ya.shape == (0, 3, 4, 4)
    assert int(b.num_batches_tracked) == int(a.num_batches_tracked) == 1
    assert torch.equal(b.running_mean, a.running_mean) and torch.equal(b.running_var, a.running_var)
    yb.sum().backward()  # differentiable, like torch's
    assert x.grad is not None and x.grad.shape == x.shape


# --- non-finite batches ---------------------------------------------------------


def _poisoned(shape: tuple[int, ...] = (4, 3, 5, 5)) -> torch.Tensor:
    x = torch.randn(shape)
    x[0, 1, 0, 0] = float("nan")
    return x


def test_nonfinite_skip_keeps_the_poisoned_channel_and_updates_the_others() -> None:
    m = nlnn.BatchNorm2d(3)
    m(torch.randn(4, 3, 5, 5))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = _poisoned()
    with pytest.warns(
        RuntimeWarning,
        match=r"BatchNorm2d\(3\): non-finite batch statistics \(NaN/Inf\) in channel\(s\) 1 in training",
    ):
        m(x)
    assert m.running_mean[1] == before["running_mean"][1]
    assert m.running_var[1] == before["running_var"][1]
    ref = torch.nn.BatchNorm2d(3)
    ref.load_state_dict(before)
    ref(x)  # torch: every channel moves, channel 1 to NaN
    torch.testing.assert_close(m.running_mean[[0, 2]], ref.running_mean[[0, 2]])
    torch.testing.assert_close(m.running_var[[0, 2]], ref.running_var[[0, 2]])
    assert int(m.num_batches_tracked) == 2  # the batch counted: some channels moved


def test_nonfinite_skip_on_fp16_overflow() -> None:
    m = nlnn.BatchNorm1d(2)
    x = torch.tensor([[60000.0, 1.0], [-60000.0, 2.0], [60000.0, 3.0]], dtype=torch.float16)
    # the fp32 statistics are finite, but the unbiased variance overflows fp16 only if
    # accumulated in fp16: normlab accumulates in fp32, so this batch is accepted.
    m(x)
    assert torch.isfinite(m.running_var).all()
    inf = torch.tensor([[float("inf"), 1.0], [0.0, 2.0]], dtype=torch.float16)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        m(inf)
    assert torch.isfinite(m.running_mean).all()


def test_nonfinite_raise_names_module() -> None:
    m = nlnn.BatchNorm2d(3, nonfinite="raise")
    with pytest.raises(FloatingPointError, match=r"BatchNorm2d\(3\): non-finite batch statistics"):
        m(_poisoned())
    assert int(m.num_batches_tracked) == 0
    assert torch.equal(m.running_mean, torch.zeros(3))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_nonfinite_propagate_is_torch(backend: str) -> None:
    a, b = torch.nn.BatchNorm2d(3), nlnn.BatchNorm2d(3, nonfinite="propagate", backend=backend)
    x = _poisoned()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a(x)
        b(x)
    torch.testing.assert_close(b.running_mean, a.running_mean, equal_nan=True)
    assert torch.isnan(b.running_mean[1]) and int(b.num_batches_tracked) == 1


# --- single-sample batches ------------------------------------------------------


def test_single_sample_running_uses_running_stats_and_leaves_them() -> None:
    m = nlnn.BatchNorm1d(3, single_sample="running")
    m(torch.randn(16, 3) * 2 + 1)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(1, 3)
    y = m(x)
    m.eval()
    torch.testing.assert_close(y, m(x))
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k])


def test_single_sample_running_without_running_stats_still_raises() -> None:
    m = nlnn.BatchNorm1d(3, single_sample="running", track_running_stats=False)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        m(torch.randn(1, 3))


# --- channels-last sequences and masks ------------------------------------------


def test_channel_axis_last_equals_moved_axis() -> None:
    torch.manual_seed(0)
    a = nlnn.BatchNorm1d(6)
    b = nlnn.BatchNorm1d(6, channel_axis=-1)
    x = torch.randn(4, 9, 6)  # (N, L, C)
    ya, yb = a(x.transpose(1, 2)), b(x)
    assert yb.shape == x.shape
    torch.testing.assert_close(yb, ya.transpose(1, 2))
    torch.testing.assert_close(b.running_var, a.running_var)
    # (N, C) input is unaffected by channel_axis
    torch.testing.assert_close(b(x[:, 0]), a(x[:, 0]))


@pytest.mark.parametrize("channel_axis", [1, -1])
def test_mask_uses_only_valid_positions(channel_axis: int) -> None:
    torch.manual_seed(0)
    lengths = [7, 3, 5]
    x = torch.randn(3, 4, 7) * 3 + 1  # (N, C, L)
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]  # (N, L)
    x = x.masked_fill(~mask[:, None, :], float("nan"))  # padding holds garbage
    m = nlnn.BatchNorm1d(4, channel_axis=channel_axis)
    inp = x if channel_axis == 1 else x.transpose(1, 2)
    y = m(inp, mask=mask)
    y = y if channel_axis == 1 else y.transpose(1, 2)
    assert torch.isfinite(y).all(), "masked positions must be finite"
    valid = torch.cat([x[i, :, :n] for i, n in enumerate(lengths)], dim=1).T  # (sum L, C)
    ref = torch.nn.BatchNorm1d(4)
    expect = ref(valid)
    got = torch.cat([y[i, :, :n] for i, n in enumerate(lengths)], dim=1).T
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.running_var, ref.running_var, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[1, :, 3:], m.bias[:, None].expand(4, 4).detach())


def test_mask_with_one_valid_value_raises() -> None:
    m = nlnn.BatchNorm1d(2)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 0] = True
    with pytest.raises(ValueError, match=r"got 1 valid \(unmasked\) value"):
        m(torch.randn(3, 2, 4), mask=mask)


def test_mask_shape_error() -> None:
    with pytest.raises(
        ValueError,
        match=r"mask must be a bool tensor with the input's shape without its channel axis",
    ):
        nlnn.BatchNorm1d(2)(torch.randn(3, 2, 4), mask=torch.ones(3, 2, 4, dtype=torch.bool))


# --- PyTorch machinery --------------------------------------------------------


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, bias=False),
        nlnn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
    )


def test_autocast_output_dtypes_match_torch() -> None:
    x = torch.randn(4, 3)
    ours, theirs = nlnn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    lin = torch.nn.Linear(3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        assert ours(h).dtype == theirs(h).dtype == torch.bfloat16
        assert ours(x).dtype == theirs(x).dtype == torch.float32


def test_deepcopy_pickle_and_torch_save() -> None:
    m = _model()
    m(torch.randn(4, 3, 6, 6))
    x = torch.randn(2, 3, 6, 6)
    m.eval()
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        torch.testing.assert_close(clone(x), m(x))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = _model()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    fresh.eval()
    torch.testing.assert_close(fresh(x), m(x))


def test_functional_call() -> None:
    m = _model()
    params = {k: v * 2 for k, v in m.named_parameters()}
    x = torch.randn(4, 3, 6, 6)
    m.eval()
    y = torch.func.functional_call(m, params, (x,))
    with torch.no_grad():
        for _k, v in m.named_parameters():
            v.mul_(2)
    torch.testing.assert_close(y, m(x))


def test_torch_fuse_conv_bn_eval_recognises_ours() -> None:
    m = _model()
    m(torch.randn(8, 3, 6, 6))
    m.eval()
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(m[0], m[1])
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fused(x), m[1](m[0](x)), rtol=1e-5, atol=1e-5)


def test_export_in_eval_mode() -> None:
    m = _model().eval()
    x = torch.randn(2, 3, 6, 6)
    ep = torch.export.export(m, (x,))
    torch.testing.assert_close(ep.module()(x), m(x))


@pytest.mark.slow
def test_torch_compile_matches_eager() -> None:
    m = _model()
    ref = copy.deepcopy(m)
    compiled = torch.compile(m)
    x = torch.randn(8, 3, 6, 6)
    torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m[1].running_var, ref[1].running_var, rtol=1e-5, atol=1e-5)
    m.eval()
    ref.eval()
    torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)


def test_mode_calls_keep_the_cached_spec_and_a_mode_change_is_seen() -> None:
    """``train()``/``eval()`` on every call (a benchmark loop, evaluation between steps) must not
    rebuild the layer's settings each time; a change of mode must still reach the forward."""
    m = nlnn.BatchNorm2d(3)
    m.eval()
    spec = m._spec()
    m.eval()
    assert m._spec() is spec and not spec.training
    m.train()
    x = torch.randn(4, 3, 2, 2) + 5
    m(x)
    assert m._spec().training and m.running_mean.abs().sum() > 0
    m.eps = 0.5  # a setting the spec holds: rebuilt
    assert m._spec().eps == 0.5
