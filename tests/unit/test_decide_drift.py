"""Weights someone else overwrote mid-rollout (a GitOps sync, ``kubectl apply``): detected, reported, handled
by the drift policy (docs/gitops.md); and a rollout without analysis says so. Pure: dicts, constants, no clock.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from canaryd.core import spec as ann
from canaryd.core.admit import StaticView, admit
from canaryd.core.analysis import BackendStats, Observation
from canaryd.core.backends import label_ops
from canaryd.core.decide import NOT_ANALYSED, Decision, Facts, decide, drift_of
from canaryd.core.errors import SpecError, StateError
from canaryd.core.plan import pair_scale, weights_at
from canaryd.core.spec import RolloutDefaults
from canaryd.core.state import Failure, Phase, RolloutState, ts
from canaryd.settings import Settings

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LATER = T0 + timedelta(seconds=3)  # inside the step: nothing else is due
DRIFTED = ((100, 0),)  # what `kubectl apply` of the original manifest puts back
WRITTEN = ((90, 10),)  # what canaryd wrote for 10 %


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


def state(phase: Phase, **kw: Any) -> RolloutState:
    base: dict[str, Any] = {
        "phase": phase,
        "canary": "v2",
        "stable": "v1",
        "steps": (10, 50, 100),
        "step": 0,
        "canary_weight": 10,
        "started_at": ts(T0) or "",
        "step_started_at": ts(T0),
        "updated_at": ts(T0) or "",
        "next_at": ts(T0 + timedelta(seconds=10)),
    }
    return RolloutState(**{**base, **kw})


def run(s: ann.RolloutSpec, st_: RolloutState | None, now: datetime = LATER, **kw: Any) -> Decision:
    return decide(Facts(now=now, spec=s, stable="v1", error=None, state=st_, **kw))


STATES: dict[str, RolloutState] = {
    "progressing": state(Phase.PROGRESSING),
    "waiting": state(Phase.WAITING, waiting_since=ts(T0)),
    "paused": state(Phase.PAUSED, paused_phase=Phase.PROGRESSING.value, next_at=None),
    "progressing-drifted-once": state(Phase.PROGRESSING, drifts=1),
}

# (state, policy) -> (phase after, weight written, drifts after, held for drift)
TABLE: dict[tuple[str, str], tuple[Phase, int | None, int, bool]] = {
    ("progressing", "reassert"): (Phase.PROGRESSING, 10, 1, False),
    ("progressing", "hold"): (Phase.PAUSED, None, 1, True),
    ("waiting", "reassert"): (Phase.WAITING, 10, 1, False),
    ("waiting", "hold"): (Phase.PAUSED, None, 1, True),
    ("paused", "reassert"): (Phase.PAUSED, 10, 1, False),
    ("paused", "hold"): (Phase.PAUSED, None, 1, True),
    # the second overwrite in the same rollout holds, whatever the policy
    ("progressing-drifted-once", "reassert"): (Phase.PAUSED, None, 2, True),
    ("progressing-drifted-once", "hold"): (Phase.PAUSED, None, 2, True),
}


def test_the_table_covers_every_pair() -> None:
    assert set(TABLE) == {(s, p) for s in STATES for p in ann.DRIFT_POLICIES}


@pytest.mark.parametrize(("name", "policy"), sorted(TABLE))
def test_drift_by_phase_and_policy(name: str, policy: str) -> None:
    phase, weight, drifts, held = TABLE[(name, policy)]
    before = STATES[name]
    d = run(spec(on_drift=policy), before, observed=DRIFTED, canary_ready=name != "waiting")
    assert d.state is not None and d.state.phase == phase
    assert d.canary_pct == weight and not d.analyze
    assert (d.state.drifts, d.state.drift_held) == (drifts, held)
    [event] = [e for e in d.events if e.reason == "WeightsOverwritten"]
    assert event.type == "Warning"
    assert "v1 100, v2 0" in event.message and "canaryd wrote v1 90, v2 10" in event.message
    assert "docs/gitops.md" in event.message
    if held:
        assert "canaryd resume" in event.message and "canaryd resume" in d.state.message
        assert "docs/gitops.md" in d.state.message
        assert d.state.paused_phase == (before.paused_phase or before.phase.value)
        assert d.transitions == (() if before.phase == Phase.PAUSED else (Phase.PAUSED.value,))
    else:
        assert "re-asserted v1 90, v2 10" in d.state.message
        assert d.state.step_started_at == ts(LATER)  # the step's weights were written again, now


@pytest.mark.parametrize("phase", [Phase.PROMOTED, Phase.ROLLED_BACK])
def test_a_finished_rollout_does_not_look_at_weights(phase: Phase) -> None:
    d = run(spec(), state(phase, step=2, canary_weight=100 if phase == Phase.PROMOTED else 0), observed=DRIFTED)
    assert d.state is None and d.canary_pct is None and not d.events


def test_failed_holds_the_weights_it_finds() -> None:
    failed = state(Phase.FAILED, failure=Failure.STATE)
    assert drift_of(failed, DRIFTED) is None


def test_the_weights_canaryd_wrote_are_no_drift_in_any_scale() -> None:
    for scale in (100, 101, 150, 1000, 999_999):
        for pct in (1, 10, 33, 50, 99):
            w = weights_at(pct, scale)
            assert drift_of(state(Phase.PROGRESSING, canary_weight=pct), ((w.stable, w.canary),)) is None
    per_mille = state(Phase.PROGRESSING, canary_weight=25)
    assert drift_of(per_mille, ((750, 250), (75, 25))) is None  # two rules, each in its own scale
    found = drift_of(per_mille, ((750, 250), (100, 0)))  # the second rule was put back
    assert found is not None and found.observed == (100, 0) and found.expected == (75, 25)


@given(st.integers(0, 100), st.integers(0, 10_000), st.integers(0, 10_000))
def test_drift_is_exactly_weights_other_than_the_state_says(pct: int, sw: int, cw: int) -> None:
    expected = weights_at(pct, pair_scale(sw, cw))
    found = drift_of(state(Phase.PROGRESSING, canary_weight=pct), ((sw, cw),))
    assert (found is None) == ((expected.stable, expected.canary) == (sw, cw))


def test_weights_canaryd_has_not_written_yet_are_no_drift() -> None:
    # A fresh rollout records the route's weights (1/1 = 50 %) without writing them; not ready, it waits there.
    fresh = state(Phase.WAITING, step=1, canary_weight=50, step_started_at=None, waiting_since=ts(T0))
    assert drift_of(fresh, ((1, 1),)) is None
    assert drift_of(state(Phase.PROGRESSING, step=-1, canary_weight=0), ((90, 10),)) is None


def test_no_drift_means_the_usual_decision() -> None:
    s = spec()
    assert run(s, STATES["progressing"], observed=WRITTEN).state is None  # nothing due, nothing written
    assert run(s, STATES["progressing"]).state is None  # weights not read (e.g. a terminal route): no check


def test_reassert_restarts_the_step_and_the_counts_and_skips_the_due_round() -> None:
    s = spec(analysis="envoy", interval="60s", analysis_interval="10s")
    counted = state(
        Phase.PROGRESSING,
        next_at=ts(T0 + timedelta(seconds=60)),
        next_round_at=ts(T0 + timedelta(seconds=10)),
        counted_since=ts(T0),
        tallies={"envoy": [40.0, 0.0, None, 400.0, 1.0]},
        inconclusive=2,
    )
    due = T0 + timedelta(seconds=10)
    assert run(s, counted, due, observed=WRITTEN).analyze  # without drift the round is measured
    d = run(s, counted, due, observed=DRIFTED)
    assert not d.analyze and d.canary_pct == 10 and d.state is not None
    new = d.state
    assert new.counted_since == ts(due) and new.tallies == {}  # the drifted stretch is no evidence
    assert new.next_at == ts(due + timedelta(seconds=60))  # a full interval at the re-asserted weights
    assert new.next_round_at == ts(due + timedelta(seconds=10)) and d.wake_at == due + timedelta(seconds=10)
    assert new.inconclusive == 0
    # The next round measures from the re-assert on.
    m = run(s, new, due + timedelta(seconds=10), observed=WRITTEN)
    assert m.analyze and m.window_s == 10


def test_time_based_reassert_waits_a_full_interval() -> None:
    d = run(spec(), STATES["progressing"], observed=DRIFTED)
    assert d.canary_pct == 10 and d.state is not None and d.wake_at == LATER + timedelta(seconds=10)
    assert d.state.next_at == ts(LATER + timedelta(seconds=10))


def test_held_for_drift_is_said_once_then_resume_puts_the_weights_back() -> None:
    s = spec(on_drift="hold")
    held = run(s, STATES["progressing"], observed=DRIFTED).state
    assert held is not None and held.phase == Phase.PAUSED and held.drift_held
    # canaryd does not fight: the same drifted weights, later, write and say nothing.
    again = run(s, held, LATER + timedelta(seconds=30), observed=DRIFTED)
    assert again.state is None and again.canary_pct is None and not again.events
    # The user fixed their GitOps settings and resumes: the weights are written back.
    d = run(s, held, LATER + timedelta(seconds=40), observed=DRIFTED, intent="resume")
    assert d.state is not None and d.state.phase == Phase.PROGRESSING and not d.state.drift_held
    assert d.canary_pct == 10 and "re-asserted" in d.state.message
    assert d.state.next_at == ts(LATER + timedelta(seconds=50))
    assert any(e.reason == "Resumed" for e in d.events)
    # Overwritten once more after that: even under `reassert` it holds at once (this rollout saw a drift).
    d = run(spec(), d.state, LATER + timedelta(seconds=41), observed=DRIFTED)
    assert d.state is not None and d.state.phase == Phase.PAUSED and d.canary_pct is None
    assert (d.state.drifts, d.state.drift_held) == (2, True)


def test_resume_without_drift_is_unchanged() -> None:
    paused = STATES["paused"]
    d = run(spec(), paused, observed=WRITTEN, intent="resume")
    assert d.state is not None and d.state.phase == Phase.PROGRESSING and d.canary_pct is None
    assert d.state.message == "resumed by user"


def test_a_drift_held_pause_still_rolls_back_on_harm() -> None:
    s = spec(analysis="envoy", on_drift="hold")
    running = state(Phase.PROGRESSING, next_round_at=ts(LATER), counted_since=ts(T0))
    held = run(s, running, observed=DRIFTED).state
    assert held is not None and held.phase == Phase.PAUSED
    bad = [Observation("envoy", BackendStats(1000, 500), BackendStats(1000, 1))]
    d = run(s, held, LATER, observed=DRIFTED, observations=bad)
    assert d.canary_pct == 0 and d.state is not None and d.state.phase == Phase.ROLLED_BACK


# --- through admission: the route's weights are what is compared --------------------------------------
def route(weights: tuple[int, int], annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "shop", "name": "r", "resourceVersion": "1", "annotations": annotations},
        "spec": {
            "parentRefs": [{"kind": "Service", "group": "", "name": "whoami"}],
            "rules": [
                {
                    "backendRefs": [
                        {"name": "v1", "port": 80, "weight": weights[0]},
                        {"name": "v2", "port": 80, "weight": weights[1]},
                    ]
                }
            ],
        },
    }


VIEW = StaticView({("shop", "v1"): True, ("shop", "v2"): True})


@pytest.mark.parametrize(
    ("annotation", "defaults", "phase"),
    [
        (None, RolloutDefaults(), Phase.PROGRESSING),
        ("hold", RolloutDefaults(), Phase.PAUSED),
        (None, RolloutDefaults(on_drift="hold"), Phase.PAUSED),
        ("reassert", RolloutDefaults(on_drift="hold"), Phase.PROGRESSING),
    ],
)
def test_the_policy_comes_from_the_annotation_or_the_default(
    annotation: str | None, defaults: RolloutDefaults, phase: Phase
) -> None:
    a = {ann.CANARY: "v2", ann.STEPS: "10,50,100", ann.INTERVAL: "10s"}
    a[ann.STATE] = STATES["progressing"].to_annotation()
    if annotation is not None:
        a[ann.ON_DRIFT] = annotation
    d = decide(admit(route((100, 0), a), VIEW, defaults, LATER).facts)
    assert d.state is not None and d.state.phase == phase
    assert [e.reason for e in d.events] == ["WeightsOverwritten"]
    same = decide(admit(route((90, 10), a), VIEW, defaults, LATER).facts)
    assert same.state is None and not same.events


@pytest.mark.parametrize("bad", ["Hold", "fight", "", "re-assert"])
def test_an_unknown_policy_is_refused(bad: str) -> None:
    with pytest.raises(SpecError) as exc:
        ann.parse_spec({ann.CANARY: "v2", ann.ON_DRIFT: bad}, RolloutDefaults())
    assert exc.value.annotation == ann.ON_DRIFT and "'reassert' or 'hold'" in exc.value.message


def test_on_drift_is_a_known_annotation() -> None:
    a = {ann.CANARY: "v2", ann.ON_DRIFT: "hold"}
    adm = admit(route((100, 0), a), VIEW, RolloutDefaults(), T0)
    assert adm.ok, adm.problems


# --- the codec: old states decode, new fields are written only when set ---------------------------------
def test_a_state_stored_before_drift_existed_decodes() -> None:
    old = STATES["progressing"].to_annotation()
    assert "drift" not in old  # nothing new is written while there was no drift
    st_ = RolloutState.from_annotation(old)
    assert (st_.drifts, st_.drift_held) == (0, False)
    held = st_.with_(drifts=2, drift_held=True)
    assert RolloutState.from_annotation(held.to_annotation()) == held


@pytest.mark.parametrize(("field", "value"), [("drifts", -1), ("drift_held", "yes"), ("drifts", "x")])
def test_bad_drift_fields_are_a_state_error(field: str, value: object) -> None:
    raw = json.loads(STATES["progressing"].to_annotation())
    raw[field] = value
    with pytest.raises(StateError):
        RolloutState.from_annotation(json.dumps(raw))


# --- a rollout nobody judges says so ------------------------------------------------------------------
def test_a_rollout_without_analysis_says_not_analysed() -> None:
    s = spec()
    d = run(s, None, T0)
    reasons = {e.reason: e for e in d.events}
    assert NOT_ANALYSED in reasons["RolloutStarted"].message
    assert "canaryd.io/analysis" in reasons["NotAnalysed"].message
    assert d.state is not None and d.state.message.endswith(f"({NOT_ANALYSED})")
    assert NOT_ANALYSED in reasons["StepAdvanced"].message
    d = run(s, d.state, T0 + timedelta(seconds=10))
    d = run(s, d.state, T0 + timedelta(seconds=20))
    assert d.state is not None and d.state.phase == Phase.PROMOTED and NOT_ANALYSED in d.state.message


def test_an_analysed_rollout_does_not() -> None:
    d = run(spec(analysis="envoy"), None, T0)
    assert all(NOT_ANALYSED not in e.message for e in d.events)
    assert "NotAnalysed" not in {e.reason for e in d.events}
    assert d.state is not None and NOT_ANALYSED not in d.state.message


# --- the phase label ------------------------------------------------------------------------------------
def test_label_ops_add_only_what_differs() -> None:
    bare: dict[str, Any] = {"metadata": {}}
    assert label_ops(bare, {ann.PHASE_LABEL: "Paused"}) == [
        {"op": "add", "path": "/metadata/labels", "value": {}},
        {"op": "add", "path": "/metadata/labels/canaryd.io~1phase", "value": "Paused"},
    ]
    labelled = {"metadata": {"labels": {"app": "x", ann.PHASE_LABEL: "Paused"}}}
    assert label_ops(labelled, {ann.PHASE_LABEL: "Paused"}) == []
    assert label_ops(labelled, {ann.PHASE_LABEL: "Progressing"}) == [
        {"op": "add", "path": "/metadata/labels/canaryd.io~1phase", "value": "Progressing"}
    ]
    for p in Phase:  # every phase is a valid label value (<= 63 characters, alphanumerics)
        assert len(p.value) <= 63 and p.value.isalnum()


def test_the_cluster_default_policy_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CANARYD_CONFIG_FILE", raising=False)
    assert Settings().defaults.on_drift == "reassert"
    monkeypatch.setenv("CANARYD_DEFAULTS__ON_DRIFT", "hold")
    assert Settings().defaults.on_drift == "hold"
    monkeypatch.setenv("CANARYD_DEFAULTS__ON_DRIFT", "fight")
    with pytest.raises(ValidationError, match="on_drift"):
        Settings()
