"""``canaryd run`` as a real process: SIGKILL/restart, two replicas with a Lease, SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from datetime import datetime
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from canaryd.core import spec as ann
from canaryd.core.state import Phase, RolloutState, parse_ts
from devkit.chaos.etcd_history import EtcdReader, HistoryCollector, route_key
from devkit.chaos.invariants import canary_pct
from tests.conftest import Stack
from tests.daemons import Daemon
from tests.kubeobjects import create_backend, create_route, eventually, get_route, route_body


def _state(route: dict[str, Any]) -> RolloutState | None:
    raw = (route["metadata"].get("annotations") or {}).get(ann.STATE)
    return RolloutState.from_annotation(raw) if raw else None


async def _setup(api: client.ApiClient, namespace: str, steps: str, interval: str) -> None:
    for n in ("whoami", "whoami-v1", "whoami-v2"):
        await create_backend(api, namespace, n)
    await create_route(
        api,
        namespace,
        route_body("whoami", annotations={ann.CANARY: "whoami-v2", ann.STEPS: steps, ann.INTERVAL: interval}),
    )


def _canary_weights_written(stack: Stack, namespace: str) -> list[int]:
    """The canary weights of every stored revision of the route, as etcd holds them, each change once.

    Read from etcd, not from the daemons' logs: a SIGKILL can land between a patch and its log line."""
    collector = HistoryCollector(EtcdReader(stack.info.etcd_url))
    key = route_key(namespace, "whoami")
    collector.track(key)
    collector.collect()
    h = collector.keys[key]
    assert h.complete_down_to_creation and not h.gaps, h.gaps
    out: list[int | None] = []
    for rev in h.ordered():
        w = canary_pct(rev.obj, "whoami-v1", "whoami-v2")
        if not out or out[-1] != w:
            out.append(w)
    steps = out[1:] if out and out[0] == 0 else out  # created at 0: the steps follow
    assert None not in steps, "a revision without the managed pair"
    return [w for w in steps if w is not None]


async def _at_step(api: client.ApiClient, namespace: str, step: int) -> RolloutState | None:
    st = _state(await get_route(api, namespace, "whoami"))
    return st if st is not None and st.step >= step else None


async def test_sigkill_mid_rollout_then_restart_resumes_the_same_step(
    stack: Stack, api: client.ApiClient, namespace: str, daemons: list[Daemon], tmp_path: Path
) -> None:
    await _setup(api, namespace, "10,20,30,40,100", "3s")
    first = Daemon(stack, namespace, "first", tmp_path)
    daemons.append(first)
    before = await eventually(lambda: _at_step(api, namespace, 1), timeout=60, what="step 2")
    await asyncio.sleep(1.0)  # mid-interval
    first.stop(signal.SIGKILL)
    killed = _state(await get_route(api, namespace, "whoami"))
    assert killed is not None and killed.step in (1, 2)

    second = Daemon(stack, namespace, "second", tmp_path, lease_s=2)
    daemons.append(second)
    final = await eventually(lambda: _phase(api, namespace, Phase.PROMOTED), timeout=90, what="promotion")
    # Every step was written exactly once, in order, across both processes.
    written = await asyncio.to_thread(_canary_weights_written, stack, namespace)
    assert written == [10, 20, 30, 40, 100], written
    # The step running at the kill was not restarted: the next step came no earlier than it was due.
    resumed = next(p for p in second.patches() if p.get("canary_weight") is not None)
    assert resumed["canary_weight"] == killed.steps[killed.step + 1]
    due = parse_ts(killed.next_at)
    assert due is not None and datetime.fromisoformat(resumed["timestamp"].replace("Z", "+00:00")) >= due
    assert before.started_at == final.started_at


async def _phase(api: client.ApiClient, namespace: str, phase: Phase) -> RolloutState | None:
    st = _state(await get_route(api, namespace, "whoami"))
    return st if st is not None and st.phase == phase else None


async def test_two_replicas_one_acts_failover_and_sigterm_releases_lease(
    stack: Stack, api: client.ApiClient, namespace: str, daemons: list[Daemon], tmp_path: Path
) -> None:
    a = Daemon(stack, namespace, "replica-a", tmp_path)
    daemons.append(a)
    coord = client.CoordinationV1Api(api)

    async def holder() -> str | None:
        try:
            lease = await coord.read_namespaced_lease("canaryd-leader", namespace)
        except client.ApiException:
            return None
        return lease.spec.holder_identity or None

    assert await eventually(holder, timeout=30, what="a leader") == "replica-a"
    b = Daemon(stack, namespace, "replica-b", tmp_path)
    daemons.append(b)
    await eventually(lambda: _ok(b), timeout=30, what="replica-b serving /readyz")
    await _setup(api, namespace, "10,20,30,40,50,60,100", "1s")
    await eventually(lambda: _at_step(api, namespace, 2), timeout=30, what="step 3")
    assert a.patches() and not b.patches(), "only the leader patches"
    status, body = a.http("/metrics")
    assert status == 200 and "canaryd_route_patches_total" in body and "canaryd_leader 1.0" in body

    # Kill the leader: the standby takes over once the lease expires and finishes the rollout.
    a.stop(signal.SIGKILL)
    assert await eventually(lambda: _is(holder, "replica-b"), timeout=30, what="failover to replica-b")
    await eventually(lambda: _phase(api, namespace, Phase.PROMOTED), timeout=60, what="promotion by replica-b")
    written = await asyncio.to_thread(_canary_weights_written, stack, namespace)
    assert written == [10, 20, 30, 40, 50, 60, 100], written
    assert b.patches()

    # SIGTERM: exit 0 and hand the Lease back at once.
    assert b.stop(signal.SIGTERM) == 0
    assert await holder() is None
    assert any(e.get("event") == "leader_released" for e in b.events())


async def _ok(d: Daemon) -> bool:
    return (await asyncio.to_thread(d.http, "/healthz"))[0] == 200


async def _is(fn: Any, want: str) -> bool:
    return bool(await fn() == want)
