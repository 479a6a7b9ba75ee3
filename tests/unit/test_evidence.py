"""The anytime-valid judge: bounds, decisions, garbage inputs and a small seeded validity check."""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

import pytest

from canaryd.core.evidence import (
    Assessment,
    Outcome,
    Tally,
    assess,
    log_evidence,
    lower_bound,
    split_alpha,
    upper_bound,
)

DEFAULTS: dict[str, Any] = {"success_rate_min": 99.0, "tolerance_pct": 0.5, "confidence": 0.99, "min_requests": 50}


def judge(canary: Tally, stable: Tally | None = None, **overrides: Any) -> Assessment:
    return assess(canary, stable, **{**DEFAULTS, **overrides})


@pytest.mark.parametrize(
    ("n", "e"), [(1, 0), (1, 1), (10, 3), (50, 1), (1000, 0), (1000, 10), (4321.7, 87.2), (1e6, 1e3), (1e7, 9e6)]
)
def test_bounds_contain_the_point_estimate(n: float, e: float) -> None:
    lo, hi = lower_bound(n, e, 0.01), upper_bound(n, e, 0.01)
    assert 0.0 <= lo <= e / n <= hi <= 1.0


def test_bounds_are_the_roots_of_the_evidence() -> None:
    # Each bound is where the one-sided evidence crosses 1/alpha; just inside it is rejected.
    level = math.log(1 / 0.01)
    for n, e in ((500, 20), (20000, 15), (300, 290)):
        lo, hi = lower_bound(n, e, 0.01), upper_bound(n, e, 0.01)
        assert log_evidence(n, e, lo, side=1) == pytest.approx(level, abs=1e-6)
        assert log_evidence(n, e, hi, side=-1) == pytest.approx(level, abs=1e-6)
        assert log_evidence(n, e, lo * 0.99, side=1) > level > log_evidence(n, e, lo * 1.01, side=1)


def test_bounds_shrink_with_more_requests() -> None:
    widths = [upper_bound(n, n / 100, 0.01) - lower_bound(n, n / 100, 0.01) for n in (100, 1000, 10**4, 10**5, 10**6)]
    assert all(a > b for a, b in itertools.pairwise(widths))
    assert widths[-1] < 0.0012  # 1 % +- 0.06 pp with a million requests: the bounds keep shrinking at large n
    assert lower_bound(1e8, 1e6, 0.01) > 0.0099


def test_zero_counts() -> None:
    empty = judge(Tally(0, 0), Tally(0, 0))
    assert empty.outcome is Outcome.INSUFFICIENT
    assert empty.canary_error_bounds == (0.0, 1.0) and empty.stable_error_bounds == (0.0, 1.0)
    assert "only 0 canary requests" in empty.reason
    clean = judge(Tally(100_000, 0), Tally(100_000, 0))
    assert clean.outcome is Outcome.OK
    assert clean.canary_error_bounds is not None
    lo, hi = clean.canary_error_bounds
    assert lo == 0.0 and 0.0 < hi < 2e-4
    assert judge(Tally(0, 0), None, min_requests=0).outcome is Outcome.OK


def test_identical_to_stable_at_the_limit_is_not_harm() -> None:
    # Both at exactly 99 % success: on the boundary of the absolute and within the relative test.
    same = Tally(2_000_000, 20_000)
    a = judge(same, same)
    assert a.outcome is Outcome.OK
    assert a.evidence < a.threshold
    assert a.canary_error_bounds is not None and a.canary_error_bounds[0] < 0.01 < a.canary_error_bounds[1]


def test_clear_regression_is_harm() -> None:
    a = judge(Tally(2000, 100), Tally(40_000, 40))  # 5 % vs 0.1 %
    assert a.outcome is Outcome.HARM
    assert a.evidence >= a.threshold
    assert "stable ≤" in a.reason and "+ 0.5 pp" in a.reason
    # Harm is shown before min_requests when it is that clear.
    early = judge(Tally(30, 12), Tally(600, 0))
    assert early.outcome is Outcome.HARM


def test_absolute_limit_without_a_stable() -> None:
    a = judge(Tally(500, 50), None)
    assert a.outcome is Outcome.HARM and "allowed" in a.reason and a.stable_error_bounds is None
    assert judge(Tally(500, 2), None).outcome is Outcome.OK


def test_latency() -> None:
    slow = judge(Tally(5000, 0, slow=250), Tally(50_000, 0), latency_quantile=0.99)  # 5 % slower than the limit
    assert slow.outcome is Outcome.HARM and "latency limit" in slow.reason
    assert slow.canary_slow_bounds is not None and slow.canary_slow_bounds[0] > 0.01
    fine = judge(Tally(5000, 0, slow=20), Tally(50_000, 0), latency_quantile=0.99)
    assert fine.outcome is Outcome.OK
    assert judge(Tally(5000, 0, slow=250), Tally(50_000, 0)).outcome is Outcome.OK  # no latency test
    unknown = judge(Tally(5000, 0), Tally(50_000, 0), latency_quantile=0.99)
    assert unknown.outcome is Outcome.INSUFFICIENT and "latency not measured" in unknown.reason


def test_evidence_is_monotone_in_the_counts() -> None:
    # More canary errors never lower the evidence; more requests with the same errors never raise it.
    # The benchmark's block skipping relies on this.
    def ev(c: Tally, s: Tally) -> float:
        a = judge(c, s)
        return a.evidence / a.threshold

    for n, e in ((200, 3), (5000, 60), (80_000, 900)):
        s = Tally(20 * n, n / 200)
        assert ev(Tally(n, e), s) <= ev(Tally(n, e + 1), s)
        assert ev(Tally(n, e), s) >= ev(Tally(n + 50, e), s)
        assert ev(Tally(n, e), s) <= ev(Tally(n, e), Tally(s.requests + 1000, s.errors))
        assert ev(Tally(n, e), s) >= ev(Tally(n, e), Tally(s.requests, s.errors + 5))


def test_garbage() -> None:
    for bad in (Tally(math.nan, 0), Tally(100, math.inf), Tally(-5, 0), Tally(100, 1, slow=math.nan)):
        with pytest.raises(ValueError):
            judge(bad, Tally(100, 0), latency_quantile=0.99)
    with pytest.raises(ValueError):
        judge(Tally(100, 0), Tally(math.inf, 0))
    for setting in ({"confidence": 1.0}, {"confidence": math.nan}, {"success_rate_min": 101}, {"min_requests": -1}):
        with pytest.raises(ValueError):
            judge(Tally(100, 0), None, **setting)
    # increase() noise is clamped, not refused: a hair over the requests, a hair below zero.
    over, at = judge(Tally(100, 100.4), None), judge(Tally(100, 100), None)
    assert over.outcome is at.outcome is Outcome.HARM and over.canary_error_bounds == at.canary_error_bounds
    assert judge(Tally(100, -0.2), None).canary_error_bounds == judge(Tally(100, 0), None).canary_error_bounds
    # A NaN slow count is ignored when there is no latency test.
    assert judge(Tally(100, 0, slow=math.nan), None).outcome is Outcome.OK


def test_tally_add_and_alpha_split() -> None:
    assert Tally(10, 1, 2) + Tally(5, 0.5, 1) == Tally(15, 1.5, 3)
    assert (Tally(10, 1, 2) + Tally(5, 0)).slow is None
    for stable in (False, True):
        for latency in (False, True):
            a = split_alpha(0.99, with_stable=stable, with_latency=latency)
            total = a.canary_errors + (a.stable_errors or 0.0) + (a.canary_slow or 0.0)
            assert total == pytest.approx(0.01)
            assert (a.stable_errors is not None) is stable and (a.canary_slow is not None) is latency


def _binomial(rng: random.Random, n: int, p: float) -> int:
    return sum(rng.random() < p for _ in range(n))


def test_validity_when_looked_at_after_every_batch() -> None:
    # Canary and stable both at 5 % errors with success-rate-min 95 and no tolerance: the absolute and
    # the relative null both sit on their boundary, the hardest case. Looking after every batch must
    # not push the chance of *ever* saying HARM above alpha (0.1 here, so that 200 runs can see it).
    rng = random.Random(20240601)
    runs, looks, alpha = 200, 30, 0.1
    false_harm = 0
    for _ in range(runs):
        c = s = Tally(0, 0)
        for _ in range(looks):
            c += Tally(40, _binomial(rng, 40, 0.05))
            s += Tally(200, _binomial(rng, 200, 0.05))
            a = assess(c, s, success_rate_min=95.0, tolerance_pct=0.0, confidence=1 - alpha, min_requests=50)
            if a.outcome is Outcome.HARM:
                false_harm += 1
                break
    assert false_harm <= runs * (alpha + 0.05)
    # And the same looks do catch a canary at 15 %.
    caught = 0
    for _ in range(50):
        c = s = Tally(0, 0)
        for _ in range(looks):
            c += Tally(40, _binomial(rng, 40, 0.15))
            s += Tally(200, _binomial(rng, 200, 0.05))
            if assess(
                c, s, success_rate_min=95.0, tolerance_pct=0.0, confidence=1 - alpha, min_requests=50
            ).outcome is (Outcome.HARM):
                caught += 1
                break
    assert caught >= 45
