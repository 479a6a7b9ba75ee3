"""HookRunner and Notifier against a real aiohttp server on 127.0.0.1 standing for the hooks.

No control plane needed: each test starts its own server on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

import canaryd
from canaryd.hooks import HookRunner, HooksSettings, Notifier, build_payload, client, rollout_id

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs" / "hook-payload-schema.json").read_text())
SLACK_VALIDATOR = jsonschema.Draft202012Validator({"$defs": SCHEMA["$defs"], "$ref": "#/$defs/slackMessage"})
PAYLOAD_VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
SLACK = 1.5  # seconds of slack allowed over a timeout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    query: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class HookServer:
    """Routes: /ok, /refuse, /plain-refuse, /hang, /redirect; every request is recorded."""

    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(
            Seen(request.method, request.path, dict(request.headers), await request.read(), dict(request.query))
        )
        if request.path == "/ok":
            return web.json_response({"reason": "all good"})
        if request.path == "/refuse":
            return web.json_response({"reason": "smoke test failed: 3/10 checks"}, status=403)
        if request.path == "/plain-refuse":
            return web.Response(status=500, text="  upstream\nexploded  " + "x" * 500)
        if request.path == "/hang":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await self.release.wait()
            return web.Response(text="too late")
        if request.path == "/redirect":
            raise web.HTTPFound(self.url("/ok"))
        return web.Response(status=404, text="no such hook")

    async def start(self, port: int = 0) -> HookServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = port or int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[HookServer]:
    s = await HookServer().start()
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[MutableMapping[str, Any]]]:
    """structlog events of canaryd.hooks (a fresh logger, whatever caching an earlier configure set up)."""
    with capture_logs() as captured:
        monkeypatch.setattr(client, "log", structlog.get_logger("canaryd.hooks"))
        yield captured


def payload(kind: str = "HookCall", **changes: Any) -> dict[str, Any]:
    p = build_payload(
        kind=kind,  # type: ignore[arg-type]
        name="smoke" if kind == "HookCall" else "",
        type="confirm-step" if kind == "HookCall" else "transition",
        namespace="shop",
        route="whoami",
        phase="Progressing",
        step=2,
        steps=[5, 10, 25, 50, 100],
        canary="whoami-v2",
        stable="whoami-v1",
        canary_weight=10,
        rollout_id=rollout_id("shop", "whoami", "whoami-v2", "2026-12-01T10:00:00.000Z"),
        at=datetime(2026, 12, 1, 10, 2, tzinfo=UTC),
    )
    return {**p, **changes}


def hooks(**named: dict[str, Any]) -> HooksSettings:
    return HooksSettings.model_validate(
        {"hooks": {n: {"kinds": ["confirm-step", "step"], "backoff_s": 0.05, **h} for n, h in named.items()}}
    )


def sample(reg: CollectorRegistry, metric: str, **labels: str) -> float:
    return reg.get_sample_value(metric, labels) or 0.0


async def test_2xx_is_ok_with_the_documented_request(server: HookServer) -> None:
    reg = CollectorRegistry()
    async with HookRunner(
        hooks(smoke={"url": server.url("/ok"), "headers": {"X-Team": "a"}}), metrics_registry=reg
    ) as r:
        # A URL in the payload is data, never a destination.
        result = await r.call("smoke", "confirm-step", payload(url="http://127.0.0.1:1/evil"))
    assert (result.ok, result.status, result.reason, result.outcome) == (True, 200, "all good", "ok")
    assert result.duration_s >= 0
    [seen] = server.seen
    assert (seen.method, seen.path) == ("POST", "/ok")
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["User-Agent"] == f"canaryd/{canaryd.__version__}"
    p = payload()
    assert seen.headers["Idempotency-Key"] == f"{p['rollout_id']}:confirm-step:2"
    assert seen.headers["X-Team"] == "a"
    body = seen.json()
    PAYLOAD_VALIDATOR.validate({k: v for k, v in body.items() if k != "url"})
    assert body["type"] == "confirm-step" and body["weights"] == {"stable": 90, "canary": 10}
    assert sample(reg, "canaryd_hook_calls_total", name="smoke", kind="confirm-step", outcome="ok") == 1
    assert sample(reg, "canaryd_hook_duration_seconds_count", name="smoke", kind="confirm-step") == 1


async def test_refusal_carries_the_hooks_reason(server: HookServer) -> None:
    reg = CollectorRegistry()
    settings = hooks(smoke={"url": server.url("/refuse")}, plain={"url": server.url("/plain-refuse")})
    async with HookRunner(settings, metrics_registry=reg) as r:
        refused = await r.call("smoke", "confirm-step", payload())
        plain = await r.call("plain", "confirm-step", payload())
    assert (refused.ok, refused.status, refused.reason, refused.outcome) == (
        False,
        403,
        "smoke test failed: 3/10 checks",
        "refused",
    )
    assert (plain.ok, plain.status) == (False, 500)
    assert plain.reason.startswith("upstream exploded xxx") and len(plain.reason) == 200
    assert server.paths() == ["/refuse", "/plain-refuse"]  # a refusal is an answer: not retried
    assert sample(reg, "canaryd_hook_calls_total", name="smoke", kind="confirm-step", outcome="refused") == 1


async def test_a_hanging_hook_is_a_timeout_within_the_bound(server: HookServer) -> None:
    reg = CollectorRegistry()
    async with HookRunner(hooks(slow={"url": server.url("/hang"), "timeout_s": 0.5}), metrics_registry=reg) as r:
        start = time.monotonic()
        result = await r.call("slow", "confirm-step", payload())
        elapsed = time.monotonic() - start
    assert (result.ok, result.status, result.outcome) == (False, None, "timeout")
    assert result.reason == "timed out after 0.5s"
    assert elapsed < 0.5 + SLACK
    assert server.paths() == ["/hang"]  # a timeout is not retried
    assert sample(reg, "canaryd_hook_calls_total", name="slow", kind="confirm-step", outcome="timeout") == 1


async def test_connection_refused_is_retried_until_the_hook_is_up(logs: list[MutableMapping[str, Any]]) -> None:
    port = free_port()  # nothing listens here yet
    settings = hooks(late={"url": f"http://127.0.0.1:{port}/ok", "retries": 8, "backoff_s": 0.1})
    late = HookServer()

    async def start_after_first_refusal() -> None:
        for _ in range(1000):  # bounded: a runner that never retried fails the assertions below
            if any(e["event"] == "hook_retry" for e in logs):
                break
            await asyncio.sleep(0.01)
        await late.start(port)

    starter = asyncio.create_task(start_after_first_refusal())
    try:
        async with HookRunner(settings) as r:
            result = await r.call("late", "step", payload())
    finally:
        await starter
        await late.stop()
    assert (result.ok, result.status, result.reason) == (True, 200, "all good")
    retries = [e for e in logs if e["event"] == "hook_retry"]
    assert retries and retries[0]["error"] == "connection refused"
    assert late.paths() == ["/ok"]


async def test_unreachable_after_retries_is_an_error() -> None:
    port = free_port()
    reg = CollectorRegistry()
    async with HookRunner(hooks(gone={"url": f"http://127.0.0.1:{port}/", "retries": 2}), metrics_registry=reg) as r:
        result = await r.call("gone", "step", payload())
    assert (result.ok, result.status, result.outcome) == (False, None, "error")
    assert result.reason == "unreachable after 3 attempt(s): connection refused"
    assert sample(reg, "canaryd_hook_calls_total", name="gone", kind="step", outcome="error") == 1


async def test_headers_from_files_are_sent_and_never_logged(
    server: HookServer, tmp_path: Path, logs: list[MutableMapping[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    secret = "Bearer s3cr3t-hook-token-0123456789"
    token = tmp_path / "authorization"
    token.write_text(secret + "\n")
    settings = hooks(
        smoke={"url": server.url("/refuse"), "headers_from_files": {"Authorization": str(token)}},
        missing={"url": server.url("/ok"), "headers_from_files": {"Authorization": str(tmp_path / "nope")}},
    )
    caplog.set_level(logging.DEBUG)
    async with HookRunner(settings) as r:
        result = await r.call("smoke", "confirm-step", payload())
        token.write_text("Bearer rotated\n")  # read at call time: a rotated Secret is picked up
        await r.call("smoke", "confirm-step", payload())
        missing = await r.call("missing", "confirm-step", payload())
    assert [s.headers["Authorization"] for s in server.seen] == [secret, "Bearer rotated"]
    assert (missing.ok, missing.outcome) == (False, "error")
    assert "cannot read" in missing.reason and missing.status is None
    assert server.paths() == ["/refuse", "/refuse"]  # nothing sent without its header
    everything = repr(logs) + caplog.text + repr(result)
    assert any(e["event"] == "hook_call" for e in logs)
    assert "s3cr3t" not in everything and "rotated" not in everything


async def test_redirects_are_not_followed(server: HookServer) -> None:
    async with HookRunner(hooks(r={"url": server.url("/redirect")})) as r:
        result = await r.call("r", "step", payload())
    assert (result.ok, result.status) == (False, 302)
    assert "redirects are not followed" in result.reason
    assert server.paths() == ["/redirect"]


async def test_get_hook_sends_the_query(server: HookServer) -> None:
    async with HookRunner(hooks(g={"url": server.url("/ok?token=x"), "method": "GET"})) as r:
        result = await r.call("g", "step", payload())
    assert result.ok
    [seen] = server.seen
    assert (seen.method, seen.body) == ("GET", b"")
    assert seen.query["token"] == "x"
    assert {k: seen.query[k] for k in ("type", "namespace", "route", "step", "canary_weight")} == {
        "type": "step",
        "namespace": "shop",
        "route": "whoami",
        "step": "2",
        "canary_weight": "10",
    }


async def test_unknown_hook_or_kind_sends_nothing(server: HookServer) -> None:
    reg = CollectorRegistry()
    async with HookRunner(hooks(smoke={"url": server.url("/ok")}), metrics_registry=reg) as r:
        unknown = await r.call("nope", "step", payload())
        wrong_kind = await r.call("smoke", "pre-rollout", payload())
    assert (unknown.ok, unknown.outcome, unknown.reason) == (False, "error", "hook 'nope' is not configured")
    assert not wrong_kind.ok and "does not take 'pre-rollout' calls" in wrong_kind.reason
    assert server.seen == []
    assert sample(reg, "canaryd_hook_calls_total", name="nope", kind="step", outcome="error") == 1


async def test_slack_notifier_body_has_the_documented_shape(server: HookServer, tmp_path: Path) -> None:
    url_file = tmp_path / "url"
    url_file.write_text(server.url("/ok") + "\n")
    settings = HooksSettings.model_validate(
        {
            "notifiers": {
                "team-a": {"type": "slack", "url_from_file": str(url_file), "phases": ["Promoted", "RolledBack"]},
                "audit": {"url": server.url("/ok")},
            },
            "default_notifiers": ["audit"],
        }
    )
    reg = CollectorRegistry()
    async with Notifier(settings, metrics_registry=reg) as n:
        results = await n.notify(payload("Notification", phase="RolledBack", verdict="fail"), ["team-a", "audit"])
        skipped = await n.notify(payload("Notification", phase="Progressing"), ["team-a"])
        default = await n.notify(payload("Notification", phase="Progressing"), None)
        opted_out = await n.notify(payload("Notification", phase="Promoted"), [])
    assert {k: r.ok for k, r in results.items()} == {"team-a": True, "audit": True}
    assert (skipped, list(default), opted_out) == ({}, ["audit"], {})
    bodies = [s.json() for s in server.seen]
    assert len(bodies) == 3
    [slack] = [b for b in bodies if "blocks" in b]
    SLACK_VALIDATOR.validate(slack)
    assert "shop/whoami: RolledBack" in slack["text"]
    webhooks = [b for b in bodies if "blocks" not in b]
    for w in webhooks:
        PAYLOAD_VALIDATOR.validate(w)
        assert (w["kind"], w["hook"], w["type"]) == ("Notification", "audit", "transition")
    assert sample(reg, "canaryd_notifications_total", name="team-a", outcome="ok") == 1
    assert sample(reg, "canaryd_notifications_total", name="audit", outcome="ok") == 2


async def test_failing_notifiers_do_not_raise_and_are_counted(
    server: HookServer, tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    settings = HooksSettings.model_validate(
        {
            "notifiers": {
                "down": {"url": f"http://127.0.0.1:{free_port()}/", "retries": 1, "backoff_s": 0.05},
                "refusing": {"type": "slack", "url": server.url("/plain-refuse")},
                "no-secret": {"url_from_file": str(tmp_path / "absent")},
                "slow": {"url": server.url("/hang"), "timeout_s": 0.2},
            }
        }
    )
    reg = CollectorRegistry()
    n = Notifier(settings, metrics_registry=reg)
    try:
        results = await n.notify(payload("Notification", phase="Failed"), ["down", "refusing", "no-secret", "slow"])
        background = n.notify_soon(payload("Notification", phase="Failed"), ["down"])
        unsendable = await n.notify({"phase": "Failed", "oops": object()}, ["down"])  # still no exception
    finally:
        await n.aclose()
    assert background.done() and not background.result()["down"].ok
    assert {k: r.outcome for k, r in results.items()} == {
        "down": "error",
        "refusing": "refused",
        "no-secret": "error",
        "slow": "timeout",
    }
    assert (unsendable["down"].ok, unsendable["down"].reason) == (False, "internal error: TypeError")
    assert sample(reg, "canaryd_notifications_total", name="down", outcome="error") == 3
    assert sample(reg, "canaryd_notifications_total", name="refusing", outcome="refused") == 1
    assert sample(reg, "canaryd_notifications_total", name="no-secret", outcome="error") == 1
    assert sample(reg, "canaryd_notifications_total", name="slow", outcome="timeout") == 1
    failed = [e for e in logs if e["event"] == "notification_failed"]
    assert {e["notifier"] for e in failed} == {"down", "refusing", "no-secret", "slow"}
    assert all(e["log_level"] == "warning" for e in failed)
