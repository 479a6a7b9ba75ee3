"""Every bad input of docs/annotations.md, through the engine and through ``canaryd check``: they agree.

Both start from ``canaryd.core.admit``; this proves it end to end against the real apiserver: the
engine's Failed message for each route is a problem that ``check`` reports for the same route, and
the route's spec is left exactly as it was created.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio import client

from canaryd.core import spec as ann
from canaryd.core.backends import RouteRef
from canaryd.core.state import Phase, RolloutState
from canaryd.preflight import preflight
from canaryd.settings import Settings
from tests.kubeobjects import create_backend, create_route, eventually, get_route, route_body

V2 = {ann.CANARY: "whoami-v2"}
BAD: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    # name: (annotations, route_body keyword arguments)
    "unknown-backend": ({ann.CANARY: "whoami-v9"}, {}),
    "canary-is-stable": ({**V2, ann.STABLE: "whoami-v2"}, {}),
    "steps-decrease": ({**V2, ann.STEPS: "50,10,100"}, {}),
    "steps-out-of-range": ({**V2, ann.STEPS: "0,150"}, {}),
    "steps-not-numbers": ({**V2, ann.STEPS: "five,ten"}, {}),
    "steps-and-step-weight": ({**V2, ann.STEPS: "10,100", ann.STEP_WEIGHT: "10"}, {}),
    "max-weight-alone": ({**V2, ann.MAX_WEIGHT: "50"}, {}),
    "bad-duration": ({**V2, ann.INTERVAL: "soon"}, {}),
    "interval-400-nines": ({**V2, ann.INTERVAL: "9" * 400}, {}),
    "interval-over-a-day": ({**V2, ann.INTERVAL: "25h"}, {}),
    "deadline-over-a-week": ({**V2, ann.READY_DEADLINE: "8d"}, {}),
    "success-rate-nan": ({**V2, ann.SUCCESS_RATE_MIN: "nan"}, {}),
    "confidence-out-of-range": ({**V2, ann.CONFIDENCE: "1.5"}, {}),
    "hostile-name": ({ann.CANARY: 'v2"} or vector(1) #'}, {}),
    "unknown-signal": ({**V2, ann.ANALYSIS: "telepathy"}, {}),
    "dapr-without-app-id": ({**V2, ann.ANALYSIS: "dapr"}, {}),
    "on-inconclusive-typo": ({**V2, ann.ON_INCONCLUSIVE: "panic"}, {}),
    "on-drift-typo": ({**V2, ann.ON_DRIFT: "fight"}, {}),
    "huge-value": ({**V2, ann.STEPS: "x" * 150_000}, {}),
    "mistyped-key": ({**V2, "canaryd.io/sucess-rate-min": "99.9"}, {}),
    "unknown-hook": ({**V2, ann.HOOKS: "nosuch"}, {}),
    "no-shared-rule": (
        V2,
        {
            "backends": (("whoami-v1", 100),),
            "extra_rules": [{"backendRefs": [{"name": "whoami-v2", "port": 80, "weight": 0}]}],
        },
    ),
    "both-weights-zero": (V2, {"backends": (("whoami-v1", 0), ("whoami-v2", 0))}),
    "gateway-parent": (V2, {"parent": "default-gateway", "parent_kind": "Gateway"}),
    "missing-service": ({ann.CANARY: "whoami-v3"}, {"backends": (("whoami-v1", 100), ("whoami-v3", 0))}),
}


async def test_engine_and_check_agree_on_every_bad_input(api: client.ApiClient, namespace: str) -> None:
    from tests.kubeobjects import running_engine

    for n in ("whoami", "whoami-v1", "whoami-v2"):
        await create_backend(api, namespace, n)
    created = {}
    for name, (a, kw) in BAD.items():
        created[name] = await create_route(api, namespace, route_body(name, annotations=a, **kw))

    async def all_failed() -> dict[str, RolloutState] | None:
        out = {}
        for name in BAD:
            raw = ((await get_route(api, namespace, name))["metadata"].get("annotations") or {}).get(ann.STATE)
            st = RolloutState.from_annotation(raw) if raw else None
            if st is None or st.phase != Phase.FAILED:
                return None
            out[name] = st
        return out

    async with running_engine(api, namespace):
        failed = await eventually(all_failed, timeout=60, what="every bad route Failed")

    settings = Settings()
    for name in BAD:
        report = await preflight(api, RouteRef(namespace, name), settings=settings, now=datetime.now(UTC))
        problems = [f.message for f in report.problems]
        assert failed[name].message in problems, (name, failed[name].message, problems)
        assert len(failed[name].message) < 600, name
        now = await get_route(api, namespace, name)
        assert now["spec"] == created[name]["spec"], f"{name}: the spec was changed"
