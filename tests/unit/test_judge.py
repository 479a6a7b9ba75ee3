"""The judge: round counts accumulate into a tally, the cumulative evidence gives the verdict."""

from __future__ import annotations

import pytest

from canaryd.core.analysis import BackendStats, Observation, Verdict
from canaryd.core.judge import SignalTally, combine, judge_round
from tests.specs import analysis_spec

SPEC = analysis_spec()


def obs(c: tuple[float, float], s: tuple[float, float] | None = (1000, 1), slow: float | None = None) -> Observation:
    return Observation(
        "envoy",
        canary=BackendStats(c[0], c[1], slow=slow),
        stable=None if s is None else BackendStats(s[0], s[1]),
    )


def test_cumulative_counts_show_what_one_window_would_not() -> None:
    # 3 % errors against a 1 % limit: 40 requests are too few at once; the rollout's 480 are not.
    first, _ = judge_round(obs((40, 1.2), (4000, 4)), SPEC)
    assert first.verdict == Verdict.INCONCLUSIVE
    later, tally = judge_round(obs((480, 14.4), (48000, 48)), SPEC)
    assert later.verdict == Verdict.FAIL
    assert tally is not None and tally.canary.requests == pytest.approx(480)


def test_a_healthy_canary_at_the_threshold_is_not_failed() -> None:
    # Canary and stable both exactly at success-rate-min 99 %: a point estimate fails half the rounds.
    for k in range(1, 51):  # the same rollout looked at 50 times as its counts grow
        j, _ = judge_round(obs((1000 * k, 10 * k), (9000 * k, 90 * k)), SPEC)
        assert j.verdict != Verdict.FAIL
    assert j.verdict == Verdict.PASS


def test_an_erroring_round_keeps_no_counts() -> None:
    j, after = judge_round(Observation("envoy", None, None, error="Prometheus down"), SPEC)
    assert j.verdict == Verdict.ERROR and after is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -5.0])
def test_garbage_numbers_are_an_error_not_a_verdict(bad: float) -> None:
    j, after = judge_round(obs((bad, 0)), SPEC)
    assert j.verdict == Verdict.ERROR and after is None


def test_latency_counts_slow_requests_against_the_quantile() -> None:
    spec = analysis_spec(latency_max_ms=250.0, latency_quantile=0.99)
    j, _ = judge_round(obs((2000, 0), slow=200), spec)  # 10 % over the limit, 1 % allowed
    assert j.verdict == Verdict.FAIL and "latency" in j.reason
    j, _ = judge_round(obs((2000, 0), slow=2), spec)
    assert j.verdict == Verdict.PASS
    j, _ = judge_round(obs((2000, 0), slow=None), spec)  # limit set, buckets missing: never a pass
    assert j.verdict == Verdict.INCONCLUSIVE


def test_tally_round_trips_through_the_state_and_refuses_garbage() -> None:
    t = SignalTally.from_list([10.0, 1.0, None, 20.0, 0.0])
    assert SignalTally.from_list(t.to_list()) == t
    for garbage in ([1, 2], "x", [None, 1, 2, 3, 4], [float("nan"), 0, None, None, None]):
        with pytest.raises(ValueError):
            SignalTally.from_list(garbage)


def test_combine_orders_error_fail_inconclusive_pass() -> None:
    def j(v: Verdict) -> object:
        return judge_round(obs((0, 0)), SPEC)[0].__class__("x", v, "")

    assert combine([j(Verdict.PASS), j(Verdict.FAIL)]) == Verdict.FAIL  # type: ignore[list-item]
    assert combine([j(Verdict.INCONCLUSIVE), j(Verdict.ERROR)]) == Verdict.ERROR  # type: ignore[list-item]
    assert combine([]) == Verdict.PASS
