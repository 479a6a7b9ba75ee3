"""The judge: pure rules, edge cases and hypothesis properties."""

from __future__ import annotations

import math
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from canaryd.analysis import BackendStats, Judgement, Observation, Verdict
from canaryd.judge import combine, judge
from canaryd.spec import AnalysisSpec
from tests.specs import analysis_spec

SPEC = analysis_spec()


def obs(canary: BackendStats | None, stable: BackendStats | None = None, error: str | None = None) -> Observation:
    return Observation("envoy", canary=canary, stable=stable, error=error)


def j(verdict: Verdict) -> Judgement:
    return Judgement("s", verdict, "")


def test_combine_precedence() -> None:
    assert combine([]) is Verdict.PASS
    assert combine([j(Verdict.PASS), j(Verdict.INCONCLUSIVE)]) is Verdict.INCONCLUSIVE
    assert combine([j(Verdict.INCONCLUSIVE), j(Verdict.FAIL)]) is Verdict.FAIL
    assert combine([j(Verdict.FAIL), j(Verdict.ERROR), j(Verdict.PASS)]) is Verdict.ERROR
    assert combine(iter([j(Verdict.PASS)])) is Verdict.PASS


def test_error_wins() -> None:
    r = judge(obs(BackendStats(1000, 0), error="Prometheus at http://p:9090 down"), SPEC)
    assert r.verdict is Verdict.ERROR and "http://p:9090" in r.reason


def test_below_min_requests_is_inconclusive() -> None:
    r = judge(obs(BackendStats(49, 49)), SPEC)
    assert r.verdict is Verdict.INCONCLUSIVE
    assert r.reason == "only 49 canary requests in the window (need 50)"


def test_absolute_failure_reason_carries_numbers() -> None:
    r = judge(obs(BackendStats(4210, 370.5), BackendStats(4210, 4.21)), SPEC)
    assert r.verdict is Verdict.FAIL
    assert "canary success rate 91.2% < 99% (stable 99.9%, 4,210 requests)" in r.reason


def test_pass_without_stable() -> None:
    r = judge(obs(BackendStats(100, 0)), SPEC)
    assert r.verdict is Verdict.PASS and r.reason == "canary success rate 100% >= 99%"


def test_zero_errors_on_both_sides_passes() -> None:
    r = judge(obs(BackendStats(500, 0), BackendStats(500, 0)), replace(SPEC, tolerance_pct=0))
    assert r.verdict is Verdict.PASS


def test_stable_without_requests_is_not_compared() -> None:
    r = judge(obs(BackendStats(500, 0), BackendStats(0, 0)), SPEC)
    assert r.verdict is Verdict.PASS and "too few to compare" in r.reason


def test_relative_check_fails_when_absolute_passes() -> None:
    spec = replace(SPEC, success_rate_min=90.0)
    r = judge(obs(BackendStats(10000, 300), BackendStats(10000, 10)), spec)
    assert r.verdict is Verdict.FAIL and "canary error rate 3% > stable 0.1%" in r.reason


def test_relative_check_respects_tolerance() -> None:
    spec = replace(SPEC, success_rate_min=90.0, tolerance_pct=5.0)
    r = judge(obs(BackendStats(10000, 300), BackendStats(10000, 10)), spec)
    assert r.verdict is Verdict.PASS


def test_small_difference_is_not_significant() -> None:
    spec = replace(SPEC, success_rate_min=90.0, tolerance_pct=0.0)
    r = judge(obs(BackendStats(60, 2), BackendStats(60, 1)), spec)
    assert r.verdict is Verdict.PASS


def test_latency() -> None:
    spec = replace(SPEC, latency_max_ms=250.0)
    assert judge(obs(BackendStats(100, 0, 120.0)), spec).verdict is Verdict.PASS
    r = judge(obs(BackendStats(100, 0, 497.5), BackendStats(100, 0, 24.0)), spec)
    assert r.verdict is Verdict.FAIL and r.reason == "canary p99 latency 498 ms > 250 ms (stable 24 ms)"
    assert judge(obs(BackendStats(100, 0, None)), spec).verdict is Verdict.INCONCLUSIVE
    assert judge(obs(BackendStats(100, 0, math.nan)), spec).verdict is Verdict.INCONCLUSIVE
    # Without a limit latency is informative only.
    assert judge(obs(BackendStats(100, 0, 9999.0)), SPEC).verdict is Verdict.PASS


def test_nan_and_negative_counts_are_errors() -> None:
    assert judge(obs(BackendStats(math.nan, 0)), SPEC).verdict is Verdict.ERROR
    assert judge(obs(BackendStats(100, 0), BackendStats(math.inf, 0)), SPEC).verdict is Verdict.ERROR
    assert judge(obs(BackendStats(-1, 0)), SPEC).verdict is Verdict.ERROR


def test_errors_are_clamped() -> None:
    assert judge(obs(BackendStats(100, -0.3)), SPEC).verdict is Verdict.PASS
    assert judge(obs(BackendStats(100, 100.4)), SPEC).verdict is Verdict.FAIL


def test_no_canary_data() -> None:
    assert judge(obs(None), SPEC).verdict is Verdict.INCONCLUSIVE


counts = st.floats(min_value=0, max_value=1e6, allow_nan=False)
specs = st.builds(
    lambda sr, conf, tol, mn: replace(SPEC, success_rate_min=sr, confidence=conf, tolerance_pct=tol, min_requests=mn),
    st.floats(0, 100),
    st.floats(0.5, 0.9999),
    st.floats(0, 100),
    st.integers(1, 10_000),
)


@st.composite
def stats(draw: st.DrawFn) -> BackendStats:
    n = draw(counts)
    return BackendStats(n, draw(st.floats(0, 1)) * n)


@given(stats(), st.none() | stats(), specs)
def test_never_decides_below_min_sample(canary: BackendStats, stable: BackendStats | None, spec: AnalysisSpec) -> None:
    r = judge(obs(canary, stable), spec)
    if canary.requests < spec.min_requests:
        assert r.verdict is Verdict.INCONCLUSIVE


@given(stats(), specs)
def test_identical_stats_never_fail_relative(s: BackendStats, spec: AnalysisSpec) -> None:
    rate = s.success_rate
    if rate is None or rate < spec.success_rate_min:
        return
    assert judge(obs(s, s), spec).verdict is not Verdict.FAIL


@given(stats(), st.none() | stats(), specs, st.floats(0, 1))
def test_more_canary_errors_never_turn_fail_into_pass(
    canary: BackendStats, stable: BackendStats | None, spec: AnalysisSpec, extra: float
) -> None:
    worse = BackendStats(canary.requests, canary.errors + extra * (canary.requests - canary.errors))
    if judge(obs(canary, stable), spec).verdict is Verdict.FAIL:
        assert judge(obs(worse, stable), spec).verdict is Verdict.FAIL
