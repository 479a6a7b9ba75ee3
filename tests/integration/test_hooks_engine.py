"""Hooks and notifications driven by the real engine against the real apiserver and a real local hook server.

The hook server is aiohttp on 127.0.0.1 whose answer per path the test sets; every call is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from aiohttp import web
from kubernetes_asyncio import client

from canaryd.core import spec as ann
from canaryd.core.state import Phase, RolloutState
from canaryd.hooks import HooksSettings
from tests.kubeobjects import (
    create_backend,
    create_route,
    eventually,
    get_route,
    route_body,
    running_engine,
    wait_events,
    weights,
)

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs" / "hook-payload-schema.json").read_text())


@dataclass
class Gate:
    """Answers per path: (status, reason) or "hang"; records (path, body) of every call."""

    answers: dict[str, tuple[int, str] | str] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def count(self, path: str) -> int:
        return sum(1 for p, _ in self.calls if p == path)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else {}
        self.calls.append((request.path, body))
        answer = self.answers.get(request.path, (200, "ok"))
        if answer == "hang":
            await asyncio.sleep(30)
            return web.Response(text="too late")
        assert isinstance(answer, tuple)
        return web.json_response({"reason": answer[1]}, status=answer[0])

    async def start(self) -> Gate:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        return self


@pytest.fixture
async def gate() -> AsyncIterator[Gate]:
    g = await Gate().start()
    try:
        yield g
    finally:
        assert g.runner is not None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(g.runner.cleanup(), 5)


def settings(gate: Gate) -> HooksSettings:
    return HooksSettings.model_validate(
        {
            "hooks": {
                "smoke": {"url": gate.url("/smoke"), "kinds": ["pre-rollout"], "timeout_s": 2, "retries": 0},
                "confirm": {"url": gate.url("/confirm"), "kinds": ["confirm-step"], "timeout_s": 1, "retries": 0},
                "load": {"url": gate.url("/load"), "kinds": ["step", "post-rollout", "rollback"], "retries": 0},
            },
            "notifiers": {"audit": {"type": "webhook", "url": gate.url("/notify"), "retries": 0}},
            "default_notifiers": ["audit"],
        }
    )


def state_of(route: dict[str, Any]) -> RolloutState | None:
    raw = (route["metadata"].get("annotations") or {}).get(ann.STATE)
    return RolloutState.from_annotation(raw) if raw else None


async def phase_is(api: client.ApiClient, ns: str, phase: Phase) -> RolloutState | None:
    st = state_of(await get_route(api, ns, "whoami"))
    return st if st is not None and st.phase == phase else None


async def setup(api: client.ApiClient, ns: str, hooks: str, steps: str = "50,100", interval: str = "1s") -> None:
    for n in ("whoami", "whoami-v1", "whoami-v2"):
        await create_backend(api, ns, n)
    a = {ann.CANARY: "whoami-v2", ann.STEPS: steps, ann.INTERVAL: interval, ann.HOOKS: hooks}
    await create_route(api, ns, route_body("whoami", annotations=a))


async def test_a_failing_pre_rollout_hook_leaves_the_route_untouched(
    api: client.ApiClient, namespace: str, gate: Gate
) -> None:
    gate.answers["/smoke"] = (500, "smoke test failed: 3/10 checks")
    await setup(api, namespace, "smoke")
    async with running_engine(api, namespace, hooks=settings(gate)):
        st = await eventually(lambda: phase_is(api, namespace, Phase.ROLLED_BACK), timeout=30, what="rollback")
        events = await wait_events(api, namespace, "whoami", "HookFailed")
    assert weights(await get_route(api, namespace, "whoami")) == {"whoami-v1": 100, "whoami-v2": 0}
    assert "smoke test failed" in st.message and "smoke" in events[0].message
    assert gate.count("/smoke") == 1


async def test_a_refusing_gate_holds_then_a_2xx_advances(api: client.ApiClient, namespace: str, gate: Gate) -> None:
    gate.answers["/confirm"] = (403, "change freeze until 17:00")
    await setup(api, namespace, "confirm", steps="30,60,100")
    async with running_engine(api, namespace, hooks=settings(gate)):

        async def held() -> RolloutState | None:
            st = state_of(await get_route(api, namespace, "whoami"))
            return st if st is not None and "change freeze" in st.message else None

        st = await eventually(held, timeout=30, what="a hold with the hook's reason")
        assert st.canary_weight == 30 and st.phase == Phase.PROGRESSING
        await wait_events(api, namespace, "whoami", "HookHold")
        gate.answers["/confirm"] = (200, "go")
        await eventually(lambda: phase_is(api, namespace, Phase.PROMOTED), timeout=60, what="promotion")
    # The gate before 30 -> 60 was asked again while it refused; 60 -> 100 is confirm-promotion (not this hook).
    asked = [b.get("step") for p, b in gate.calls if p == "/confirm"]
    assert len(asked) >= 2 and set(asked) == {1}, asked


async def test_a_hanging_gate_times_out_into_a_hold(api: client.ApiClient, namespace: str, gate: Gate) -> None:
    gate.answers["/confirm"] = "hang"
    await setup(api, namespace, "confirm", steps="30,60,100")
    async with running_engine(api, namespace, hooks=settings(gate)):

        async def held() -> RolloutState | None:
            st = state_of(await get_route(api, namespace, "whoami"))
            return st if st is not None and "timed out" in st.message else None

        st = await eventually(held, timeout=30, what="a timeout hold")
    assert st.canary_weight == 30 and st.phase == Phase.PROGRESSING


async def test_an_unknown_hook_fails_the_route(api: client.ApiClient, namespace: str, gate: Gate) -> None:
    await setup(api, namespace, "nosuch")
    async with running_engine(api, namespace, hooks=settings(gate)):
        st = await eventually(lambda: phase_is(api, namespace, Phase.FAILED), timeout=30, what="Failed")
        events = await wait_events(api, namespace, "whoami", "InvalidSpec")
    assert ann.HOOKS in st.message and "nosuch" in events[0].message and "confirm" in events[0].message
    assert [p for p, _ in gate.calls if p != "/notify"] == []  # only the Failed notification went out


async def test_answers_survive_a_restart_and_notifications_carry_the_payload(
    api: client.ApiClient, namespace: str, gate: Gate
) -> None:
    await setup(api, namespace, "confirm,load", steps="30,60,100", interval="2s")
    async with running_engine(api, namespace, hooks=settings(gate)):
        await eventually(lambda: _answered(api, namespace), timeout=30, what="the first gate's answer on record")
    async with running_engine(api, namespace, hooks=settings(gate)):  # a new process reads the answers back
        await eventually(lambda: phase_is(api, namespace, Phase.PROMOTED), timeout=60, what="promotion")
        await asyncio.sleep(1)  # notifications are sent after the patch, in the background
    asked = [b.get("step") for p, b in gate.calls if p == "/confirm"]
    assert asked == [1], asked  # the answered gate is not asked again across the restart
    fired = [b.get("type") for p, b in gate.calls if p == "/load"]
    assert fired.count("step") == 2 and fired.count("post-rollout") == 1, fired
    notes = [b for p, b in gate.calls if p == "/notify"]
    assert [n["phase"] for n in notes if n["phase"] == "Promoted"] == ["Promoted"]
    assert all(n["kind"] == "Notification" and n["type"] == "transition" for n in notes)
    for body in [b for _, b in gate.calls]:
        jsonschema.validate(body, SCHEMA)


async def _answered(api: client.ApiClient, ns: str) -> bool:
    st = state_of(await get_route(api, ns, "whoami"))
    return st is not None and any(h.startswith("confirm-step:0:") for h in st.hooks_done)
