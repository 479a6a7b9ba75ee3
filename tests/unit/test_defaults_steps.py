"""``RolloutDefaults.steps`` (settings ``defaults.steps``) follows the rule of the ``canaryd.io/steps`` annotation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from canaryd.core.errors import SpecError
from canaryd.core.spec import RolloutDefaults, parse_steps


@pytest.mark.parametrize("steps", [[5, 10, 25, 50, 100], [1, 2, 100], [50], [10, 50], [100]])
def test_what_the_annotation_accepts_is_accepted(steps: list[int]) -> None:
    assert RolloutDefaults(steps=steps).steps == steps
    parse_steps(",".join(map(str, steps)))


@pytest.mark.parametrize(
    ("steps", "why"),
    [
        ([50, 10, 100], "steps must increase: 50 then 10"),
        ([10, 10, 100], "steps must increase: 10 then 10"),
        ([0, 50, 100], "outside 1..100"),
        ([50, 101], "outside 1..100"),
        ([], "no steps given"),
    ],
)
def test_what_the_annotation_refuses_is_refused(steps: list[int], why: str) -> None:
    with pytest.raises(SpecError, match=why):
        parse_steps(",".join(map(str, steps)))
    with pytest.raises(ValidationError, match=why) as info:
        RolloutDefaults(steps=steps)
    assert info.value.errors()[0]["loc"] == ("steps",)
    assert "the rule of canaryd.io/steps" in str(info.value)
