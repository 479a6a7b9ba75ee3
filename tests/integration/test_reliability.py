"""The audit's broken promises, each against the real apiserver and etcd (issue: seven broken promises).

Restarts use the devstack's own kill/restart with the identical command line; routes are read back
from the apiserver, never from canaryd's logs alone.
"""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client

from canaryd.core import spec as ann
from canaryd.core.errors import StateError
from canaryd.core.state import Phase, RolloutState
from canaryd.kube.leader import LeaderElector
from devkit.devstack import controlplane
from tests.conftest import Stack
from tests.daemons import Daemon
from tests.kubeobjects import (
    create_backend,
    create_route,
    eventually,
    get_route,
    patch_route,
    route_body,
    route_events,
    running_engine,
    wait_events,
    weights,
)


def state_of(route: dict[str, Any]) -> RolloutState | None:
    """The route's state, None when absent or (as a hand edit leaves it) unreadable."""
    raw = (route["metadata"].get("annotations") or {}).get(ann.STATE)
    try:
        return RolloutState.from_annotation(raw) if raw else None
    except StateError:
        return None


async def phase_is(api: client.ApiClient, ns: str, name: str, phase: Phase) -> RolloutState | None:
    st = state_of(await get_route(api, ns, name))
    return st if st is not None and st.phase == phase else None


async def backends(api: client.ApiClient, ns: str, *names: str) -> None:
    for n in ("whoami", *names):
        await create_backend(api, ns, n)


# --- 1. an apiserver restart is weather, not a reason to exit ----------------------------------------
@pytest.mark.parametrize("leader_election", [False, True], ids=["single", "leader-elected"])
async def test_daemon_rides_out_an_apiserver_restart(
    own_stack: Stack, own_api: client.ApiClient, daemons: list[Daemon], tmp_path: Path, leader_election: bool
) -> None:
    ns = "chaos"
    await client.CoreV1Api(own_api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    await backends(own_api, ns, "whoami-v1", "whoami-v2")
    a = {ann.CANARY: "whoami-v2", ann.STEPS: "10,20,30,40,50,100", ann.INTERVAL: "2s"}
    await create_route(own_api, ns, route_body("whoami", annotations=a))
    d = Daemon(own_stack, ns, "rider", tmp_path, lease_s=6, leader_election=leader_election)
    daemons.append(d)

    async def stepped() -> RolloutState | None:
        st = state_of(await get_route(own_api, ns, "whoami"))
        return st if st is not None and st.step >= 1 else None

    await eventually(stepped, timeout=60, what="step 2")
    controlplane.kill(own_stack.info, "kube-apiserver")
    # Longer than the renew deadline (2/3 of the 6 s lease): the leader loses its lease and must stand by,
    # compete again and carry on — never exit.
    await asyncio.sleep(8)
    assert d.proc.poll() is None, "the daemon exited while the apiserver was down"
    controlplane.restart(own_stack.info, "kube-apiserver")

    final = await eventually(lambda: phase_is(own_api, ns, "whoami", Phase.PROMOTED), timeout=120, what="promotion")
    assert final.canary_weight == 100
    assert d.proc.poll() is None, "the daemon exited after the restart"

    async def logged_to_100() -> list[int] | None:
        # The route can show Promoted before the daemon's log line for that patch is written.
        w = [p["canary_weight"] for p in d.patches() if p.get("canary_weight") is not None]
        return w if w and w[-1] == 100 else None

    written = await eventually(logged_to_100, timeout=10, what="the daemon's log of the final patch")
    assert written == sorted(set(written)), written
    failures = [e for e in d.events() if e.get("event") == "watch_failed"]
    assert failures, "the outage was not logged"
    assert len(failures) <= 3 * 4, f"the outage was logged as a flood: {len(failures)} lines"
    assert all(e.get("error") for e in failures)
    assert d.stop(signal.SIGTERM) == 0


# --- 2/3. the pair is chosen once ----------------------------------------------------------------------
async def test_backend_added_after_promotion_keeps_its_weight(api: client.ApiClient, namespace: str) -> None:
    await backends(api, namespace, "whoami-v1", "whoami-v2", "whoami-v3")
    a = {ann.CANARY: "whoami-v2", ann.STEPS: "50,100", ann.INTERVAL: "1s"}
    await create_route(api, namespace, route_body("whoami", annotations=a))
    async with running_engine(api, namespace):
        await eventually(lambda: phase_is(api, namespace, "whoami", Phase.PROMOTED), timeout=30, what="promotion")
        r = await get_route(api, namespace, "whoami")
        refs = r["spec"]["rules"][0]["backendRefs"]
        await patch_route(
            api,
            namespace,
            "whoami",
            [
                {
                    "op": "add",
                    "path": "/spec/rules/0/backendRefs/-",
                    "value": {"name": "whoami-v3", "port": 80, "weight": 5},
                }
            ],
        )
        edited = await get_route(api, namespace, "whoami")
        await asyncio.sleep(4)
        after = await get_route(api, namespace, "whoami")
    assert len(refs) == 2
    assert weights(after) == {"whoami-v1": 0, "whoami-v2": 100, "whoami-v3": 5}
    assert after["metadata"]["resourceVersion"] == edited["metadata"]["resourceVersion"], "canaryd wrote again"


async def test_concurrent_editor_of_a_third_backend_ref(api: client.ApiClient, namespace: str) -> None:
    await backends(api, namespace, "whoami-v1", "whoami-v2", "whoami-v3")
    a = {ann.CANARY: "whoami-v2", ann.STABLE: "", ann.STEPS: "20,40,60,80,100", ann.INTERVAL: "1s"}
    await create_route(api, namespace, route_body("whoami", annotations=a))
    stop = asyncio.Event()
    last: dict[str, int | None] = {"v3": None}

    async def editor() -> None:
        i = 0
        while not stop.is_set():
            r = await get_route(api, namespace, "whoami")
            refs = r["spec"]["rules"][0]["backendRefs"]
            idx = next((k for k, b in enumerate(refs) if b["name"] == "whoami-v3"), None)
            ops: list[dict[str, Any]] = [
                {"op": "test", "path": "/metadata/resourceVersion", "value": r["metadata"]["resourceVersion"]}
            ]
            if idx is None:
                w = 5 + i % 7
                ops.append(
                    {
                        "op": "add",
                        "path": "/spec/rules/0/backendRefs/-",
                        "value": {"name": "whoami-v3", "port": 80, "weight": w},
                    }
                )
            else:
                w = None
                ops.append({"op": "remove", "path": f"/spec/rules/0/backendRefs/{idx}"})
            try:
                await patch_route(api, namespace, "whoami", ops)
                last["v3"] = w
            except client.ApiException as exc:
                if exc.status not in (409, 422):
                    raise
            i += 1
            await asyncio.sleep(0.2)

    async with running_engine(api, namespace):
        task = asyncio.create_task(editor())
        await eventually(lambda: phase_is(api, namespace, "whoami", Phase.PROMOTED), timeout=60, what="promotion")
        await asyncio.sleep(2)
        stop.set()
        await task
        final = await get_route(api, namespace, "whoami")
    w = weights(final)
    assert w.get("whoami-v3") == last["v3"], (w, last)
    assert w["whoami-v1"] == 0 and w["whoami-v2"] == 100
    st = state_of(final)
    assert st is not None and st.phase == Phase.PROMOTED and st.stable == "whoami-v1"
    started = [e for e in await route_events(api, namespace, "whoami") if e.reason == "RolloutStarted"]
    assert len(started) == 1, [e.message for e in started]


async def test_sixteen_backend_refs_promote_and_stay_promoted(api: client.ApiClient, namespace: str) -> None:
    others = [f"extra-{i}" for i in range(14)]
    await backends(api, namespace, "whoami-v1", "whoami-v2", *others)
    a = {ann.CANARY: "whoami-v2", ann.STEPS: "50,100", ann.INTERVAL: "1s"}
    body = route_body(
        "whoami", annotations=a, backends=(("whoami-v1", 100), ("whoami-v2", 0), *((o, 5) for o in others))
    )
    await create_route(api, namespace, body)
    async with running_engine(api, namespace):
        await eventually(lambda: phase_is(api, namespace, "whoami", Phase.PROMOTED), timeout=30, what="promotion")
        await asyncio.sleep(3)
        final = await get_route(api, namespace, "whoami")
    st = state_of(final)
    assert st is not None and st.phase == Phase.PROMOTED
    w = weights(final)
    assert w["whoami-v1"] == 0 and w["whoami-v2"] == 100 and all(w[o] == 5 for o in others)


# --- 4/5. hostile values end in Failed with an Event, quickly -------------------------------------------
@pytest.mark.parametrize(
    ("key", "value"),
    [(ann.STEPS, "5," + "x" * 150_000), (ann.INTERVAL, "9" * 400), (ann.READY_DEADLINE, "30d")],
    ids=["150KB-steps", "400-nines-interval", "deadline-30d"],
)
async def test_hostile_values_fail_with_an_event(api: client.ApiClient, namespace: str, key: str, value: str) -> None:
    await backends(api, namespace, "whoami-v1", "whoami-v2")
    body = route_body("whoami", annotations={ann.CANARY: "whoami-v2", key: value})
    created = await create_route(api, namespace, body)
    async with running_engine(api, namespace) as engine:
        st = await eventually(lambda: phase_is(api, namespace, "whoami", Phase.FAILED), timeout=20, what="Failed")
        events = await wait_events(api, namespace, "whoami", "InvalidSpec")
        await asyncio.sleep(2)
        patches = engine.metrics.patches._value.get()
    assert key in st.message and len(st.message) < 600
    assert key in events[0].message
    assert patches <= 2, f"{patches} patches for one invalid route"
    final = await get_route(api, namespace, "whoami")
    assert final["spec"] == created["spec"]


# --- 6. a hand-edited state never moves weights -----------------------------------------------------------
@pytest.mark.parametrize("garbage", ["not json", "[1,2]", '{"phase":"Progressing","step":99}'])
async def test_garbage_state_holds_the_weights(api: client.ApiClient, namespace: str, garbage: str) -> None:
    await backends(api, namespace, "whoami-v1", "whoami-v2")
    a = {ann.CANARY: "whoami-v2", ann.STEPS: "10,30,60,100", ann.INTERVAL: "1s"}
    await create_route(api, namespace, route_body("whoami", annotations=a))
    async with running_engine(api, namespace):

        async def at_30() -> RolloutState | None:
            st = state_of(await get_route(api, namespace, "whoami"))
            return st if st is not None and st.canary_weight == 30 else None

        await eventually(at_30, timeout=20, what="30 %")
        await patch_route(api, namespace, "whoami", {"metadata": {"annotations": {ann.STATE: garbage}}})
        failed = await eventually(lambda: phase_is(api, namespace, "whoami", Phase.FAILED), timeout=20, what="Failed")
        held = weights(await get_route(api, namespace, "whoami"))
        await asyncio.sleep(3)
        still = await get_route(api, namespace, "whoami")
        events = await wait_events(api, namespace, "whoami", "InvalidState")
        assert weights(still) == held and held["whoami-v2"] == 30
        assert "delete the annotation" in failed.message and "retry" in events[0].message
        # retry continues from the held weight: the canary never goes back below 30 %.
        await patch_route(api, namespace, "whoami", {"metadata": {"annotations": {ann.INTENT: "retry"}}})
        await eventually(lambda: phase_is(api, namespace, "whoami", Phase.PROMOTED), timeout=30, what="promotion")


# --- 7. a canary that disappears is rolled back at once ----------------------------------------------------
async def test_canary_service_deleted_rolls_back_and_return_restarts_nothing(
    api: client.ApiClient, namespace: str
) -> None:
    await backends(api, namespace, "whoami-v1", "whoami-v2")
    a = {ann.CANARY: "whoami-v2", ann.STEPS: "40,100", ann.INTERVAL: "60s"}
    await create_route(api, namespace, route_body("whoami", annotations=a))
    core = client.CoreV1Api(api)
    async with running_engine(api, namespace):

        async def at_40() -> RolloutState | None:
            st = state_of(await get_route(api, namespace, "whoami"))
            return st if st is not None and st.canary_weight == 40 else None

        await eventually(at_40, timeout=20, what="40 %")
        await core.delete_namespaced_service("whoami-v2", namespace)
        rolled = await eventually(
            lambda: phase_is(api, namespace, "whoami", Phase.ROLLED_BACK), timeout=10, what="rollback"
        )
        assert weights(await get_route(api, namespace, "whoami")) == {"whoami-v1": 100, "whoami-v2": 0}
        await wait_events(api, namespace, "whoami", "CanaryGone")
        await create_backend(api, namespace, "whoami-v2")
        await asyncio.sleep(3)
        after = await get_route(api, namespace, "whoami")
    st = state_of(after)
    assert st is not None and st.phase == Phase.ROLLED_BACK and st.updated_at == rolled.updated_at
    assert weights(after) == {"whoami-v1": 100, "whoami-v2": 0}


# --- a write the apiserver refuses is not a conflict ---------------------------------------------------------
async def test_a_refused_write_is_reported_and_backed_off(api: client.ApiClient, namespace: str) -> None:
    await backends(api, namespace, "whoami-v1", "whoami-v2")
    # Annotations just under the apiserver's 256 KiB total: canaryd's state cannot be added on top.
    filler = {"example.com/blob": "x" * (262_144 - 400)}
    a = {ann.CANARY: "whoami-v2", ann.STEPS: "50,100", ann.INTERVAL: "1s", **filler}
    await create_route(api, namespace, route_body("whoami", annotations=a))
    async with running_engine(api, namespace) as engine:
        events = await wait_events(api, namespace, "whoami", "PatchRefused", timeout=20)
        await asyncio.sleep(4)
        refusals = engine._refusals.get((namespace, "whoami"), 0)
    assert "invalid" in events[0].message or "Too long" in events[0].message
    assert 1 <= refusals <= 3, refusals
    assert weights(await get_route(api, namespace, "whoami")) == {"whoami-v1": 100, "whoami-v2": 0}


# --- 8. lease expiry is judged by our own clock --------------------------------------------------------------
async def test_lease_skew_neither_steals_nor_stalls(api: client.ApiClient, namespace: str) -> None:
    def skewed(seconds: float) -> Any:
        return lambda: datetime.now(UTC) + timedelta(seconds=seconds)

    kw: dict[str, Any] = {"name": "skew", "namespace": namespace, "duration_s": 3.0, "renew_s": 0.5}
    holder = LeaderElector(api, identity="holder", **kw)
    ahead = LeaderElector(api, identity="ahead", clock=skewed(60), **kw)
    behind = LeaderElector(api, identity="behind", clock=skewed(-60), **kw)
    t_holder = asyncio.create_task(holder.run())
    await asyncio.wait_for(holder.elected.wait(), 10)
    t_ahead = asyncio.create_task(ahead.run())
    await asyncio.sleep(5)  # well past the lease: a clock 60 s ahead must still see it renewed
    assert holder.is_leader and not ahead.elected.is_set()
    t_ahead.cancel()
    t_holder.cancel()  # dies without releasing: the lease must expire by the observer's clock
    await asyncio.gather(t_ahead, t_holder, return_exceptions=True)
    t_behind = asyncio.create_task(behind.run())
    try:
        await asyncio.wait_for(behind.elected.wait(), 3.0 + 3.0)  # a clock 60 s behind takes over in time
    finally:
        t_behind.cancel()
        await asyncio.gather(t_behind, return_exceptions=True)
