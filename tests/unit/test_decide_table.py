"""Every phase × intent pair of ``decide()``, and the promises about pairs, bad state and vanished canaries.

Pure: routes are dicts, the cluster is a ``StaticView``, the clock is a constant.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from canaryd.core import spec as ann
from canaryd.core.admit import StaticView, admit
from canaryd.core.decide import Decision, Facts, decide
from canaryd.core.spec import Intent, RolloutDefaults
from canaryd.core.state import Failure, Phase, RolloutState, ts

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SPEC = ann.parse_spec({ann.CANARY: "v2", ann.STEPS: "10,50,100", ann.INTERVAL: "10s"}, RolloutDefaults())
assert SPEC is not None


def state(phase: Phase, *, step: int = 0, weight: int = 10, **kw: Any) -> RolloutState:
    return RolloutState(
        phase=phase,
        canary="v2",
        stable="v1",
        steps=(10, 50, 100),
        step=step,
        canary_weight=weight,
        started_at=ts(T0) or "",
        step_started_at=ts(T0),
        updated_at=ts(T0) or "",
        next_at=ts(T0 + timedelta(seconds=10)),
        **kw,
    )


STATES: dict[str, RolloutState] = {
    "progressing": state(Phase.PROGRESSING),
    "waiting": state(Phase.WAITING, waiting_since=ts(T0)),
    "paused": state(Phase.PAUSED, paused_phase=Phase.PROGRESSING.value),
    "promoted": state(Phase.PROMOTED, step=2, weight=100),
    "rolledback": state(Phase.ROLLED_BACK, weight=0),
    "failed-input": state(Phase.FAILED, paused_phase=Phase.PROGRESSING.value, failure=Failure.INPUT),
    "failed-state": state(Phase.FAILED, failure=Failure.STATE),
}

# (state, intent) -> (phase after, weight written or None, what the intent record says)
APPLIED, IGNORED = "applied", "ignored"
TABLE: dict[tuple[str, Intent], tuple[Phase, int | None, str]] = {
    ("progressing", "promote"): (Phase.PROMOTED, 100, APPLIED),
    ("progressing", "abort"): (Phase.ROLLED_BACK, 0, APPLIED),
    ("progressing", "pause"): (Phase.PAUSED, None, APPLIED),
    ("progressing", "resume"): (Phase.PROGRESSING, None, IGNORED),
    ("progressing", "retry"): (Phase.PROGRESSING, None, IGNORED),
    ("waiting", "promote"): (Phase.PROMOTED, 100, APPLIED),
    ("waiting", "abort"): (Phase.ROLLED_BACK, 0, APPLIED),
    ("waiting", "pause"): (Phase.PAUSED, None, APPLIED),
    ("waiting", "resume"): (Phase.WAITING, None, IGNORED),
    ("waiting", "retry"): (Phase.WAITING, None, IGNORED),
    ("paused", "promote"): (Phase.PROMOTED, 100, APPLIED),
    ("paused", "abort"): (Phase.ROLLED_BACK, 0, APPLIED),
    ("paused", "pause"): (Phase.PAUSED, None, IGNORED),
    ("paused", "resume"): (Phase.PROGRESSING, None, APPLIED),
    ("paused", "retry"): (Phase.PAUSED, None, IGNORED),
    ("promoted", "promote"): (Phase.PROMOTED, None, IGNORED),
    ("promoted", "abort"): (Phase.ROLLED_BACK, 0, APPLIED),
    ("promoted", "pause"): (Phase.PROMOTED, None, IGNORED),
    ("promoted", "resume"): (Phase.PROMOTED, None, IGNORED),
    ("promoted", "retry"): (Phase.PROMOTED, None, IGNORED),
    ("rolledback", "promote"): (Phase.PROMOTED, 100, APPLIED),
    ("rolledback", "abort"): (Phase.ROLLED_BACK, None, IGNORED),
    ("rolledback", "pause"): (Phase.ROLLED_BACK, None, IGNORED),
    ("rolledback", "resume"): (Phase.ROLLED_BACK, None, IGNORED),
    ("rolledback", "retry"): (Phase.PROGRESSING, 10, APPLIED),
    # A Failed rollout whose input is valid again resumes its held phase first; the intent then applies.
    ("failed-input", "promote"): (Phase.PROMOTED, 100, APPLIED),
    ("failed-input", "abort"): (Phase.ROLLED_BACK, 0, APPLIED),
    ("failed-input", "pause"): (Phase.PAUSED, None, APPLIED),
    ("failed-input", "resume"): (Phase.PROGRESSING, None, IGNORED),
    ("failed-input", "retry"): (Phase.PROGRESSING, None, IGNORED),
    ("failed-state", "promote"): (Phase.PROMOTED, 100, APPLIED),
    ("failed-state", "abort"): (Phase.ROLLED_BACK, 0, APPLIED),
    ("failed-state", "pause"): (Phase.FAILED, None, IGNORED),
    ("failed-state", "resume"): (Phase.FAILED, None, IGNORED),
    ("failed-state", "retry"): (Phase.PROGRESSING, 50, APPLIED),  # from the held 10 %: never lower
}


def test_the_table_covers_every_pair() -> None:
    assert set(TABLE) == {(s, i) for s in STATES for i in ann.INTENTS}


@pytest.mark.parametrize(("name", "intent"), sorted(TABLE))
def test_phase_by_intent(name: str, intent: Intent) -> None:
    phase, weight, result = TABLE[(name, intent)]
    d = decide(
        Facts(
            canary_ready=name != "waiting",
            now=T0,
            spec=SPEC,
            stable="v1",
            error=None,
            state=STATES[name],
            intent=intent,
            current_canary_pct=STATES[name].canary_weight,
        )
    )
    assert d.consume_intent
    new = d.state
    assert new is not None, "an intent is always recorded"
    assert new.phase == phase
    assert d.canary_pct == weight
    assert new.intents and new.intents[-1].intent == intent and new.intents[-1].result.startswith(result)
    if weight is not None and STATES[name].phase not in (Phase.PROMOTED,) and intent not in ("abort",):
        assert weight >= STATES[name].canary_weight or STATES[name].phase == Phase.ROLLED_BACK


# --- the pair is chosen once --------------------------------------------------------------------------
def route(refs: list[tuple[str, int]], annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "shop", "name": "r", "resourceVersion": "1", "annotations": annotations},
        "spec": {
            "parentRefs": [{"kind": "Service", "group": "", "name": "whoami"}],
            "rules": [{"backendRefs": [{"name": n, "port": 80, "weight": w} for n, w in refs]}],
        },
    }


VIEW = StaticView({("shop", n): True for n in ("v1", "v2", "v3", *(f"x{i}" for i in range(14)))})


def step(obj: dict[str, Any], now: datetime, view: StaticView = VIEW) -> Decision:
    return decide(admit(obj, view, RolloutDefaults(), now).facts)


def test_a_backend_added_after_promotion_changes_nothing() -> None:
    promoted = state(Phase.PROMOTED, step=2, weight=100)
    obj = route([("v1", 0), ("v2", 100), ("v3", 5)], {ann.CANARY: "v2", ann.STATE: promoted.to_annotation()})
    d = step(obj, T0)
    assert d.state is None and d.canary_pct is None and not d.events


def test_sixteen_backend_refs_promote_and_stay_promoted() -> None:
    refs = [("v1", 100), ("v2", 0), *((f"x{i}", 5) for i in range(14))]
    a = {ann.CANARY: "v2", ann.STEPS: "50,100", ann.INTERVAL: "1s"}
    now, weights = T0, []
    for _ in range(6):
        obj = route(refs, a)
        d = step(obj, now)
        if d.state is not None:
            a = {**a, ann.STATE: d.state.to_annotation()}
        if d.canary_pct is not None:
            weights.append(d.canary_pct)
            refs = [("v1", 100 - d.canary_pct), ("v2", d.canary_pct), *refs[2:]]
        now += timedelta(seconds=2)
    assert weights == [50, 100]
    assert RolloutState.from_annotation(a[ann.STATE]).phase == Phase.PROMOTED


def test_mid_rollout_a_heavier_backend_does_not_become_the_stable() -> None:
    running = state(Phase.PROGRESSING, weight=10)
    obj = route([("v1", 90), ("v2", 10), ("v3", 500)], {ann.CANARY: "v2", ann.STATE: running.to_annotation()})
    adm = admit(obj, VIEW, RolloutDefaults(), T0 + timedelta(seconds=10))
    assert adm.pair is not None and adm.pair.stable == "v1"


# --- unreadable state never moves weights ---------------------------------------------------------------
@pytest.mark.parametrize(
    "garbage",
    [
        "not json",
        "[1, 2]",
        '{"phase":"Progressing","canary":"v2","stable":"v1","steps":[10,50,100],"step":7,"canary_weight":30,'
        '"started_at":"2026-01-01T00:00:00Z","updated_at":"2026-01-01T00:00:00Z"}',
        '{"phase":"Progressing","canary":"v2","stable":"v1","steps":[10,50,100],"step":0,"canary_weight":30,'
        '"started_at":"2026-01-01T00:00:00Z","updated_at":"2026-01-01T00:00:00Z","next_at":"yesterday"}',
        '{"phase":"Progressing","canary":"v2","stable":"v1","steps":[50,10,100],"step":0,"canary_weight":30,'
        '"started_at":"2026-01-01T00:00:00Z","updated_at":"2026-01-01T00:00:00Z"}',
    ],
)
def test_garbage_state_fails_and_holds_then_stays_put(garbage: str) -> None:
    obj = route([("v1", 70), ("v2", 30)], {ann.CANARY: "v2", ann.STATE: garbage})
    d = step(obj, T0)
    assert d.canary_pct is None and d.state is not None and d.state.phase == Phase.FAILED
    assert any(e.reason == "InvalidState" and "delete the annotation" in e.message for e in d.events)
    # The next passes read the Failed state we wrote: still no weight change, nothing more written.
    obj["metadata"]["annotations"][ann.STATE] = d.state.to_annotation()
    for k in range(1, 4):
        again = step(obj, T0 + timedelta(seconds=10 * k))
        assert again.canary_pct is None and again.state is None
    # retry starts over from the step at or below the held weight: 30 % -> continues at 50 %.
    obj["metadata"]["annotations"][ann.INTENT] = "retry"
    d = step(obj, T0 + timedelta(seconds=60))
    assert d.canary_pct == 50


# --- a vanished canary -------------------------------------------------------------------------------
def test_canary_service_deleted_mid_rollout_rolls_back_at_once() -> None:
    running = state(Phase.PROGRESSING, step=1, weight=50)
    obj = route([("v1", 50), ("v2", 50)], {ann.CANARY: "v2", ann.STATE: running.to_annotation()})
    gone = StaticView({("shop", "v1"): True})
    d = step(obj, T0 + timedelta(seconds=1), gone)
    assert d.canary_pct == 0 and d.state is not None and d.state.phase == Phase.ROLLED_BACK
    assert any(e.reason == "CanaryGone" for e in d.events)
    # It comes back: RolledBack is terminal, nothing restarts.
    obj["metadata"]["annotations"][ann.STATE] = d.state.to_annotation()
    assert step(obj, T0 + timedelta(seconds=30)).state is None


def test_invalid_input_mid_rollout_holds_then_resumes_at_the_same_step() -> None:
    running = state(Phase.PROGRESSING, step=1, weight=50)
    obj = route(
        [("v1", 50), ("v2", 50)],
        {ann.CANARY: "v2", ann.STEPS: "10,50,100", ann.INTERVAL: "forever", ann.STATE: running.to_annotation()},
    )
    d = step(obj, T0)
    assert d.canary_pct is None and d.state is not None and d.state.phase == Phase.FAILED
    obj["metadata"]["annotations"][ann.INTERVAL] = "10s"
    obj["metadata"]["annotations"][ann.STATE] = d.state.to_annotation()
    d = step(obj, T0 + timedelta(seconds=1))
    assert d.state is not None and d.state.phase == Phase.PROGRESSING and d.state.step == 1
    assert d.canary_pct is None and d.wake_at == T0 + timedelta(seconds=11)  # a fresh window at the held step


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (ann.INTERVAL, "9" * 400),
        (ann.INTERVAL, "25h"),
        (ann.READY_DEADLINE, "8d"),
        (ann.MIN_REQUESTS, "9" * 5000),
        (ann.STEPS, "x" * 150_000),
        (ann.SUCCESS_RATE_MIN, "nan"),
    ],
)
def test_out_of_range_values_fail_with_a_short_message(key: str, value: str) -> None:
    obj = route([("v1", 100), ("v2", 0)], {ann.CANARY: "v2", key: value})
    d = step(obj, T0)
    assert d.state is not None and d.state.phase == Phase.FAILED and d.canary_pct is None
    assert key in d.state.message and len(d.state.message) < 600


def test_a_mistyped_key_fails_with_a_suggestion_instead_of_using_the_default() -> None:
    obj = route([("v1", 100), ("v2", 0)], {ann.CANARY: "v2", "canaryd.io/sucess-rate-min": "99.9"})
    d = step(obj, T0)
    assert d.state is not None and d.state.phase == Phase.FAILED and d.canary_pct is None
    assert "did you mean canaryd.io/success-rate-min?" in d.state.message
