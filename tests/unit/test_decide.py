"""The state machine, driven with a fake clock only (it is a pure function)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from canaryd import spec as ann
from canaryd.analysis import BackendStats, Judgement, Verdict
from canaryd.decide import Decision, Facts, decide
from canaryd.settings import RolloutDefaults
from canaryd.state import Phase, RolloutState

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


def j(verdict: Verdict) -> list[Judgement]:
    return [
        Judgement(
            signal="envoy",
            verdict=verdict,
            reason=verdict.value,
            canary=BackendStats(1000, 50),
            stable=BackendStats(1000, 1),
        )
    ]


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
    d = run(s, st1, due, judgements=j(Verdict.FAIL))
    assert d.canary_pct is None and d.state is not None and d.state.failures == 1
    d = run(s, d.state, due + timedelta(seconds=10), judgements=j(Verdict.FAIL))
    assert d.canary_pct == 0 and d.state is not None and d.state.phase == Phase.ROLLED_BACK
    assert any(e.reason == "RolledBack" for e in d.events)


def test_inconclusive_pauses_after_limit() -> None:
    s = spec(analysis="envoy", max_inconclusive="2")
    state = run(s, None, T0).state
    now = T0
    for _ in range(2):
        now += timedelta(seconds=10)
        d = run(s, state, now, judgements=j(Verdict.INCONCLUSIVE))
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
    for i in range(60):
        r = ready[i] if i < len(ready) else True
        v = verdicts[i] if i < len(verdicts) else Verdict.PASS
        d = run(s, state, now, canary_ready=r)
        if d.analyze:
            d = run(s, state, now, canary_ready=r, judgements=j(v))
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
