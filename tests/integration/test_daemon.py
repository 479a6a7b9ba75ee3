"""``canaryd run`` as a real process: SIGKILL/restart, two replicas with a Lease, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client

from canaryd import spec as ann
from canaryd.devstack.controlplane import free_port
from canaryd.state import Phase, RolloutState, parse_ts
from tests.conftest import Stack
from tests.kubeobjects import create_backend, create_route, eventually, get_route, route_body

REPO = Path(__file__).resolve().parents[2]


class Daemon:
    def __init__(self, stack: Stack, namespace: str, identity: str, tmp: Path, *, lease_s: int = 4) -> None:
        self.identity = identity
        self.port = free_port()
        self.log_path = tmp / f"{identity}.log"
        env = {
            **os.environ,
            "CANARYD_NAMESPACES": json.dumps([namespace]),
            "CANARYD_LEASE_NAMESPACE": namespace,
            "CANARYD_LEASE_DURATION_S": str(lease_s),
            "CANARYD_LEASE_RENEW_S": "1",
            "CANARYD_IDENTITY": identity,
            "CANARYD_LOG_FORMAT": "json",
            "CANARYD_HTTP_HOST": "127.0.0.1",
            "CANARYD_HTTP_PORT": str(self.port),
        }
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "canaryd", "run", "--kubeconfig", str(stack.kubeconfig)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def patches(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == "route_patched"]

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, ""
        except (urllib.error.URLError, OSError):
            return 0, ""

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=20)
        finally:
            self.log.close()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)


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
    written = [p["canary_weight"] for d in (first, second) for p in d.patches() if p.get("canary_weight") is not None]
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
    written = [p["canary_weight"] for d in (a, b) for p in d.patches() if p.get("canary_weight") is not None]
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
