from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from canaryd.core import spec as ann
from canaryd.core.spec import RolloutDefaults
from canaryd.errors import SpecError

D = RolloutDefaults()


def parse(**a: str) -> ann.RolloutSpec:
    out = ann.parse_spec({ann.PREFIX + k.replace("_", "-"): v for k, v in a.items()}, D)
    assert out is not None
    return out


def test_not_annotated_is_none() -> None:
    assert ann.parse_spec({"other": "x"}, D) is None


def test_defaults_and_overrides() -> None:
    s = parse(canary="whoami-v2")
    assert s.steps == (5, 10, 25, 50, 100) and s.interval_s == 60 and not s.analysis.enabled
    s = parse(
        canary="whoami-v2",
        steps="10, 50",
        interval="2m",
        analysis="envoy,dapr",
        app_id="whoami",
        latency_max="250ms",
        failure_threshold="3",
    )
    assert s.steps == (10, 50, 100) and s.interval_s == 120
    assert s.analysis.signals == ("envoy", "dapr") and s.analysis.latency_max_ms == 250
    assert s.analysis.failure_threshold == 3 and s.analysis.window_s == 86_400  # cumulative: up to a day


def test_step_weight_and_max() -> None:
    assert parse(canary="v2", step_weight="20").steps == (20, 40, 60, 80, 100)
    assert parse(canary="v2", step_weight="30", max_weight="60").steps == (30, 60, 100)


@pytest.mark.parametrize(
    ("annotations", "named"),
    [
        ({"canary": "V2!"}, ann.CANARY),
        ({"canary": "v2", "stable": "v2"}, ann.STABLE),
        ({"canary": "v2", "steps": "10,10"}, ann.STEPS),
        ({"canary": "v2", "steps": "0,50"}, ann.STEPS),
        ({"canary": "v2", "steps": "101"}, ann.STEPS),
        ({"canary": "v2", "steps": "a,b"}, ann.STEPS),
        ({"canary": "v2", "steps": ""}, ann.STEPS),
        ({"canary": "v2", "interval": "5 parsecs"}, ann.INTERVAL),
        ({"canary": "v2", "interval": "0s"}, ann.INTERVAL),
        ({"canary": "v2", "analysis": "envoy) or vector(1"}, ann.ANALYSIS),
        ({"canary": "v2", "analysis": "dapr"}, ann.APP_ID),
        ({"canary": "v2", "app_id": 'x"}'}, ann.APP_ID),
        ({"canary": "v2", "failure_threshold": "0"}, ann.FAILURE_THRESHOLD),
        ({"canary": "v2", "on_inconclusive": "explode"}, ann.ON_INCONCLUSIVE),
        ({"canary": "v2", "steps": "10", "step_weight": "10"}, ann.STEPS),
    ],
)
def test_bad_annotations_name_themselves(annotations: dict[str, str], named: str) -> None:
    with pytest.raises(SpecError) as err:
        parse(**annotations)
    assert err.value.annotation == named and named in str(err.value)


@given(st.lists(st.integers(min_value=1, max_value=100), min_size=1, max_size=10, unique=True))
def test_sorted_steps_always_parse_and_end_at_100(values: list[int]) -> None:
    steps = ann.parse_steps(",".join(map(str, sorted(values))))
    assert steps[-1] == 100 and list(steps) == sorted(set(steps))


@given(st.text(max_size=40))
def test_arbitrary_names_are_either_dns_labels_or_refused(raw: str) -> None:
    try:
        s = ann.parse_spec({ann.CANARY: raw}, D)
    except SpecError:
        return
    assert s is not None and all(c.isalnum() or c == "-" for c in s.canary) and s.canary == s.canary.lower()


def test_intents() -> None:
    assert ann.parse_intent("promote") == "promote"
    assert ann.parse_intent(" ") is None
    with pytest.raises(SpecError):
        ann.parse_intent("explode")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("steps", "５０"),
        ("interval", "٣s"),
        ("max_errors", "1_000"),
        ("success_rate_min", "９９"),
        ("confidence", "nan"),
    ],
)
def test_numbers_are_ascii_digits_only(key: str, value: str) -> None:
    a = {ann.CANARY: "v2", ann.PREFIX + key.replace("_", "-"): value}
    with pytest.raises(SpecError):
        ann.parse_spec(a, D)
