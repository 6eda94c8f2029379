"""Claims and verdicts: intervals against scipy (and the long way), the three-valued verdict, bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from normlab.lab.experiments import Claim, t_interval, verdict


def _claim(op: str = ">=", threshold: float = 1.0, **kw: object) -> Claim:
    return Claim("c", "statement", "paper", "quantity", op, threshold, "paper value", **kw)  # type: ignore[arg-type]


def test_t_interval_matches_scipy_and_the_long_way() -> None:
    x = [0.91, 0.95, 0.93, 0.97, 0.92]
    mean, lo, hi = t_interval(x)
    ref = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert (lo, hi) == pytest.approx(ref) and mean == pytest.approx(np.mean(x))
    half = 2.7764451 * np.std(x, ddof=1) / math.sqrt(5)  # t(0.975, 4)
    assert hi - mean == pytest.approx(half, rel=1e-6)
    assert t_interval([0.5])[1:] == (-math.inf, math.inf)  # one value: no interval


@pytest.mark.parametrize(
    ("op", "threshold", "interval", "expected"),
    [
        (">", 0.0, (0.01, 0.2), "confirmed"),
        (">", 0.0, (-0.3, -0.01), "refuted"),
        (">", 0.0, (-0.1, 0.1), "inconclusive"),
        (">=", 2.0, (2.0, 3.0), "confirmed"),
        ("<", 0.5, (0.1, 0.4), "confirmed"),
        ("<", 0.5, (0.5, 0.9), "refuted"),
        ("<=", 0.5, (0.4, 0.6), "inconclusive"),
        ("within", 0.02, (-0.01, 0.015), "confirmed"),
        ("within", 0.02, (0.021, 0.05), "refuted"),
        ("within", 0.02, (-0.01, 0.03), "inconclusive"),
    ],
)
def test_verdict_is_three_valued(
    op: str, threshold: float, interval: tuple[float, float], expected: str
) -> None:
    assert verdict(op, threshold, *interval) == expected


def test_check_mean_gives_estimate_interval_and_verdict() -> None:
    result = _claim(">", 0.0).check([0.10, 0.12, 0.08, 0.11, 0.09])
    assert result.n == 5 and result.estimate == pytest.approx(0.10)
    assert result.ci_low > 0 and result.verdict == "confirmed" and result.passed
    assert "t interval" in result.method
    noisy = _claim(">", 0.0).check([0.3, -0.2, 0.1, -0.1, 0.05])
    assert noisy.ci_low < 0 < noisy.ci_high and noisy.verdict == "inconclusive"


def test_log_scale_averages_log_ratios() -> None:
    ratios = [2.0, 8.0, 4.0, 4.0]
    result = _claim(">=", 2.0, scale="log").check(ratios)
    assert result.estimate == pytest.approx(4.0)  # the geometric mean, not the mean 4.5
    _, lo, hi = t_interval(np.log(ratios).tolist())
    assert (result.ci_low, result.ci_high) == pytest.approx((math.exp(lo), math.exp(hi)))
    assert "log scale" in result.method
    with pytest.raises(ValueError, match="log-scale claim needs a positive threshold"):
        _claim(">", 0.0, scale="log")


def test_a_seed_without_a_value_makes_the_verdict_inconclusive() -> None:
    result = _claim(">", 0.0).check([0.2, None, 0.3, 0.25])  # a diverged run, stored as null
    assert result.n == 3 and result.estimate == pytest.approx(0.25)
    assert result.verdict == "inconclusive" and "1 of 4 seeds have no value" in result.note
    assert math.isnan(result.values[1])


def test_one_seed_has_no_interval() -> None:
    result = _claim(">", 0.0).check([0.5])
    assert result.verdict == "inconclusive" and "no interval" in result.note
    assert result.ci_low == -math.inf and result.ci_high == math.inf


def test_bounds_only_allow_the_verdicts_they_cannot_overturn() -> None:
    # lower bounds (runs that never escaped, counted at the budget) can only move a ratio up
    big = [10.0, 12.0, 11.0]
    assert _claim(">=", 5.0, scale="log").check(big, censored=["lower", None, None]).passed
    small = [1.0, 1.2, 1.1]
    low = _claim(">=", 5.0, scale="log").check(small, censored=["lower", None, None])
    assert low.verdict == "inconclusive" and "bounds" in low.note
    assert _claim(">=", 5.0, scale="log").check(small).verdict == "refuted"
    # upper bounds mirror it for '<'
    up = _claim("<=", 0.5, scale="log").check([0.1, 0.2, 0.15], censored=["upper"] * 3)
    assert up.verdict == "confirmed"
    assert _claim("<=", 0.5, scale="log").check(
        [0.1, 0.2, 0.15], censored=["lower"] * 3
    ).verdict == ("inconclusive")
    with pytest.raises(ValueError, match="3 values but 2 censoring flags"):
        _claim().check([1.0, 2.0, 3.0], censored=[None, None])


def test_rate_uses_wilson() -> None:
    result = _claim("<", 0.5).check_rate([False] * 5)
    ci = stats.binomtest(0, 5).proportion_ci(0.95, method="wilson")
    assert result.estimate == 0.0 and (result.ci_low, result.ci_high) == pytest.approx(
        (ci.low, ci.high)
    )
    assert result.verdict == "confirmed" and "Wilson" in result.method
    assert _claim("<", 0.5).check_rate([True] * 5).verdict == "refuted"
    assert _claim("<", 0.5).check_rate([True, False, True, False, False]).verdict == "inconclusive"


def test_bootstrap_is_paired_deterministic_and_bounded() -> None:
    a = np.array([0.9, 0.8, 0.85, 0.95, 0.7])
    b = np.array([0.5, 0.45, 0.4, 0.6, 0.35])

    def ratio(idx: np.ndarray) -> float:
        return float((a[idx] - b[idx]).mean() / a[idx].mean())

    one = _claim(">=", 0.3).check_bootstrap(5, ratio)
    two = _claim(">=", 0.3).check_bootstrap(5, ratio)
    assert one == two  # a fixed generator: the same results give the same interval
    assert one.estimate == pytest.approx(ratio(np.arange(5)))
    assert one.ci_low <= one.estimate <= one.ci_high and "bootstrap" in one.method
    assert one.verdict == "confirmed"
    constant = _claim(">", 6.0).check_bootstrap(5, lambda idx: 8.0)
    assert (constant.ci_low, constant.ci_high) == (8.0, 8.0) and constant.passed
    bounded = _claim(">", 6.0).check_bootstrap(5, lambda idx: 2.0, bound="lower")
    assert bounded.verdict == "inconclusive"  # a lower bound below the threshold refutes nothing
    assert _claim(">", 6.0).check_bootstrap(1, lambda idx: 8.0).verdict == "inconclusive"


def test_claim_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="op must be one of"):
        _claim("=>")
    with pytest.raises(ValueError, match="kind must be 'claim' or 'sanity'"):
        _claim(kind="check")
    with pytest.raises(ValueError, match="threshold_origin must be 'paper' or 'ours'"):
        _claim(threshold_origin="mine")


def test_as_dict_is_json_ready() -> None:
    d = _claim(">", 0.0, kind="sanity").check([0.1, 0.2, 0.3]).as_dict()
    assert d["claim"]["kind"] == "sanity" and d["claim"]["paper_value"] == "paper value"
    assert {"n", "estimate", "ci_low", "ci_high", "threshold", "verdict", "method"} <= set(d)


def test_a_rate_without_runs_keeps_the_reason() -> None:
    """A claim measured only in some runs says why it has no value (not a bare "no runs")."""
    claim = Claim("c", "s", "p", "q", ">", 0.5, "v")
    assert claim.check_rate([], note="full runs only").note == "full runs only"
    assert claim.check_rate([]).note == "no runs"
