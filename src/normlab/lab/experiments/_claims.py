r"""Claims and verdicts: a statistic over seeds, its 95 % interval, and a three-valued verdict.

A claim compares a statistic with a threshold (``op`` one of ``> >= < <=``, or ``within``:
:math:`|x| < t`, an equivalence claim). The statistic comes with a 95 % confidence
interval :math:`[lo, hi]`, computed one of three ways (``method`` says which):

* **mean** of per-seed values (paired differences when arms are compared): Student's
  *t* interval :math:`\bar x \pm t_{0.975,\,n-1}\, s/\sqrt n` (``scipy.stats.t``);
  with ``scale="log"`` the values are per-seed ratios, averaged as
  :math:`\exp(\overline{\ln x})` with the interval taken on the log scale;
* **rate** of successes :math:`k/n`: Wilson's score interval (``scipy.stats.binomtest``);
* **bootstrap**: a statistic of the whole set of seeds (a ratio of means, the largest
  learning rate that trains): percentile interval over 2,000 resamples of the seeds
  (``scipy.stats.bootstrap``, fixed generator, so the same results give the same interval),
  the arms resampled together (paired by seed).

The verdict is ``confirmed`` when the whole interval lies on the claimed side of the
threshold, ``refuted`` when it lies wholly on the other side, ``inconclusive``
otherwise — also when a seed has no value (a diverged run the experiment could not
score), or when fewer than two seeds leave no interval at all.

Censored values: a value recorded at a budget (a run that never reached a level
counts as the budget) is only a bound. ``censored[i] = "lower"`` says the true value is
≥ the recorded one, ``"upper"`` that it is ≤. A verdict that a bound could overturn is
downgraded to ``inconclusive`` (for ``>``: confirming needs no upper bounds, refuting no
lower bounds; mirrored for ``<``).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np
from scipy import stats

__all__ = [
    "LEVEL",
    "LEVEL_TEXT",
    "OPS",
    "Claim",
    "ClaimResult",
    "accuracy_level",
    "as_floats",
    "t_interval",
    "verdict",
]

LEVEL = 0.95
LEVEL_TEXT = f"{round(LEVEL * 100)} %"
OPS = (">", ">=", "<", "<=", "within")
BOOTSTRAP_RESAMPLES = 2000

Verdict = Literal["confirmed", "refuted", "inconclusive"]
Censor = Literal["lower", "upper"] | None


def accuracy_level(level: float, dataset: str) -> float:
    """An absolute accuracy threshold written for digits, adjusted for ``dataset`` (−0.10 on fashion-mnist)."""
    return level - 0.10 if dataset == "fashion-mnist" else level


def as_floats(values: Sequence[float | None]) -> list[float]:
    """``values`` as floats; ``None`` (a diverged run, stored as JSON null) becomes NaN."""
    return [float("nan") if v is None else float(v) for v in values]


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """``(mean, low, high)``: Student's t interval; ``(mean, -inf, inf)`` for fewer than two values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, -math.inf, math.inf
    mean = float(x.mean())
    if x.size < 2:
        return mean, -math.inf, math.inf
    half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def verdict(op: str, threshold: float, low: float, high: float) -> Verdict:
    """Three-valued verdict of ``statistic <op> threshold`` from its interval ``[low, high]``."""
    t = threshold
    if op == ">":
        yes, no = low > t, high <= t
    elif op == ">=":
        yes, no = low >= t, high < t
    elif op == "<":
        yes, no = high < t, low >= t
    elif op == "<=":
        yes, no = high <= t, low > t
    elif op == "within":
        yes, no = (-t < low and high < t), (low >= t or high <= -t)
    else:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return "confirmed" if yes else "refuted" if no else "inconclusive"


def _censoring_allows(op: str, result: Verdict, censored: Sequence[Censor]) -> bool:
    kinds = {c for c in censored if c is not None}
    if not kinds or result == "inconclusive":
        return True
    if op == "within":
        return False
    greater = op in (">", ">=")
    # a lower bound can only move the statistic up, an upper bound only down
    blocks = {
        ("confirmed", True): "upper",
        ("refuted", True): "lower",
        ("confirmed", False): "lower",
        ("refuted", False): "upper",
    }[(result, greater)]
    return blocks not in kinds


_LEVEL = re.compile(r"\{(pct|level):(\d*\.\d+)\}")


@dataclass(frozen=True)
class Claim:
    """A published claim as a measurable comparison: ``statistic <op> threshold``.

    Parameters
    ----------
    name, statement
        Identifier and the sentence the report shows.
    paper
        Where the claim comes from.
    quantity
        What is measured (per seed, or over seeds for a rate or bootstrap statistic).
    op, threshold
        The comparison (:data:`OPS`); ``within`` means ``|statistic| < threshold``.
    paper_value
        The paper's own number beside ours, with the figure or table it comes from.
    threshold_origin
        ``"paper"`` when the threshold is read from the paper, ``"ours"`` when it is our choice.
    kind
        ``"claim"`` (a reproduction) or ``"sanity"`` (holds by construction; listed apart).
    scale
        ``"log"``: per-seed values are ratios, averaged on the log scale.
    model
        The network the claim is measured on: ``"mlp"`` (the lab's MLPs) or ``"cnn"`` (its
        ConvNet, :func:`normlab.lab.models.convnet`); :meth:`for_model` makes the ConvNet copy.

    ``statement`` and ``quantity`` may name absolute accuracy levels as ``{pct:0.90}`` (shown
    as "90%") or ``{level:0.80}`` (shown as "0.80"); :meth:`for_dataset` renders them at the
    dataset's level (:func:`accuracy_level`).
    """

    name: str
    statement: str
    paper: str
    quantity: str
    op: str
    threshold: float
    paper_value: str
    threshold_origin: Literal["paper", "ours"] = "ours"
    kind: Literal["claim", "sanity"] = "claim"
    scale: Literal["linear", "log"] = "linear"
    model: Literal["mlp", "cnn"] = "mlp"

    def __post_init__(self) -> None:
        if self.model not in ("mlp", "cnn"):
            raise ValueError(f"model must be 'mlp' or 'cnn', got {self.model!r}")
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.kind not in ("claim", "sanity"):
            raise ValueError(f"kind must be 'claim' or 'sanity', got {self.kind!r}")
        if self.scale not in ("linear", "log"):
            raise ValueError(f"scale must be 'linear' or 'log', got {self.scale!r}")
        if self.threshold_origin not in ("paper", "ours"):
            raise ValueError(
                f"threshold_origin must be 'paper' or 'ours', got {self.threshold_origin!r}"
            )
        if self.scale == "log" and not self.threshold > 0:
            raise ValueError(f"a log-scale claim needs a positive threshold, got {self.threshold}")

    def for_dataset(self, dataset: str) -> Claim:
        """This claim with its accuracy levels rendered for ``dataset``."""

        def render(m: re.Match[str]) -> str:
            level = accuracy_level(float(m.group(2)), dataset)
            return f"{level:.0%}" if m.group(1) == "pct" else f"{level:.2f}"

        return replace(
            self,
            statement=_LEVEL.sub(render, self.statement),
            quantity=_LEVEL.sub(render, self.quantity),
        )

    def for_model(self, model: Literal["mlp", "cnn"], paper_value: str | None = None) -> Claim:
        """This claim measured on ``model``: named ``<name>_cnn`` for the ConvNet, its statement
        marked "(ConvNet)"; ``paper_value`` replaces the paper's number when it differs."""
        if model == "mlp":
            return self
        return replace(
            self,
            name=f"{self.name}_{model}",
            statement=f"{self.statement} (ConvNet)",
            model=model,
            paper_value=self.paper_value if paper_value is None else paper_value,
        )

    # --- the three statistics ---------------------------------------------------------
    def check(
        self,
        values: Sequence[float | None],
        *,
        threshold: float | None = None,
        censored: Sequence[Censor] | None = None,
        note: str = "",
    ) -> ClaimResult:
        """The mean of per-seed ``values`` (``scale="log"``: of their logs) with a t interval.

        ``None``/NaN/±inf (no value for that seed) are left out of the statistic and make the
        verdict inconclusive; ``censored`` marks bounds (module docstring).
        """
        vals = as_floats(values)
        limit = self.threshold if threshold is None else float(threshold)
        cens = list(censored) if censored is not None else [None] * len(vals)
        if len(cens) != len(vals):
            raise ValueError(f"{len(vals)} values but {len(cens)} censoring flags")
        ok = [v for v in vals if math.isfinite(v) and (self.scale == "linear" or v > 0)]
        missing = len(vals) - len(ok)
        if self.scale == "log":
            mean, lo, hi = t_interval([math.log(v) for v in ok])
            est, lo, hi = math.exp(mean) if ok else math.nan, _exp(lo), _exp(hi)
            method = (
                f"geometric mean of per-seed ratios, t interval on the log scale ({LEVEL_TEXT})"
            )
        else:
            est, lo, hi = t_interval(ok)
            method = f"mean over seeds, t interval ({LEVEL_TEXT})"
        notes = [note] if note else []
        if missing:
            notes.append(f"{missing} of {len(vals)} seeds have no value")
        if len(ok) < 2:
            notes.append("fewer than two values: no interval")
        kept = [c for v, c in zip(vals, cens) if math.isfinite(v)]
        nb = sum(c is not None for c in kept)
        if nb:
            notes.append(f"{nb} of {len(kept)} values are bounds, censored at the budget")
        result = verdict(self.op, limit, lo, hi) if len(ok) >= 2 else "inconclusive"
        if missing or not _censoring_allows(self.op, result, kept):
            result = "inconclusive"
        return ClaimResult(
            self, len(ok), est, lo, hi, limit, result, method, vals, "; ".join(notes)
        )

    def check_rate(self, successes: Sequence[bool], *, note: str = "") -> ClaimResult:
        """The rate ``k/n`` of ``successes`` with Wilson's 95 % interval."""
        n, k = len(successes), int(sum(bool(s) for s in successes))
        if n == 0:
            return ClaimResult(
                self,
                0,
                math.nan,
                -math.inf,
                math.inf,
                self.threshold,
                "inconclusive",
                "rate",
                [],
                note or "no runs",
            )
        ci = stats.binomtest(k, n).proportion_ci(LEVEL, method="wilson")
        lo, hi = float(ci.low), float(ci.high)
        return ClaimResult(
            self,
            n,
            k / n,
            lo,
            hi,
            self.threshold,
            verdict(self.op, self.threshold, lo, hi),
            f"rate {k}/{n}, Wilson interval ({LEVEL_TEXT})",
            [float(bool(s)) for s in successes],
            note,
        )

    def check_bootstrap(
        self,
        n: int,
        statistic: Callable[[np.ndarray], float],
        *,
        values: Sequence[float] = (),
        bound: Censor = None,
        note: str = "",
    ) -> ClaimResult:
        """``statistic(seed_indices)`` over all ``n`` seeds, with a percentile bootstrap interval
        over resampled seeds (every arm resampled with the same indices: paired).

        ``values``: per-seed numbers to show beside it (not used for the statistic); ``bound``:
        the statistic is only a ``"lower"`` or ``"upper"`` bound (e.g. at the edge of a grid).
        """
        index = np.arange(n)
        estimate = float(statistic(index))
        notes = [note] if note else []
        if n < 2 or not math.isfinite(estimate):
            notes.append("fewer than two seeds" if n < 2 else "the statistic has no value")
            return ClaimResult(
                self,
                n,
                estimate,
                -math.inf,
                math.inf,
                self.threshold,
                "inconclusive",
                "bootstrap",
                list(values),
                "; ".join(notes),
            )
        with np.errstate(all="ignore"), warnings.catch_warnings():
            # a constant statistic (every resample alike) is a point interval, not an error
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)
            res = stats.bootstrap(
                (index,),
                lambda i: float(statistic(i.astype(int))),
                vectorized=False,
                method="percentile",
                n_resamples=BOOTSTRAP_RESAMPLES,
                confidence_level=LEVEL,
                random_state=np.random.default_rng(0),
            )
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isnan(lo) or math.isnan(hi):
            lo, hi = -math.inf, math.inf
            notes.append("some resamples have no value")
        result = verdict(self.op, self.threshold, lo, hi)
        if not _censoring_allows(self.op, result, [bound]):
            result = "inconclusive"
        method = f"percentile bootstrap over seeds, paired ({BOOTSTRAP_RESAMPLES} resamples, {LEVEL_TEXT})"
        return ClaimResult(
            self,
            n,
            estimate,
            lo,
            hi,
            self.threshold,
            result,
            method,
            list(values),
            "; ".join(notes),
        )


def _exp(x: float) -> float:
    return math.exp(x) if math.isfinite(x) else (math.inf if x > 0 else 0.0)


@dataclass(frozen=True)
class ClaimResult:
    """A claim evaluated: ``n`` seeds (or runs), the estimate and its 95 % interval, the verdict."""

    claim: Claim
    n: int
    estimate: float
    ci_low: float
    ci_high: float
    threshold: float
    verdict: Verdict
    method: str
    values: list[float]
    note: str = ""

    @property
    def passed(self) -> bool:
        """Whether the claim is confirmed."""
        return self.verdict == "confirmed"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["claim"] = asdict(self.claim)
        return d
