"""normlab.init: distributions (KS tests), torch's gains, signal propagation, initialize, LSUV."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import normlab.init as ni

N = 256  # a (N, N) weight gives 65k samples per KS test


def _sample(fn, *args, shape=(N, N), **kwargs) -> np.ndarray:
    w = torch.empty(shape)
    fn(w, *args, generator=torch.Generator().manual_seed(0), **kwargs)
    return w.flatten().numpy().astype(np.float64)


def _torch_sample(fn, *args, shape=(N, N), **kwargs) -> np.ndarray:
    w = torch.empty(shape)
    fn(w, *args, generator=torch.Generator().manual_seed(1), **kwargs)
    return w.flatten().numpy().astype(np.float64)


@pytest.mark.parametrize(
    ("ours", "theirs", "args"),
    [
        (ni.xavier_uniform_, nn.init.xavier_uniform_, (1.5,)),
        (ni.xavier_normal_, nn.init.xavier_normal_, (0.8,)),
        (ni.kaiming_uniform_, nn.init.kaiming_uniform_, (0.1,)),
        (ni.kaiming_normal_, nn.init.kaiming_normal_, (0.0,)),
        (ni.normal_, nn.init.normal_, (0.5, 2.0)),
        (ni.trunc_normal_, nn.init.trunc_normal_, (0.0, 1.0, -1.0, 0.5)),
        (ni.orthogonal_, nn.init.orthogonal_, (2.0,)),
    ],
)
def test_same_distribution_as_torch(ours, theirs, args) -> None:
    a, b = _sample(ours, *args), _torch_sample(theirs, *args)
    assert stats.ks_2samp(a, b).pvalue > 1e-3


@pytest.mark.parametrize(
    ("mode", "fan"), [("fan_in", 64 * 9), ("fan_out", 32 * 9), ("fan_avg", (64 + 32) * 9 / 2)]
)
@pytest.mark.parametrize("dist", ["normal", "uniform", "truncated_normal"])
def test_variance_scaling_exact_distribution(mode: str, fan: float, dist: str) -> None:
    x = _sample(ni.variance_scaling_, 2.0, mode, dist, shape=(32, 64, 3, 3))
    sd = math.sqrt(2.0 / fan)
    if dist == "normal":
        ref = stats.norm(scale=sd)
    elif dist == "uniform":
        limit = math.sqrt(3) * sd
        ref = stats.uniform(loc=-limit, scale=2 * limit)
    else:
        s = sd / 0.87962566103423978
        ref = stats.truncnorm(-2, 2, scale=s)
        assert abs(ref.std() - sd) / sd < 1e-6  # the truncation is corrected exactly
    assert stats.kstest(x, ref.cdf).pvalue > 1e-3


def test_lecun_distributions() -> None:
    sd = 1 / math.sqrt(N)
    assert (
        stats.kstest(
            _sample(ni.lecun_uniform_), stats.uniform(-math.sqrt(3) * sd, 2 * math.sqrt(3) * sd).cdf
        ).pvalue
        > 1e-3
    )
    assert (
        stats.kstest(
            _sample(ni.lecun_normal_), stats.truncnorm(-2, 2, scale=sd / 0.87962566103423978).cdf
        ).pvalue
        > 1e-3
    )


def test_gain_table_equals_torch_and_rule_gives_sqrt2_for_relu() -> None:
    for name in ("linear", "conv2d", "sigmoid", "tanh", "relu", "selu"):
        assert ni.calculate_gain(name) == nn.init.calculate_gain(name)
    assert ni.calculate_gain("leaky_relu", 0.2) == nn.init.calculate_gain("leaky_relu", 0.2)
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name, f in (
        ("gelu", nn.functional.gelu),
        ("silu", nn.functional.silu),
        ("elu", nn.functional.elu),
    ):
        mc = 1 / math.sqrt(float((f(z) ** 2).mean()))
        assert ni.calculate_gain(name) == pytest.approx(mc, rel=3e-3)
    relu_rule = 1 / math.sqrt(float((torch.relu(z) ** 2).mean()))
    assert relu_rule == pytest.approx(math.sqrt(2), rel=3e-3)
    assert ni.calculate_gain("swish") == ni.calculate_gain("silu")
    with pytest.raises(ValueError, match=r"unsupported nonlinearity 'rbf'; known: linear, conv1d"):
        ni.calculate_gain("rbf")


def _second_moments(
    init, act: nn.Module, depth: int = 20, width: int = 256, seed: int = 0
) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(512, width, generator=g)
    moments = []
    for _ in range(depth):
        w = torch.empty(width, width)
        init(w, g)
        h = act(h @ w.T)
        moments.append(float((h**2).mean()))
    return moments


def test_he_keeps_relu_signal_and_small_normal_collapses() -> None:
    ratios, tiny = [], []
    for seed in range(8):
        m = _second_moments(
            lambda w, g: ni.kaiming_normal_(w, nonlinearity="relu", generator=g),
            nn.ReLU(),
            seed=seed,
        )
        ratios.append(m[-1] / m[0])
        s = _second_moments(
            lambda w, g: ni.normal_(w, 0.0, 0.01, generator=g), nn.ReLU(), seed=seed
        )
        tiny.append(s[-1] / s[0])
    geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
    assert 0.5 <= geo <= 2.0
    assert max(tiny) < 1e-6


def _geo_ratio(gain: float, depth: int) -> float:
    ratios = []
    for seed in range(4):
        m = _second_moments(
            lambda w, g: ni.xavier_uniform_(w, gain, generator=g), nn.Tanh(), depth=depth, seed=seed
        )
        ratios.append(m[-1] / m[0])
    return math.exp(sum(map(math.log, ratios)) / len(ratios))


def test_glorot_with_tanh_gain_keeps_tanh_signal() -> None:
    """Glorot scaled by tanh's gain (5/3, torch's recommendation) keeps 20 layers within [0.5, 2]."""
    assert 0.5 <= _geo_ratio(ni.calculate_gain("tanh"), depth=20) <= 2.0


def test_glorot_with_unit_gain_lets_tanh_signal_decay() -> None:
    """A finding, pinned: with Glorot & Bengio's own gain 1, tanh's second moment decays
    roughly like 1/depth (tanh's mean-field fixed point at unit gain is 0), so the
    [0.5, 2] band holds for neither 5 nor 20 layers."""
    assert _geo_ratio(1.0, depth=5) < 0.5
    assert _geo_ratio(1.0, depth=20) < 0.15


class _Block(nn.Module):
    def __init__(self, c: int, downsample: bool) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.downsample = (
            nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)) if downsample else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return torch.relu(out)


def test_initialize_picks_the_following_activation() -> None:
    model = nn.Sequential(
        nn.Linear(10, 20),
        nn.BatchNorm1d(20),
        nn.ReLU(),
        nn.Linear(20, 20),
        nn.Tanh(),
        nn.Linear(20, 20),
        nn.SELU(),
        nn.Linear(20, 5),
    )
    report = ni.initialize(model, generator=torch.Generator().manual_seed(0))
    rows = {r[0]: r for r in report.rows}
    assert report.method == "fx"
    assert (rows["0"][2], rows["0"][3]) == ("he", "relu")
    assert (rows["3"][2], rows["3"][3]) == ("xavier", "tanh")
    assert (rows["5"][2], rows["5"][3]) == ("lecun", "selu")
    assert (rows["7"][2], rows["7"][3]) == ("xavier", "linear")
    assert rows["0"][5] == pytest.approx(math.sqrt(2 / 10), rel=0.15)
    assert all(float(m.bias.detach().abs().max()) == 0 for m in model if isinstance(m, nn.Linear))
    assert "initialize (fx)" in str(report)


def test_initialize_falls_back_to_module_order() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act, self.out = nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
                x = x * 2
            return self.out(self.act(self.fc(x)))

    report = ni.initialize(Untraceable())
    assert report.method == "module order"
    assert [(r[0], r[3]) for r in report.rows] == [("fc", "tanh"), ("out", "linear")]


def test_zero_init_residual_zeroes_the_branch_norm_not_the_downsample() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Block(8, False), _Block(8, True))
    report = ni.initialize(model, zero_init_residual=True)
    assert report.zeroed_residual == ["1.bn2", "2.bn2"]
    assert (
        float(model[2].bn2.weight.abs().max()) == 0
        and float(model[2].downsample[1].weight.min()) == 1
    )


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_lsuv_meets_tolerance(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(
            nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)
        )
        x = torch.randn(256, 20) * 5
    else:
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 12 * 12, 10),
        )
        x = torch.randn(64, 3, 16, 16) * 3
    variances = ni.lsuv_(model, x, tol=0.1)
    assert all(abs(v - 1) <= 0.1 for v in variances.values()), variances


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown scheme 'magic'"):
        ni.initialize(nn.Linear(2, 2), scheme="magic")
    with pytest.raises(ValueError, match="at least 2 dimensions, got shape \\(3,\\)"):
        ni.variance_scaling_(torch.empty(3))
    with pytest.raises(ValueError, match="mode must be 'fan_in', 'fan_out' or 'fan_avg'"):
        ni.variance_scaling_(torch.empty(3, 3), mode="fan_max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distribution must be"):
        ni.variance_scaling_(torch.empty(3, 3), distribution="cauchy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale must be positive"):
        ni.variance_scaling_(torch.empty(3, 3), scale=0)
    with pytest.raises(ValueError, match="lsuv_ found no Conv/Linear layer"):
        ni.lsuv_(nn.ReLU(), torch.randn(2, 2))


def test_lsuv_warns_when_a_layer_cannot_reach_unit_variance() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    # an all-zero input gives the first layer zero output variance: no rescaling can fix that
    with pytest.warns(
        RuntimeWarning, match=r"lsuv_: layer '0' reached output variance 0 after 3 iterations"
    ):
        ni.lsuv_(model, torch.zeros(64, 4), max_iters=3)
