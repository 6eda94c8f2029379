"""accumulate_batchnorm against the long way: one forward of the concatenated batch."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import normlab.nn as nlnn
from normlab.functional import Ramp
from normlab.nn.utils import KerasBatchNorm, accumulate_batchnorm

SIZES = (4, 6, 2)  # uneven micro-batches; even, for the split layer's two halves
STATE = ("running_mean", "running_var", "num_batches_tracked")

# (factory, input shape without the batch axis)
LAYERS: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...]]] = {
    "torch1d": (lambda **k: nn.BatchNorm1d(3, **k), (3,)),
    "torch1d_seq": (lambda **k: nn.BatchNorm1d(3, **k), (3, 5)),
    "torch2d": (lambda **k: nn.BatchNorm2d(3, **k), (3, 4, 4)),
    "torch3d": (lambda **k: nn.BatchNorm3d(3, **k), (3, 2, 3, 3)),
    "bn1d": (lambda **k: nlnn.BatchNorm1d(3, **k), (3,)),
    "bn1d_last": (lambda **k: nlnn.BatchNorm1d(3, channel_axis=-1, **k), (5, 3)),
    "bn2d": (lambda **k: nlnn.BatchNorm2d(3, **k), (3, 4, 4)),
    "bn3d": (lambda **k: nlnn.BatchNorm3d(3, **k), (3, 2, 3, 3)),
    "bnact": (lambda **k: nlnn.BatchNormAct2d(3, activation="elu", **k), (3, 4, 4)),
    "renorm": (lambda **k: nlnn.BatchRenorm2d(3, r_max=1.2, d_max=0.3, **k), (3, 4, 4)),
    "renorm_ramp": (
        lambda **k: nlnn.BatchRenorm2d(
            3, r_max=Ramp(1.0, 2.0, 0, 4), d_max=Ramp(0.0, 1.0, 0, 4), **k
        ),
        (3, 4, 4),
    ),
    "sync": (lambda **k: nlnn.SyncBatchNorm(3, **k), (3, 4, 4)),
    "torch_sync": (lambda **k: nn.SyncBatchNorm(3, **k), (3, 4, 4)),
    "ghost": (lambda **k: nlnn.GhostBatchNorm2d(3, virtual_batch_size=2, **k), (3, 4, 4)),
    "keras": (lambda **k: KerasBatchNorm(3, channel_axis=-1, **k), (5, 3)),
    "split": (lambda **k: nlnn.SplitBatchNorm2d(3, **k), (3, 4, 4)),
}


def _batches(shape: tuple[int, ...], sizes=SIZES, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((n, *shape), generator=gen) * (1 + i) + 2 * i for i, n in enumerate(sizes)]


def _warmed(name: str, momentum) -> nn.Module:
    """The layer after two ordinary training steps (so the running state is not the default)."""
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = make(momentum=momentum)
    with torch.no_grad():
        for t in layer.parameters():
            t.uniform_(0.5, 1.5)
        for x in _batches(shape, (4, 4), seed=1):
            layer(x)
    return layer


def _concatenated(name: str, batches: list[Tensor]) -> Tensor:
    """The one batch the micro-batches stand for (a split layer's: every first half, then every
    second half — the order of its parts)."""
    if name != "split":
        return torch.cat(batches)
    halves = [b.split(b.shape[0] // 2) for b in batches]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves])


def _state(layer: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cumulative"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_running_stats_equal_one_forward_of_the_concatenated_batch(name: str, momentum) -> None:
    layer = _warmed(name, momentum)
    start = copy.deepcopy(layer)
    batches = _batches(LAYERS[name][1])
    with accumulate_batchnorm(layer):
        outputs = []
        for x in batches:
            outputs.append(layer(x))
            # during the block the running buffers keep their step-start values
            for key, value in _state(start).items():
                assert torch.equal(layer.state_dict()[key], value), key
    whole = copy.deepcopy(start)
    whole(_concatenated(name, batches))
    for key, value in whole.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(layer.state_dict()[key], value), key
        elif "running" in key:
            torch.testing.assert_close(layer.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    assert int(layer.num_batches_tracked) == int(start.num_batches_tracked) + 1
    # each micro-batch was normalized with its own statistics (Renorm: corrected toward the
    # step-start running statistics), exactly as the layer alone does it
    for x, y in zip(batches, outputs):
        torch.testing.assert_close(y, copy.deepcopy(start)(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["torch2d", "bn2d", "bnact", "renorm", "ghost", "split"])
@pytest.mark.parametrize("backward", ["inside", "after"])
def test_gradients_are_those_of_the_micro_batches(name: str, backward: str) -> None:
    """Backward works inside the block and after it (torch's BatchNorm saves its running
    buffers for backward: the block writes them without moving their version counters)."""
    layer = _warmed(name, 0.1)
    plain = copy.deepcopy(layer)
    batches = _batches(LAYERS[name][1])
    inputs = [x.clone().requires_grad_() for x in batches]
    with accumulate_batchnorm(layer):
        losses = [layer(x).square().mean() for x in inputs]
        if backward == "inside":
            for loss in losses:
                loss.backward()
    if backward == "after":
        sum(losses).backward()
    references = [x.clone().requires_grad_() for x in batches]
    for x in references:
        snapshot = _state(plain)
        plain(x).square().mean().backward()
        plain.load_state_dict(snapshot)
    for a, b in zip(inputs, references):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    for (n, p), q in zip(layer.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_masked_micro_batches_count_only_valid_positions() -> None:
    layer = nlnn.BatchNorm1d(3, channel_axis=-1, momentum=None)
    whole = copy.deepcopy(layer)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 7, 3, generator=gen) * (i + 1) for i, n in enumerate(SIZES)]
    masks = [torch.rand(n, 7, generator=gen) > 0.4 for n in SIZES]
    with accumulate_batchnorm(layer):
        for x, mask in zip(xs, masks):
            layer(x, mask=mask)
    whole(torch.cat(xs), torch.cat(masks))
    for key in STATE:
        torch.testing.assert_close(getattr(layer, key), getattr(whole, key), rtol=1e-6, atol=1e-7)


def test_a_model_merges_every_layer_with_its_own_input() -> None:
    """Deeper layers see inputs normalized per micro-batch: each layer's update is that of one
    forward of the concatenation of the inputs it saw (captured the long way)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nlnn.BatchNormAct2d(4), nn.Flatten()
    )
    start = copy.deepcopy(model)
    batches = _batches((3, 6, 6))
    with accumulate_batchnorm(model):
        for x in batches:
            model(x)
    seen: dict[int, list[Tensor]] = {1: [], 3: []}
    plain = copy.deepcopy(start)
    for x in batches:
        for i, layer in enumerate(plain):
            if i in seen:
                seen[i].append(x.detach())
            x = layer(x)
    for i, inputs in seen.items():
        whole = copy.deepcopy(start[i])
        whole(torch.cat(inputs))
        for key in STATE:
            torch.testing.assert_close(
                getattr(model[i], key), getattr(whole, key), rtol=1e-6, atol=1e-7
            )


def test_nonfinite_micro_batch_follows_the_layer_policy() -> None:
    """skip: those channels keep their statistics, the others move, the counter counts the step
    — as one forward of the concatenated batch; propagate (torch): NaN, as torch."""
    batches = _batches((3, 4, 4))
    batches[1][0, 1, 0, 0] = float("nan")
    results = []
    for layer in (nlnn.BatchNorm2d(3), nn.BatchNorm2d(3)):
        whole = copy.deepcopy(layer)
        results.append(layer.running_mean)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with accumulate_batchnorm(layer):
                for x in batches:
                    layer(x)
            whole(torch.cat(batches))
        for key in STATE:
            torch.testing.assert_close(
                getattr(layer, key), getattr(whole, key), rtol=1e-6, atol=1e-7, equal_nan=True
            )
    skipped, propagated = results
    assert torch.isfinite(skipped).all() and torch.isnan(propagated[1])


def test_skip_warns_at_exit_naming_the_layer() -> None:
    model = nn.Sequential(nlnn.BatchNorm1d(3))
    x = torch.randn(4, 3)
    x[0, 2] = float("inf")
    # the micro-batch's own warning, then the step's
    with pytest.warns(RuntimeWarning) as record, accumulate_batchnorm(model):
        model(torch.randn(4, 3))
        model(x)
    messages = [str(w.message) for w in record]
    assert any(
        m.startswith("accumulate_batchnorm: 0 (BatchNorm1d): non-finite") and "channel(s) 2" in m
        for m in messages
    ), messages
    assert torch.isfinite(model[0].running_mean).all() and model[0].running_mean[0] != 0


def test_raise_policy_and_any_exception_leave_the_state_as_it_was() -> None:
    layer = _warmed("bn2d", 0.1)
    layer.nonfinite = "raise"
    before = _state(layer)
    bad = torch.randn(4, 3, 4, 4)
    bad[:, 0] = float("nan")
    with (
        pytest.raises(FloatingPointError, match="non-finite batch statistics"),
        accumulate_batchnorm(layer),
    ):
        layer(torch.randn(4, 3, 4, 4))
        layer(bad)
    for key, value in before.items():
        assert torch.equal(layer.state_dict()[key], value), key
    model = nn.Sequential(nn.BatchNorm1d(3), nlnn.BatchRenorm1d(3))
    before = _state(model)
    with pytest.raises(KeyError), accumulate_batchnorm(model):
        model(torch.randn(5, 3))
        raise KeyError("user code failed")
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_layers_in_eval_frozen_or_untracked_are_left_alone() -> None:
    model = nn.Sequential(
        nlnn.BatchNorm1d(3).eval(),
        nlnn.FrozenBatchNorm1d(3),
        nn.BatchNorm1d(3, track_running_stats=False),
        nn.BatchNorm1d(3),
    )
    unused = nn.BatchNorm1d(3)
    model.add_module("unused", unused)
    before = _state(model)
    with accumulate_batchnorm(model):
        for x in _batches((3,)):
            model[:4](x)
    after = model.state_dict()
    for key, value in before.items():
        changed = not torch.equal(after[key], value)
        assert changed == (key.startswith("3.") and key != "3.weight" and key != "3.bias"), key


def test_ghost_micro_batches_must_align_with_virtual_batches() -> None:
    layer = nlnn.GhostBatchNorm1d(3, virtual_batch_size=4)
    before = _state(layer)
    with (
        pytest.raises(
            ValueError,
            match=r"a micro-batch of 6 samples was followed by another; .* multiple of "
            r"virtual_batch_size=4",
        ),
        accumulate_batchnorm(layer),
    ):
        layer(torch.randn(6, 3))
        layer(torch.randn(4, 3))
    for key, value in before.items():
        assert torch.equal(layer.state_dict()[key], value), key


def test_blocks_do_not_nest_and_need_a_module() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    with (
        accumulate_batchnorm(model),
        pytest.raises(RuntimeError, match=r"0 \(BatchNorm1d\) is already inside"),
        accumulate_batchnorm(model),
    ):
        pass
    with accumulate_batchnorm(model):  # the first block's exit released the layer
        model(torch.randn(4, 3))
    assert int(model[0].num_batches_tracked) == 1
    with (
        pytest.raises(TypeError, match=r"expects an nn\.Module, got str"),
        accumulate_batchnorm("model"),  # type: ignore[arg-type]
    ):
        pass


def test_single_sample_micro_batches_merge_like_the_whole_batch() -> None:
    """single_sample='running': a one-sample micro-batch is normalized with the running
    statistics, and its sample still counts in the step's one update (as in the whole batch)."""
    layer = nlnn.BatchNorm1d(3, single_sample="running")
    whole = copy.deepcopy(layer)
    batches = _batches((3,), sizes=(1, 1, 4))
    with accumulate_batchnorm(layer):
        y = layer(batches[0])
        torch.testing.assert_close(y, copy.deepcopy(whole).eval()(batches[0]))
        for x in batches[1:]:
            layer(x)
    whole(torch.cat(batches))
    for key in STATE:
        torch.testing.assert_close(getattr(layer, key), getattr(whole, key), rtol=1e-6, atol=1e-7)
