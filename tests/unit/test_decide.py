"""The state machine, driven with a fake clock only (it is a pure function)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from canaryd.core import spec as ann
from canaryd.core.analysis import BackendStats, Observation, Verdict
from canaryd.core.decide import Decision, Facts, decide
from canaryd.core.spec import RolloutDefaults
from canaryd.core.state import Phase, RolloutState

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def spec(**extra: str) -> ann.RolloutSpec:
    a = {
        ann.CANARY: "v2",
        ann.STEPS: "10,50,100",
        ann.INTERVAL: "10s",
        **{ann.PREFIX + k.replace("_", "-"): v for k, v in extra.items()},
    }
    s = ann.parse_spec(a, RolloutDefaults())
    assert s is not None
    return s


def run(s: ann.RolloutSpec, state: RolloutState | None, now: datetime, **kw: object) -> Decision:
    return decide(Facts(now=now, spec=s, stable="v1", error=None, state=state, **kw))  # type: ignore[arg-type]


ROUND = {  # one round's counts that give each verdict on a fresh tally
    Verdict.FAIL: Observation("envoy", BackendStats(1000, 500), BackendStats(1000, 1)),
    Verdict.PASS: Observation("envoy", BackendStats(1000, 0), BackendStats(1000, 0)),
    Verdict.INCONCLUSIVE: Observation("envoy", BackendStats(5, 0), BackendStats(1000, 0)),
    Verdict.ERROR: Observation("envoy", None, None, error="Prometheus down"),
}


def j(verdict: Verdict) -> list[Observation]:
    return [ROUND[verdict]]


def test_time_based_progression_and_waits() -> None:
    s = spec()
    d = run(s, None, T0)
    assert d.canary_pct == 10 and d.state is not None and d.wake_at == T0 + timedelta(seconds=10)
    st1 = d.state
    assert run(s, st1, T0 + timedelta(seconds=5)).state is None  # not due: nothing written
    d = run(s, st1, T0 + timedelta(seconds=10))
    assert d.canary_pct == 50
    d = run(s, d.state, T0 + timedelta(seconds=20))
    assert d.canary_pct == 100 and d.state is not None and d.state.phase == Phase.PROMOTED


def test_analysis_fail_threshold_then_rollback() -> None:
    s = spec(analysis="envoy", failure_threshold="2")
    st1 = run(s, None, T0).state
    due = T0 + timedelta(seconds=10)
    assert run(s, st1, due).analyze
    d = run(s, st1, due, observations=j(Verdict.FAIL))
    assert d.canary_pct is None and d.state is not None and d.state.failures == 1
    d = run(s, d.state, due + timedelta(seconds=10), observations=j(Verdict.FAIL))
    assert d.canary_pct == 0 and d.state is not None and d.state.phase == Phase.ROLLED_BACK
    assert any(e.reason == "RolledBack" for e in d.events)


def test_inconclusive_pauses_after_limit() -> None:
    s = spec(analysis="envoy", max_inconclusive="2")
    state = run(s, None, T0).state
    now = T0
    for _ in range(2):
        now += timedelta(seconds=10)
        d = run(s, state, now, observations=j(Verdict.INCONCLUSIVE))
        state = d.state
        assert d.canary_pct is None
    assert state is not None and state.phase == Phase.PAUSED


def test_not_ready_holds_then_rolls_back_at_deadline() -> None:
    s = spec(ready_deadline="30s")
    d = run(s, None, T0, canary_ready=False)
    assert d.canary_pct is None and d.state is not None and d.state.phase == Phase.WAITING
    assert run(s, d.state, T0 + timedelta(seconds=5), canary_ready=False).state is None
    d2 = run(s, d.state, T0 + timedelta(seconds=30), canary_ready=False)
    assert d2.canary_pct == 0 and d2.state is not None and d2.state.phase == Phase.ROLLED_BACK


def test_invalid_spec_writes_failed_once() -> None:
    d = decide(Facts(now=T0, spec=None, stable=None, error="bad", state=None))
    assert d.canary_pct is None and d.state is not None and d.state.phase == Phase.FAILED
    again = decide(Facts(now=T0, spec=None, stable=None, error="bad", state=d.state))
    assert again.state is None and not again.events


@settings(max_examples=200)
@given(st.lists(st.sampled_from(list(Verdict)), max_size=30), st.lists(st.booleans(), max_size=30))
def test_never_skips_or_repeats_a_step(verdicts: list[Verdict], ready: list[bool]) -> None:
    s = spec(analysis="envoy", failure_threshold="3", max_inconclusive="4", max_errors="3")
    state: RolloutState | None = None
    now = T0
    written: list[int] = []
    quiet: datetime | None = None  # the engine's memory of an unwritten round
    for i in range(60):
        r = ready[i] if i < len(ready) else True
        v = verdicts[i] if i < len(verdicts) else Verdict.PASS
        d = run(s, state, now, canary_ready=r, quiet_round_at=quiet)
        if d.analyze:
            d = run(s, state, now, canary_ready=r, observations=j(v), quiet_round_at=quiet)
            if d.quiet:
                quiet = now
        if d.canary_pct is not None:
            written.append(d.canary_pct)
        if d.state is not None:
            state = d.state
        if state is not None and (state.phase.terminal or state.phase == Phase.PAUSED):
            break
        now = d.wake_at or now + timedelta(seconds=1)
    steps = [w for w in written if w != 0]
    assert steps == sorted(steps) and len(steps) == len(set(steps))
    assert all(w in (0, 10, 50, 100) for w in written)
    if written and written[-1] == 0:
        assert state is not None and state.phase == Phase.ROLLED_BACK


def test_a_clear_regression_rolls_back_mid_step() -> None:
    s = spec(analysis="envoy", interval="60s", analysis_interval="10s")
    d = run(s, None, T0)
    assert d.canary_pct == 10 and d.wake_at == T0 + timedelta(seconds=10)  # the first round, not the step's end
    at = T0 + timedelta(seconds=10)
    m = run(s, d.state, at)
    assert m.analyze and m.window_s == 10
    d = run(s, d.state, at, observations=j(Verdict.FAIL))
    assert d.canary_pct == 0 and d.state is not None and d.state.phase == Phase.ROLLED_BACK


def test_rounds_inside_a_step_then_advance_at_its_end() -> None:
    s = spec(analysis="envoy", interval="30s", analysis_interval="10s")
    state = run(s, None, T0).state
    assert state is not None
    written: list[int | None] = []
    writes = 0
    quiet: datetime | None = None
    now = T0
    for _ in range(3):
        now += timedelta(seconds=10)
        d = run(s, state, now, observations=j(Verdict.PASS), quiet_round_at=quiet)
        assert len(d.records) == 1 and d.records[0].verdict == "pass"  # every round is judged and reported
        if d.quiet:  # what the engine does: nothing written, the round remembered
            assert d.state is None and d.wake_at == now + timedelta(seconds=10)
            quiet = now
        else:
            assert d.state is not None
            state, writes = d.state, writes + 1
        written.append(d.canary_pct)
    assert written == [None, None, 50]  # the step advances only at its end
    assert writes == 1  # the passing rounds inside the step cost no write; the step's end one
    assert [h.verdict for h in state.history] == ["pass"]  # ... and records the deciding round


def test_a_quiet_round_is_not_repeated_before_its_interval() -> None:
    s = spec(analysis="envoy", interval="30s", analysis_interval="10s")
    state = run(s, None, T0).state
    t1 = T0 + timedelta(seconds=10)
    d = run(s, state, t1, observations=j(Verdict.PASS))
    assert d.quiet
    later = run(s, state, t1 + timedelta(seconds=3), quiet_round_at=t1)  # an event wakes the route
    assert not later.analyze and later.state is None and later.wake_at == t1 + timedelta(seconds=10)
    # A restart forgets it: one round at once, and nothing is lost (the counts are cumulative).
    assert run(s, state, t1 + timedelta(seconds=3)).analyze


def test_a_round_that_moves_a_counter_is_written() -> None:
    s = spec(analysis="envoy", interval="30s", analysis_interval="10s", failure_threshold="3")
    state = run(s, None, T0).state
    d = run(s, state, T0 + timedelta(seconds=10), observations=j(Verdict.FAIL))
    assert not d.quiet and d.state is not None and d.state.failures == 1
    d2 = run(s, d.state, T0 + timedelta(seconds=20), observations=j(Verdict.PASS))  # the failure count resets
    assert not d2.quiet and d2.state is not None and d2.state.failures == 0


def test_a_paused_bad_canary_is_rolled_back() -> None:
    s = spec(analysis="envoy", interval="10s", max_inconclusive="1")
    state = run(s, None, T0).state
    d = run(s, state, T0 + timedelta(seconds=10), observations=j(Verdict.INCONCLUSIVE))
    assert d.state is not None and d.state.phase == Phase.PAUSED
    d = run(s, d.state, T0 + timedelta(seconds=20), observations=j(Verdict.FAIL))
    assert d.canary_pct == 0 and d.state is not None and d.state.phase == Phase.ROLLED_BACK
    assert any(e.reason == "RolledBackWhilePaused" for e in d.events)


def test_evidence_survives_a_restart_through_the_annotation() -> None:
    s = spec(analysis="envoy", interval="10s", min_requests="100")
    state = run(s, None, T0).state
    d = run(s, state, T0 + timedelta(seconds=10), observations=j(Verdict.INCONCLUSIVE))
    assert d.state is not None
    stored = RolloutState.from_annotation(d.state.to_annotation())  # what a new process reads back
    assert stored.tallies == d.state.tallies and stored.tallies["envoy"][0] == 5
    more = [Observation("envoy", BackendStats(10, 0), BackendStats(2000, 0))]  # the counts since the start, grown
    d2 = run(s, stored, T0 + timedelta(seconds=20), observations=more)
    assert d2.state is not None and d2.state.tallies["envoy"][0] == 10
    assert d2.state.counted_since == stored.counted_since == d.state.step_started_at


def test_a_failure_at_the_steps_end_waits_an_interval_before_the_next_round() -> None:
    """Regression: the round after a failing last round ran at once and counted the same answer twice."""
    s = spec(analysis="envoy", interval="10s", analysis_interval="10s", failure_threshold="2")
    state = run(s, None, T0).state
    end = T0 + timedelta(seconds=10)
    d = run(s, state, end, observations=j(Verdict.FAIL))
    assert d.canary_pct is None and d.state is not None and d.state.failures == 1
    assert d.wake_at == end + timedelta(seconds=10) and d.state.next_round_at is not None
    assert not run(s, d.state, end).analyze  # not due again at the same instant
    rb = run(s, d.state, end + timedelta(seconds=10), observations=j(Verdict.FAIL))
    assert rb.canary_pct == 0 and rb.state is not None and rb.state.phase == Phase.ROLLED_BACK


def test_an_error_at_the_steps_end_waits_an_interval_too() -> None:
    s = spec(analysis="envoy", interval="10s", analysis_interval="10s", max_errors="2")
    state = run(s, None, T0).state
    end = T0 + timedelta(seconds=10)
    d = run(s, state, end, observations=j(Verdict.ERROR))
    assert d.state is not None and d.state.errors == 1 and d.wake_at == end + timedelta(seconds=10)
    assert not run(s, d.state, end + timedelta(seconds=1)).analyze


def test_steps_keep_to_their_grid_when_advanced_a_little_late() -> None:
    """The daemon's processing time does not accumulate: a step advanced 0.6 s late still ends on its grid."""
    s = spec(interval="10s")
    first = run(s, None, T0)
    assert first.state is not None and first.wake_at == T0 + timedelta(seconds=10)
    late = run(s, first.state, T0 + timedelta(seconds=10.6))
    assert late.canary_pct == 50 and late.wake_at == T0 + timedelta(seconds=20)
    # Later than the slack (2 s, at most half an interval): the next step counts from when it advanced.
    very = run(s, first.state, T0 + timedelta(seconds=13))
    assert very.canary_pct == 50 and very.wake_at == T0 + timedelta(seconds=23)
