"""``canaryd.status`` (pure): rows, detail view and the documented -o json schema."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema

from canaryd import status as render
from canaryd.core import spec as ann
from canaryd.core.state import AnalysisRecord, IntentRecord, Phase, RolloutState

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
UPDATE = os.environ.get("CANARYD_UPDATE_GOLDEN") == "1"


def golden(name: str, text: str) -> str:
    """The golden file's text; with CANARYD_UPDATE_GOLDEN=1 it is rewritten from ``text`` first."""
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    return path.read_text()


SCHEMA = json.loads((REPO / "docs" / "status-schema.json").read_text())
NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
STEPS = (5, 25, 50, 100)


def _rec(
    step: int,
    at: str,
    verdict: str,
    reason: str,
    cs: float | None,
    ss: float | None,
    cr: float | None,
    sr: float | None,
) -> AnalysisRecord:
    return AnalysisRecord(
        step=step,
        at=at,
        verdict=verdict,
        signal="envoy",
        reason=reason,
        canary_requests=cr,
        canary_success=cs,
        stable_requests=sr,
        stable_success=ss,
        evidence=None if verdict == "error" else {"fail": 3.1e4, "pass": 0.02}.get(verdict, 4.5),
        threshold=None if verdict == "error" else 125.0,
    )


def _state(phase: Phase, step: int, weight: int, **kw: Any) -> RolloutState:
    base: dict[str, Any] = dict(
        phase=phase,
        canary="whoami-v2",
        stable="whoami-v1",
        steps=STEPS,
        step=step,
        canary_weight=weight,
        started_at="2025-03-01T11:50:00.000Z",
        step_started_at="2025-03-01T11:58:00.000Z",
        updated_at="2025-03-01T11:58:00.000Z",
    )
    base.update(kw)
    return RolloutState(**base)


PASS1 = _rec(
    0,
    "2025-03-01T11:54:00.000Z",
    "pass",
    "canary success rate 99.9% >= 99% (stable 99.95%, 4,210 requests)",
    99.9,
    99.95,
    1020,
    4210,
)
PASS2 = _rec(
    1,
    "2025-03-01T11:58:00.000Z",
    "pass",
    "canary success rate 99.8% >= 99% (stable 99.9%, 3,900 requests)",
    99.8,
    99.9,
    1310,
    3900,
)
FAIL = _rec(
    1,
    "2025-03-01T11:58:00.000Z",
    "fail",
    "canary success rate 91.2% < 99% (stable 99.9%, 3,900 requests)",
    91.2,
    99.9,
    1300,
    3900,
)

PHASE_STATES: dict[str, RolloutState] = {
    "progressing": _state(
        Phase.PROGRESSING,
        1,
        25,
        next_at="2025-03-01T12:01:30.000Z",
        message="step 2/4: whoami-v1 75 → whoami-v2 25",
        history=(PASS1, PASS2),
    ),
    "waiting": _state(
        Phase.WAITING,
        0,
        5,
        next_at=None,
        waiting_since="2025-03-01T11:59:00.000Z",
        message="waiting for ready endpoints of whoami-v2",
    ),
    "paused": _state(
        Phase.PAUSED,
        1,
        25,
        paused_phase="Progressing",
        message="paused by user",
        history=(PASS1,),
        intents=(IntentRecord("pause", "2025-03-01T11:59:00.000Z", "applied"),),
    ),
    "promoted": _state(Phase.PROMOTED, 3, 100, message="promoted: all steps passed", history=(PASS1, PASS2)),
    "rolledback": _state(
        Phase.ROLLED_BACK,
        1,
        0,
        failures=2,
        message="rolled back: canary success rate 91.2% < 99% (stable 99.9%, 3,900 requests)",
        history=(PASS1, FAIL),
    ),
    "failed": _state(
        Phase.FAILED,
        -1,
        0,
        message="httproute x: annotation canaryd.io/steps: step 'x' is not a "
        "whole percent; write e.g. '5,10,25,50,100'",
    ),
}
ROUTE_WEIGHTS = {"progressing": 25, "waiting": 5, "paused": 25, "promoted": 100, "rolledback": 0, "failed": 0}


def route_dict(
    name: str, namespace: str, state: RolloutState | None, canary_weight: int, extra: dict[str, str] | None = None
) -> dict[str, Any]:
    a = {
        ann.CANARY: "whoami-v2",
        ann.STEPS: ",".join(map(str, STEPS)),
        ann.INTERVAL: "2m",
        ann.ANALYSIS: "envoy",
        **(extra or {}),
    }
    if state is not None:
        a[ann.STATE] = state.to_annotation()
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": namespace, "annotations": a},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "whoami", "port": 80}],
            "rules": [
                {
                    "backendRefs": [
                        {"name": "whoami-v1", "port": 80, "weight": 100 - canary_weight},
                        {"name": "whoami-v2", "port": 80, "weight": canary_weight},
                    ]
                }
            ],
        },
    }


def all_routes(namespace: str = "shop") -> list[dict[str, Any]]:
    out = [route_dict(name, namespace, st, ROUTE_WEIGHTS[name]) for name, st in PHASE_STATES.items()]
    out.append(route_dict("pending", namespace, None, 0))
    out.append({"metadata": {"name": "unmanaged", "namespace": namespace, "annotations": {}}, "spec": {}})
    return out


def test_list_view_matches_golden() -> None:
    text = render.render_list(all_routes(), NOW)
    assert text == golden("status_list.txt", text)
    assert "unmanaged" not in text
    assert "\x1b[" not in text


def test_detail_view_matches_golden() -> None:
    events = [
        {
            "type": "Normal",
            "reason": "StepAdvanced",
            "message": "step 2/4: whoami-v1 75 → whoami-v2 25",
            "lastTimestamp": "2025-03-01T11:58:00Z",
            "metadata": {"name": "e1"},
        }
    ]
    for name, st in PHASE_STATES.items():
        text = render.render_detail(route_dict(name, "shop", st, ROUTE_WEIGHTS[name]), events, NOW)
        assert text == golden(f"status_detail_{name}.txt", text), name


def test_colour_only_when_asked() -> None:
    plain = render.render_list(all_routes(), NOW)
    coloured = render.render_list(all_routes(), NOW, color=True)
    assert "\x1b[32m✓ Promoted" in coloured
    assert render._ANSI.sub("", coloured).replace("✓ ", "").replace("▶ ", "") != ""
    assert "✓" not in plain


def test_row_fields() -> None:
    rs = render.RouteStatus.from_route(route_dict("progressing", "shop", PHASE_STATES["progressing"], 25))
    assert render.row(rs, NOW) == (
        "shop",
        "progressing",
        "Progressing",
        "2/4",
        "whoami-v1 75 → whoami-v2 25",
        "pass canary 99.8% vs stable 99.9%, 1,310 vs 3,900 req",
        "1m30s",
        "10m",
        "step 2/4: whoami-v1 75 → whoami-v2 25",
    )


def test_plan_statuses() -> None:
    assert render.plan(PHASE_STATES["progressing"]) == [(5, "done"), (25, "current"), (50, "next"), (100, "pending")]
    assert [s for _, s in render.plan(PHASE_STATES["promoted"])] == ["done"] * 4
    assert [s for _, s in render.plan(PHASE_STATES["rolledback"])] == ["done", "rolled back", "skipped", "skipped"]


def test_durations() -> None:
    assert [render.duration(s) for s in (0, 59, 61, 600, 3599, 3660, 86400 + 7200, 30 * 86400)] == [
        "0s",
        "59s",
        "1m1s",
        "10m",
        "59m",
        "1h1m",
        "1d2h",
        "30d",
    ]


def test_documents_validate_against_schema() -> None:
    routes = all_routes()
    doc = render.list_document(routes, NOW)
    jsonschema.validate(doc, SCHEMA)
    assert [i["route"] for i in doc["items"]] == [
        "failed",
        "paused",
        "pending",
        "progressing",
        "promoted",
        "rolledback",
        "waiting",
    ]
    for r in routes[:-1]:
        single = render.single_document(
            r,
            [{"type": "Normal", "reason": "X", "message": "m", "count": 2, "lastTimestamp": "2025-03-01T11:58:00Z"}],
            NOW,
        )
        jsonschema.validate(json.loads(json.dumps(single)), SCHEMA)
    prog = next(i for i in doc["items"] if i["route"] == "progressing")
    assert prog["step"] == {"number": 2, "total": 4}
    assert prog["nextInSeconds"] == 90.0
    assert prog["verdict"]["signals"][0]["canary"]["successRate"] == 99.8
    assert prog["weights"]["canary"] == {"backend": "whoami-v2", "percent": 25}


def test_broken_state_is_reported_not_raised() -> None:
    r = route_dict("broken", "shop", None, 0, extra={ann.STATE: "{not json"})
    rs = render.RouteStatus.from_route(r)
    assert rs.phase == render.UNKNOWN
    assert "delete the annotation to start over" in render.message_of(rs)
    jsonschema.validate(render.single_document(r, [], NOW), SCHEMA)
