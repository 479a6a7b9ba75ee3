from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from canaryd.core.plan import pair_scale, weights_at
from canaryd.core.state import AnalysisRecord, IntentRecord, Phase, RolloutState


@given(
    st.integers(min_value=0, max_value=100),
    st.integers(min_value=0, max_value=500_000),
    st.integers(min_value=0, max_value=500_000),
)
def test_weights_keep_the_pair_total(pct: int, stable: int, canary: int) -> None:
    scale = pair_scale(stable, canary)
    w = weights_at(pct, scale)
    assert w.stable + w.canary == scale and w.stable >= 0 and w.canary >= 0
    assert abs(100 * w.canary / scale - pct) <= 100 / scale


def test_scale_examples() -> None:
    assert weights_at(25, pair_scale(100, 0)).canary == 25
    assert weights_at(25, pair_scale(1000, 0)).canary == 250
    assert pair_scale(1, 1) == 100  # default weights cannot express percent steps


def test_state_roundtrip_and_trimming() -> None:
    s = RolloutState(
        phase=Phase.PROGRESSING,
        canary="v2",
        stable="v1",
        steps=(10, 100),
        step=0,
        canary_weight=10,
        started_at="2026-01-01T00:00:00.000Z",
        step_started_at="2026-01-01T00:00:00.000Z",
        updated_at="2026-01-01T00:00:00.000Z",
        next_at="2026-01-01T00:01:00.000Z",
    )
    for i in range(20):
        s = s.add_record(AnalysisRecord(step=0, at="t", verdict="pass", signal="envoy", reason=str(i)))
        s = s.add_intent(IntentRecord(intent="pause", at="t", result="applied"))
    back = RolloutState.from_annotation(s.to_annotation())
    assert back == s and len(back.history) == 8 and back.history[-1].reason == "19" and len(back.intents) == 5
    assert len(s.to_annotation()) < 4096


def test_stored_tallies_follow_the_judges_rule() -> None:
    import pytest

    from canaryd.core.errors import StateError
    from canaryd.core.state import RolloutState

    base = (
        '{"phase":"Progressing","canary":"v2","stable":"v1","steps":[10,100],"step":0,"canary_weight":10,'
        '"started_at":"2026-01-01T00:00:00Z","updated_at":"2026-01-01T00:00:00Z","tallies":{"envoy":%s}}'
    )
    ok = RolloutState.from_annotation(base % "[10, 1, null, 100, 0]")
    assert ok.tallies == {"envoy": [10.0, 1.0, None, 100.0, 0.0]}
    for garbage in ("[1e999, 0, null, 1, 0]", "[-1, 0, null, 1, 0]", "[1, 0, null, 1, -2]", "[1, 2]", "{}"):
        with pytest.raises(StateError):
            RolloutState.from_annotation(base % garbage)
