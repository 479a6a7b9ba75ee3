"""The engine against the real apiserver: stepping, concurrent edits, bad input, intents."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kubernetes_asyncio import client, watch

from canaryd.core import spec as ann
from canaryd.core.state import Phase, RolloutState
from canaryd.engine import Engine
from canaryd.kube import GATEWAY_GROUP, GATEWAY_VERSION, HTTPROUTES
from tests.kubeobjects import (
    create_backend,
    create_route,
    deployment_backend,
    eventually,
    get_route,
    patch_route,
    ready_addresses,
    route_body,
    route_events,
    running_engine,
    scale,
    wait_events,
    weights,
)


@pytest.fixture
async def engine(api: client.ApiClient, namespace: str) -> AsyncIterator[Engine]:
    async with running_engine(api, namespace) as e:
        yield e


async def backends(api: client.ApiClient, namespace: str, *names: str) -> None:
    for n in names or ("whoami", "whoami-v1", "whoami-v2"):
        await create_backend(api, namespace, n)


def state_of(route: dict[str, Any]) -> RolloutState | None:
    raw = (route["metadata"].get("annotations") or {}).get(ann.STATE)
    return RolloutState.from_annotation(raw) if raw else None


async def wait_phase(
    api: client.ApiClient, namespace: str, name: str, phase: Phase, timeout: float = 30
) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        r = await get_route(api, namespace, name)
        st = state_of(r)
        return r if st is not None and st.phase == phase else None

    return await eventually(check, timeout=timeout, what=f"{namespace}/{name} in phase {phase}")


async def test_full_progression_observed_through_a_watch(api: client.ApiClient, namespace: str, engine: Engine) -> None:
    await backends(api, namespace)
    seen: list[tuple[int, int]] = []

    async def observe() -> None:
        co = client.CustomObjectsApi(api)
        w = watch.Watch()
        try:
            async for ev in w.stream(
                co.list_namespaced_custom_object,
                GATEWAY_GROUP,
                GATEWAY_VERSION,
                namespace,
                HTTPROUTES,
                timeout_seconds=60,
            ):
                ws = weights(ev["raw_object"])
                pair = (ws["whoami-v1"], ws["whoami-v2"])
                if not seen or seen[-1] != pair:
                    seen.append(pair)
                if pair == (0, 100):
                    return
        finally:
            await w.close()

    watcher = asyncio.create_task(observe())
    await asyncio.sleep(0.3)
    await create_route(
        api,
        namespace,
        route_body("whoami", annotations={ann.CANARY: "whoami-v2", ann.STEPS: "10,25,50,100", ann.INTERVAL: "1s"}),
    )
    await asyncio.wait_for(watcher, 30)
    assert seen == [(100, 0), (90, 10), (75, 25), (50, 50), (0, 100)]
    r = await wait_phase(api, namespace, "whoami", Phase.PROMOTED)
    assert [b["name"] for b in r["spec"]["rules"][0]["backendRefs"]] == ["whoami-v1", "whoami-v2"]
    # Events follow the patch that caused them.
    await wait_events(api, namespace, "whoami", "Promoted")
    evs = await route_events(api, namespace, "whoami")
    # One Event per write: the first carries what else that write did (not analysed, step 1/4).
    assert [e.reason for e in evs] == ["RolloutStarted", "StepAdvanced", "StepAdvanced", "Promoted"]
    assert "; NotAnalysed: " in evs[0].message and "; StepAdvanced: step 1/4" in evs[0].message


async def test_user_scale_and_other_rules_and_fields_are_kept(
    api: client.ApiClient, namespace: str, engine: Engine
) -> None:
    await backends(api, namespace, "whoami", "whoami-v1", "whoami-v2", "legacy")
    other_rule = {
        "matches": [{"path": {"type": "PathPrefix", "value": "/legacy"}}],
        "filters": [
            {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}}
        ],
        "backendRefs": [{"name": "legacy", "port": 80, "weight": 7}],
    }
    body = route_body(
        "whoami",
        backends=(("whoami-v1", 1000), ("whoami-v2", 0), ("legacy", 10)),
        annotations={
            ann.CANARY: "whoami-v2",
            ann.STABLE: "whoami-v1",
            ann.STEPS: "25,100",
            ann.INTERVAL: "30s",
            "team": "shop",
        },
        extra_rules=[other_rule],
    )
    before = await create_route(api, namespace, body)
    r = await eventually(lambda: _with_weight(api, namespace, "whoami-v2", 250), timeout=20, what="step 1")
    assert weights(r) == {"whoami-v1": 750, "whoami-v2": 250, "legacy": 10}

    # A concurrent edit by another client during the rollout is kept.
    await patch_route(api, namespace, "whoami", {"metadata": {"labels": {"edited": "yes"}}})
    await patch_route(api, namespace, "whoami", {"metadata": {"annotations": {ann.INTENT: "promote"}}})
    r = await wait_phase(api, namespace, "whoami", Phase.PROMOTED)
    assert r["metadata"]["labels"] == {"app": "whoami", "edited": "yes", ann.PHASE_LABEL: "Promoted"}  # + canaryd's
    assert ann.INTENT not in r["metadata"]["annotations"]
    assert r["metadata"]["annotations"]["team"] == "shop"
    want, got = copy.deepcopy(before["spec"]), copy.deepcopy(r["spec"])
    want["rules"][0]["backendRefs"][0]["weight"] = 0
    want["rules"][0]["backendRefs"][1]["weight"] = 1000
    assert got == want
    st = state_of(r)
    assert st is not None and st.intents[-1].intent == "promote" and st.intents[-1].result == "applied"


async def _with_weight(api: client.ApiClient, namespace: str, backend: str, weight: int) -> dict[str, Any] | None:
    r = await get_route(api, namespace, "whoami")
    return r if weights(r).get(backend) == weight else None


BAD_INPUTS: list[tuple[str, dict[str, str], str]] = [
    ("unknown-backend", {ann.CANARY: "whoami-v9"}, "canaryd.io/canary"),
    ("same-backends", {ann.CANARY: "whoami-v2", ann.STABLE: "whoami-v2"}, "canaryd.io/stable"),
    ("steps-decreasing", {ann.CANARY: "whoami-v2", ann.STEPS: "50,10,100"}, "canaryd.io/steps"),
    ("steps-out-of-range", {ann.CANARY: "whoami-v2", ann.STEPS: "10,150"}, "canaryd.io/steps"),
    ("steps-not-numbers", {ann.CANARY: "whoami-v2", ann.STEPS: "ten,twenty"}, "canaryd.io/steps"),
    ("bad-duration", {ann.CANARY: "whoami-v2", ann.INTERVAL: "soon"}, "canaryd.io/interval"),
    ("hostile-name", {ann.CANARY: 'v2"} or vector(1) #'}, "canaryd.io/canary"),
]


@pytest.mark.parametrize(("case", "annotations", "named"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
async def test_bad_input_fails_with_event_and_leaves_route_untouched(
    api: client.ApiClient, namespace: str, engine: Engine, case: str, annotations: dict[str, str], named: str
) -> None:
    await backends(api, namespace)
    before = await create_route(api, namespace, route_body("whoami", annotations=annotations))
    r = await wait_phase(api, namespace, "whoami", Phase.FAILED)
    st = state_of(r)
    assert st is not None and named in st.message
    assert r["spec"] == before["spec"]
    evs = await wait_events(api, namespace, "whoami", "InvalidSpec")
    assert named in evs[0].message and evs[0].type == "Warning"


async def test_structural_bad_inputs(api: client.ApiClient, namespace: str, engine: Engine) -> None:
    await backends(api, namespace, "whoami", "whoami-v1", "whoami-v2", "other")
    cases: list[tuple[str, dict[str, Any], str]] = [
        (
            "no-shared-rule",
            route_body(
                "no-shared-rule",
                backends=(("whoami-v1", 100),),
                extra_rules=[{"backendRefs": [{"name": "whoami-v2", "port": 80, "weight": 0}]}],
                annotations={ann.CANARY: "whoami-v2", ann.STABLE: "whoami-v1"},
            ),
            "no rule holds both",
        ),
        (
            "zero-total",
            route_body(
                "zero-total", backends=(("whoami-v1", 0), ("whoami-v2", 0)), annotations={ann.CANARY: "whoami-v2"}
            ),
            "both 0",
        ),
        (
            "gateway-parent",
            route_body("gateway-parent", parent="edge", parent_kind="Gateway", annotations={ann.CANARY: "whoami-v2"}),
            "GAMMA",
        ),
        (
            "missing-service",
            route_body(
                "missing-service",
                backends=(("whoami-v1", 100), ("whoami-v3", 0)),
                annotations={ann.CANARY: "whoami-v3"},
            ),
            "does not exist",
        ),
    ]
    created = {name: await create_route(api, namespace, body) for name, body, _ in cases}
    for name, _, text in cases:
        r = await wait_phase(api, namespace, name, Phase.FAILED)
        st = state_of(r)
        assert st is not None and text in st.message, st.message if st else None
        assert r["spec"] == created[name]["spec"]


async def test_readiness_gate_holds_then_proceeds(api: client.ApiClient, namespace: str, engine: Engine) -> None:
    """A canary Deployment at 0 replicas: no Pods, no ready endpoints, the gate holds at 0 %.
    Scaled up, kwok runs its Pods, the real EndpointSlice controller lists them, the rollout goes."""
    await backends(api, namespace, "whoami", "whoami-v1")
    await deployment_backend(api, namespace, "whoami-v2", replicas=0)
    await create_route(
        api,
        namespace,
        route_body(
            "whoami",
            annotations={ann.CANARY: "whoami-v2", ann.STEPS: "50,100", ann.INTERVAL: "1s", ann.READY_DEADLINE: "60s"},
        ),
    )
    r = await wait_phase(api, namespace, "whoami", Phase.WAITING)
    assert weights(r) == {"whoami-v1": 100, "whoami-v2": 0}
    await scale(api, namespace, "whoami-v2", 2)
    await wait_phase(api, namespace, "whoami", Phase.PROMOTED)


async def test_deployment_scaled_to_zero_mid_rollout_holds_the_gate(
    api: client.ApiClient, namespace: str, engine: Engine
) -> None:
    """Scaling the canary to 0 mid-rollout: the controller empties its slice, canaryd holds the
    step (weights as they were, phase Waiting) and goes on once the Pods are back."""
    await backends(api, namespace, "whoami", "whoami-v1")
    await deployment_backend(api, namespace, "whoami-v2", replicas=2)
    await create_route(
        api,
        namespace,
        route_body(
            "whoami",
            annotations={ann.CANARY: "whoami-v2", ann.STEPS: "20,40,100", ann.INTERVAL: "2s", ann.READY_DEADLINE: "5m"},
        ),
    )
    await eventually(lambda: _with_weight(api, namespace, "whoami-v2", 20), timeout=30, what="first step")
    await scale(api, namespace, "whoami-v2", 0)
    await eventually(
        lambda: _none_ready(api, namespace, "whoami-v2"), timeout=30, what="the controller emptying the slice"
    )
    r = await wait_phase(api, namespace, "whoami", Phase.WAITING)
    held = weights(r)
    assert held["whoami-v2"] in (20, 40), held  # the step it was on when the Pods went; never 100
    await asyncio.sleep(3)  # more than an interval: still held
    r = await get_route(api, namespace, "whoami")
    assert weights(r) == held and state_of(r).phase == Phase.WAITING  # type: ignore[union-attr]
    await scale(api, namespace, "whoami-v2", 2)
    await wait_phase(api, namespace, "whoami", Phase.PROMOTED, timeout=60)


async def test_readiness_deadline_rolls_back(api: client.ApiClient, namespace: str, engine: Engine) -> None:
    await backends(api, namespace, "whoami", "whoami-v1")
    await deployment_backend(api, namespace, "whoami-v2", replicas=1)
    await create_route(
        api,
        namespace,
        route_body(
            "whoami",
            annotations={ann.CANARY: "whoami-v2", ann.STEPS: "20,40,100", ann.INTERVAL: "2s", ann.READY_DEADLINE: "2s"},
        ),
    )
    await eventually(lambda: _with_weight(api, namespace, "whoami-v2", 20), timeout=30, what="first step")
    await scale(api, namespace, "whoami-v2", 0)
    r = await wait_phase(api, namespace, "whoami", Phase.ROLLED_BACK)
    assert weights(r) == {"whoami-v1": 100, "whoami-v2": 0}
    st = state_of(r)
    assert st is not None and "no ready endpoints" in st.message


async def _none_ready(api: client.ApiClient, namespace: str, service: str) -> bool | None:
    return True if not await ready_addresses(api, namespace, service) else None


async def test_intents_pause_resume_abort_retry_and_new_canary(
    api: client.ApiClient, namespace: str, engine: Engine
) -> None:
    await backends(api, namespace, "whoami", "whoami-v1", "whoami-v2", "whoami-v3")
    await create_route(
        api,
        namespace,
        route_body(
            "whoami",
            backends=(("whoami-v1", 100), ("whoami-v2", 0)),
            annotations={ann.CANARY: "whoami-v2", ann.STEPS: "10,20,30,100", ann.INTERVAL: "2s"},
        ),
    )
    await eventually(lambda: _with_weight(api, namespace, "whoami-v2", 10), timeout=10, what="first step")
    await patch_route(api, namespace, "whoami", {"metadata": {"annotations": {ann.INTENT: "pause"}}})
    r = await wait_phase(api, namespace, "whoami", Phase.PAUSED)
    held = weights(r)
    await asyncio.sleep(3)
    assert weights(await get_route(api, namespace, "whoami")) == held
    await patch_route(api, namespace, "whoami", {"metadata": {"annotations": {ann.INTENT: "resume"}}})
    await wait_phase(api, namespace, "whoami", Phase.PROGRESSING)
    await patch_route(api, namespace, "whoami", {"metadata": {"annotations": {ann.INTENT: "abort"}}})
    r = await wait_phase(api, namespace, "whoami", Phase.ROLLED_BACK)
    assert weights(r) == {"whoami-v1": 100, "whoami-v2": 0}
    await patch_route(api, namespace, "whoami", {"metadata": {"annotations": {ann.INTENT: "retry"}}})
    await eventually(lambda: _with_weight(api, namespace, "whoami-v2", 10), timeout=10, what="retry first step")
    st = state_of(await get_route(api, namespace, "whoami"))
    assert st is not None and [i.intent for i in st.intents] == ["pause", "resume", "abort", "retry"]

    # A new canary mid-rollout restarts from the first step against it.
    await patch_route(
        api,
        namespace,
        "whoami",
        [
            {
                "op": "add",
                "path": "/spec/rules/0/backendRefs/-",
                "value": {"name": "whoami-v3", "port": 80, "weight": 0},
            },
            {"op": "replace", "path": f"/metadata/annotations/{ann.CANARY.replace('/', '~1')}", "value": "whoami-v3"},
        ],
    )
    r = await eventually(lambda: _with_weight(api, namespace, "whoami-v3", 10), timeout=10, what="v3 first step")
    st = state_of(r)
    assert st is not None and st.canary == "whoami-v3" and st.step == 0
    assert await wait_events(api, namespace, "whoami", "Restarted")


async def test_state_annotation_is_versioned_json(api: client.ApiClient, namespace: str, engine: Engine) -> None:
    await backends(api, namespace)
    await create_route(
        api,
        namespace,
        route_body("whoami", annotations={ann.CANARY: "whoami-v2", ann.STEPS: "50,100", ann.INTERVAL: "1h"}),
    )
    r = await wait_phase(api, namespace, "whoami", Phase.PROGRESSING)
    raw = json.loads(r["metadata"]["annotations"][ann.STATE])
    assert raw["version"] == 1 and raw["step"] == 0 and raw["canary_weight"] == 50 and raw["next_at"]
