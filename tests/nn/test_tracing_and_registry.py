"""torch.fx / torch.export on every normlab layer, and the layer registry's converters."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import normlab.nn as nlnn
from normlab.functional import Ramp
from normlab.nn.utils import convert_batchnorm

# every layer kind with non-default options: what the converters must keep
VARIANTS = [
    lambda: nlnn.BatchNorm2d(
        4, eps=1e-3, momentum=0.05, nonfinite="raise", single_sample="running"
    ),
    lambda: nlnn.BatchNorm1d(4, channel_axis=-1, momentum=None),
    lambda: nlnn.BatchNormAct2d(4, activation="elu", alpha=0.5),
    lambda: nlnn.BatchNormAct2d(4, activation="silu", eps=1e-4),
    lambda: nlnn.BatchRenorm2d(4, r_max=Ramp(1.0, 2.0, 10, 20), d_max=0.5),
    lambda: nlnn.GhostBatchNorm2d(4, virtual_batch_size=3, backend="reference"),
    lambda: nlnn.SyncBatchNorm(4, activation="leaky_relu", negative_slope=0.2),
    lambda: nlnn.FrozenBatchNorm2d(4, activation="relu"),
]
IDS = ["bn", "bn1d_last", "act_elu", "act_silu", "renorm", "ghost", "sync_act", "frozen_act"]


def _input(layer: nn.Module) -> torch.Tensor:
    if getattr(layer, "channel_axis", 1) == -1:
        return torch.randn(6, 5, 4)
    if isinstance(layer, nlnn.BatchNorm1d):
        return torch.randn(6, 4)
    return torch.randn(6, 4, 3, 3)


def _trained(make) -> nn.Module:
    torch.manual_seed(0)
    layer = make()
    if hasattr(layer, "num_batches_tracked"):
        for _ in range(3):
            layer(_input(layer) * 2 + 1)
    with torch.no_grad():
        for name in ("weight", "bias"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                t.uniform_(0.5, 1.5)
    return layer.eval()


@pytest.mark.parametrize("make", VARIANTS, ids=IDS)
def test_fx_symbolic_trace_runs_every_layer(make) -> None:
    """Each layer is one call_function node; like any non-leaf module, the graph records the
    train/eval mode it was traced in (retrace after .train()/.eval())."""
    layer = _trained(make)
    model = nn.Sequential(nn.Identity(), layer, nn.Identity())
    graph = fx.symbolic_trace(model)
    x = _input(layer)
    torch.testing.assert_close(graph(x), model(x))
    if hasattr(layer, "num_batches_tracked"):  # a graph traced in training updates the buffers
        model.train()
        graph = fx.symbolic_trace(model)
        before = layer.num_batches_tracked.clone()
        y = graph(x)
        assert int(layer.num_batches_tracked) == int(before) + 1
        assert y.shape == x.shape


def test_fx_refuses_an_untraceable_schedule_with_a_clear_error() -> None:
    model = nn.Sequential(nlnn.BatchRenorm2d(4, r_max=lambda step: 2.0))
    with pytest.raises(
        TypeError,
        match=r"a callable r_max cannot be traced by torch\.fx; use normlab\.functional\.Ramp",
    ):
        fx.symbolic_trace(model)


@pytest.mark.parametrize("make", VARIANTS[:4], ids=IDS[:4])
def test_torch_export_keeps_working(make) -> None:
    layer = _trained(make)
    x = _input(layer)
    exported = torch.export.export(nn.Sequential(layer), (x,))
    torch.testing.assert_close(exported.module()(x), layer(x))


@pytest.mark.parametrize("make", VARIANTS, ids=IDS)
def test_config_rebuilds_the_layer(make) -> None:
    layer = make()
    description = nlnn.describe(layer)
    config = dict(description.config)
    clone = nlnn.layer_class(
        description.kind, description.spatial if description.kind != "sync" else None
    )(config.pop("num_features"), **config)
    assert type(clone) is type(layer)
    assert nlnn.describe(clone).config == description.config


@pytest.mark.parametrize("make", VARIANTS[:7], ids=IDS[:7])
def test_frozen_conversion_keeps_eval_outputs(make) -> None:
    layer = _trained(make)
    if isinstance(layer, nlnn.SyncBatchNorm):
        layer._source_spatial = 2
    x = _input(layer)
    expected = layer(x)
    spatial = 1 if isinstance(layer, nlnn.BatchNorm1d) else 2
    frozen_cls = {1: nlnn.FrozenBatchNorm1d, 2: nlnn.FrozenBatchNorm2d}[spatial]
    frozen = frozen_cls.convert_frozen_batchnorm(layer)
    assert isinstance(frozen, frozen_cls)
    assert frozen.activation == getattr(layer, "activation", None)
    torch.testing.assert_close(frozen(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [VARIANTS[0], VARIANTS[1], VARIANTS[2], VARIANTS[3]], ids=IDS[:4])
def test_sync_round_trip_keeps_variant_options_and_parameters(make) -> None:
    layer = _trained(make)
    x = _input(layer)
    expected = layer(x)
    sync = nlnn.SyncBatchNorm.convert_sync_batchnorm(layer)
    assert isinstance(sync, nlnn.SyncBatchNorm) and sync.weight is layer.weight  # shared
    torch.testing.assert_close(sync(x), expected)
    back = nlnn.SyncBatchNorm.revert_sync_batchnorm(sync)
    assert type(back) is type(layer)
    assert nlnn.describe(back).config == nlnn.describe(layer).config
    torch.testing.assert_close(back(x), expected)


@pytest.mark.parametrize("make", [VARIANTS[4], VARIANTS[5]], ids=["renorm", "ghost"])
def test_sync_refuses_variants_without_a_synchronized_form(make) -> None:
    with pytest.raises(ValueError, match="has no synchronized form"):
        nlnn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(make()))


def test_revert_needs_a_rank_for_a_layer_it_did_not_convert() -> None:
    with pytest.raises(ValueError, match="its input rank is unknown; pass spatial=1, 2 or 3"):
        nlnn.SyncBatchNorm.revert_sync_batchnorm(nlnn.SyncBatchNorm(3))
    assert isinstance(
        nlnn.SyncBatchNorm.revert_sync_batchnorm(nlnn.SyncBatchNorm(3), spatial=3), nlnn.BatchNorm3d
    )


def test_convert_batchnorm_keeps_options_or_refuses() -> None:
    act = _trained(VARIANTS[2])
    x = _input(act)
    with pytest.raises(
        ValueError,
        match=r"cannot convert <model> \(BatchNormAct2d\) to BatchNorm2d: it has activation='elu'",
    ):
        convert_batchnorm(act, nn.BatchNorm2d)
    strict = nlnn.BatchNorm2d(4, nonfinite="raise")
    with pytest.raises(
        ValueError, match="it has nonfinite='raise', which BatchNorm2d cannot represent"
    ):
        convert_batchnorm(strict, nn.BatchNorm2d)
    renorm = _trained(VARIANTS[4])
    plain = convert_batchnorm(renorm, nlnn.BatchNorm2d)  # the kind's own options: the conversion
    assert type(plain) is nlnn.BatchNorm2d
    torch.testing.assert_close(plain(x), renorm(x))
    with pytest.raises(
        ValueError, match="it has activation='elu', which GhostBatchNorm2d cannot represent"
    ):
        convert_batchnorm(act, nlnn.GhostBatchNorm2d, virtual_batch_size=2)


@pytest.mark.parametrize("make", VARIANTS, ids=IDS)
def test_convert_batchnorm_round_trips_every_variant(make) -> None:
    layer = _trained(make)
    x = _input(layer)
    expected = layer(x)
    copy = convert_batchnorm(layer, type(layer))
    assert copy is not layer and type(copy) is type(layer)
    assert nlnn.describe(copy).config == nlnn.describe(layer).config
    torch.testing.assert_close(copy(x), expected)


def test_bias_false_like_torch_2_13() -> None:
    ours, ref = nlnn.BatchNorm2d(4, bias=False), nn.BatchNorm2d(4, bias=False)
    assert ours.bias is None and "bias=False" in repr(ours)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    ref(torch.randn(8, 4, 3, 3))
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(8, 4, 3, 3, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    torch.testing.assert_close(ours(x), ref(xr))
    ours(x).sum().backward(), ref(xr).sum().backward()
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))
    assert nlnn.BatchNormAct2d(4, bias=False)(torch.randn(2, 4, 2, 2)).shape == (2, 4, 2, 2)


def test_fx_quantization_preparation_traces_normlab_layers() -> None:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nlnn.BatchNormAct2d(4), nn.Flatten()).eval()
    x = torch.randn(2, 3, 5, 5)
    prepared = prepare_fx(model, get_default_qconfig_mapping(), example_inputs=(x,))
    torch.testing.assert_close(prepared(x), model(x))


def test_torch_compile_traces_plain_batch_norm_without_a_graph_break() -> None:
    """Eager plain BN runs one compiled C++ call; under dynamo it must be ATen's op instead
    (a pybind call, a functorch check or an lru_cache in the path is a graph break)."""
    import torch._dynamo

    def model() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nlnn.BatchNorm2d(8), nn.ReLU())

    x = torch.randn(4, 3, 10, 10)
    explained = torch._dynamo.explain(model())(x)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    compiled, eager = model(), model()
    y = torch.compile(compiled)(x)
    torch.testing.assert_close(y, eager(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled[1].running_var, eager[1].running_var)
    assert int(compiled[1].num_batches_tracked) == 1


@pytest.mark.parametrize(
    "make",
    [lambda: nlnn.BatchNormAct2d(8, activation="silu"), lambda: nlnn.BatchRenorm2d(8)],
    ids=["act_silu", "renorm"],
)
def test_torch_compile_runs_the_training_function_like_eager(make) -> None:
    """The one autograd.Function under dynamo: outputs and gradients equal to eager."""

    def model() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), make())

    x = torch.randn(4, 3, 10, 10)
    compiled, eager = model(), model()
    y = torch.compile(compiled)(x)
    y.sum().backward()
    ye = eager(x)
    ye.sum().backward()
    torch.testing.assert_close(y, ye, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled[0].weight.grad, eager[0].weight.grad, rtol=1e-4, atol=1e-4)
