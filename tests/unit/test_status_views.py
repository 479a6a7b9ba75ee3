"""``canaryd.status`` (pure): the wide list, the live detail view and the ``--wait`` lines, against golden
files in tests/golden/ (``CANARYD_UPDATE_GOLDEN=1`` rewrites them from the current output)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from canaryd import status as render
from canaryd.core import spec as ann
from tests.unit.test_status_render import NOW, PHASE_STATES, ROUTE_WEIGHTS, all_routes, golden, route_dict

EVENTS = [
    {
        "type": "Normal",
        "reason": "StepAdvanced",
        "message": "step 2/4: whoami-v1 75 → whoami-v2 25",
        "lastTimestamp": "2025-03-01T11:58:00Z",
        "metadata": {"name": "e1"},
    }
]


def _bare(name: str) -> dict[str, Any]:
    """A route annotated with the canary only: steps, interval and analysis are the daemon's defaults."""
    r = route_dict(name, "shop", None, 0)
    r["metadata"]["annotations"] = {ann.CANARY: "whoami-v2"}
    return r


def test_wide_list_matches_golden() -> None:
    text = render.render_list([*all_routes(), _bare("bare")], NOW, wide=True)
    assert text == golden("status_list_wide.txt", text)
    header = text.splitlines()[0].split()
    assert header == [*render.LIST_HEADER[:-1], "STEPS", "INTERVAL", "ANALYSIS", "UPDATED", "MESSAGE"]
    bare = render.wide_row(render.RouteStatus.from_route(_bare("bare")), NOW)
    assert bare[len(render.LIST_HEADER) - 1 : -1] == ("default", "default", "default", "-")
    # The narrow list is the wide one without the extra columns (same rows, same order).
    narrow = render.render_list(all_routes(), NOW).splitlines()
    wide = [line.split()[:2] for line in text.splitlines() if "bare" not in line]
    assert [line.split()[:2] for line in narrow] == wide


def test_live_detail_view_matches_golden() -> None:
    route = route_dict("progressing", "shop", PHASE_STATES["progressing"], ROUTE_WEIGHTS["progressing"])
    text = render.render_watch(route, EVENTS, NOW, every_s=1)
    assert text == golden("status_watch_progressing.txt", text)
    head, blank, *detail = text.splitlines()
    assert head.startswith("2025-03-01T12:00:00Z  httproute shop/progressing, redrawn every 1s") and blank == ""
    assert "\n".join(detail) + "\n" == render.render_detail(route, EVENTS, NOW)


def test_live_view_counts_down_between_route_changes() -> None:
    # The same cached route a second later: NEXT, the ages and the clock move on (the freeze of issue 18).
    route = route_dict("progressing", "shop", PHASE_STATES["progressing"], ROUTE_WEIGHTS["progressing"])
    now = render.render_watch(route, EVENTS, NOW)
    later = render.render_watch(route, EVENTS, NOW + timedelta(seconds=31))
    assert "Next:    1m30s" in now and "Next:    59s" in later
    assert "2025-03-01T12:00:31Z" in later.splitlines()[0]
    assert "  2m ago     Normal" in now and "  2m31s ago  Normal" in later


def test_wait_lines_match_golden() -> None:
    # What `status ROUTE --wait` prints for a rollout seen in each phase, then its outcome line.
    lines = [
        render.progress_line(route_dict("whoami", "shop", None, 0), NOW - timedelta(minutes=10)),
        *(
            render.progress_line(route_dict("whoami", "shop", PHASE_STATES[p], ROUTE_WEIGHTS[p]), NOW)
            for p in ("progressing", "paused", "promoted")
        ),
        render.outcome_line(route_dict("whoami", "shop", PHASE_STATES["promoted"], 100), NOW),
        render.outcome_line(route_dict("whoami", "shop", PHASE_STATES["rolledback"], 0), NOW),
    ]
    text = "".join(lines)
    assert text == golden("status_wait.txt", text)
    assert all(line.endswith("\n") and line.count("\n") == 1 for line in lines)


def test_wait_prints_only_on_change() -> None:
    # The key ignores the clock: the same route later is no change; a new step or message is.
    r = route_dict("whoami", "shop", PHASE_STATES["progressing"], 25)
    assert render.progress_key(r) == render.progress_key(r)
    st = PHASE_STATES["progressing"]
    moved = route_dict("whoami", "shop", st.with_(step=2, canary_weight=50, message="step 3/4"), 50)
    assert render.progress_key(moved) != render.progress_key(r)


def test_detail_view_shows_the_effective_settings_and_their_source() -> None:
    route = route_dict("progressing", "shop", PHASE_STATES["progressing"], ROUTE_WEIGHTS["progressing"])
    route["metadata"]["annotations"][ann.MIN_REQUESTS] = "150"
    defaults = ann.RolloutDefaults(analysis="none", interval_s=120)
    text = render.render_detail(route, EVENTS, NOW, defaults=defaults)
    assert text == golden("status_detail_settings.txt", text)
    rows = {name: (value, source) for name, value, source in render.effective_settings(_annotations(route), defaults)}
    assert rows["min-requests"] == ("150", "annotation")
    assert rows["on-drift"] == ("reassert", "default")
    # A route that only names the canary takes everything else from the defaults, and says so.
    bare = {name: value for name, value, _ in render.effective_settings({ann.CANARY: "whoami-v2"}, defaults)}
    assert {src for _, _, src in render.effective_settings({ann.CANARY: "whoami-v2"}, defaults)} == {"default"}
    assert bare["analysis"] == "none (not analysed)" and bare["interval"] == "2m"
    # Unparseable annotations show no made-up settings.
    assert render.effective_settings({ann.CANARY: "whoami-v2", ann.STEPS: "50,10"}, defaults) == []


def _annotations(route: dict[str, Any]) -> dict[str, str]:
    return dict(route["metadata"]["annotations"])
