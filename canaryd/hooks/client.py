"""The I/O half of hooks: ``HookRunner`` calls a named hook, ``Notifier`` tells named notifiers.

Both send with one aiohttp session each (closed by ``aclose()``), to URLs from ``HooksSettings``
only, never follow redirects, ignore proxy variables, and never raise for a failed request: the
answer is a ``HookResult``. Header values read from files and notifier URLs read from files are
secrets: they are read at each call and appear in no log line, result or metric.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram

from canaryd import __version__
from canaryd.hooks.config import EndpointConfig, HookConfig, HooksSettings, NotifierConfig, check_url
from canaryd.hooks.payload import slack_message

log = structlog.get_logger("canaryd.hooks")

USER_AGENT = f"canaryd/{__version__}"
REASON_LIMIT = 200
"""Characters of a hook's answer kept as the reason (it ends up in the route's status)."""
BODY_LIMIT = 64 * 1024
"""Bytes of an answer read at most."""
SECRET_FILE_LIMIT = 16 * 1024
BACKOFF_CAP_S = 10.0
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

Outcome = Literal["ok", "refused", "timeout", "error"]
"""ok = 2xx; refused = any other status; timeout = no answer within timeout_s; error = unreachable
after the retries, or nothing could be sent (unknown hook, unreadable secret file)."""


@dataclass(frozen=True)
class HookResult:
    """What a hook (or notifier) answered. ``ok`` only for a 2xx; anything else is a hold / failure.

    ``outcome`` is derived when not given: ok, refused (a status), else error.
    """

    ok: bool
    status: int | None
    reason: str
    duration_s: float
    outcome: Outcome = field(default="ok")

    def __post_init__(self) -> None:
        if not self.ok and self.outcome == "ok":
            object.__setattr__(self, "outcome", "refused" if self.status is not None else "error")


class _NotSent(Exception):
    """The request could not be built (unreadable secret, bad URL file); the message is the reason."""


@dataclass(frozen=True)
class _Request:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None = None
    params: dict[str, str] | None = None


def _read_secret_file(path: str, what: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(SECRET_FILE_LIMIT + 1)
    except OSError as e:
        raise _NotSent(f"{what}: cannot read {path}: {e.strerror or type(e).__name__}") from None
    if len(raw) > SECRET_FILE_LIMIT:
        raise _NotSent(f"{what}: {path} is larger than {SECRET_FILE_LIMIT} bytes")
    try:
        value = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise _NotSent(f"{what}: {path} is not UTF-8 text") from None
    if not value:
        raise _NotSent(f"{what}: {path} is empty")
    if "\r" in value or "\n" in value or "\x00" in value:
        raise _NotSent(f"{what}: {path} holds more than one line")
    return value


def _secret_headers(ep: EndpointConfig) -> dict[str, str]:
    return {name: _read_secret_file(path, f"header {name}") for name, path in ep.headers_from_files.items()}


def _url_from_file(path: str) -> str:
    raw = _read_secret_file(path, "url_from_file")
    try:
        return check_url(raw)
    except ValueError as e:
        raise _NotSent(f"url_from_file: {path}: {e}") from None


def _one_line(s: str) -> str:
    return " ".join("".join(c if c.isprintable() else " " for c in s).split())


def _reason(raw: bytes, status: int, phrase: str) -> str:
    """A JSON body's ``reason`` string, else the body's first characters, else the status line."""
    text = raw.decode("utf-8", "replace")
    if text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("reason"), str) and doc["reason"].strip():
            return _one_line(doc["reason"])[:REASON_LIMIT]
    line = _one_line(text)[:REASON_LIMIT]
    return line or f"HTTP {status} {phrase}".strip()


def _describe(e: aiohttp.ClientError) -> str:
    """A short cause with no URL in it."""
    if isinstance(e, aiohttp.ClientConnectorError):
        if isinstance(e.os_error, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e.os_error, socket.gaierror):
            return "cannot resolve host"
        return f"cannot connect ({type(e.os_error).__name__})"
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    return type(e).__name__


async def _read_limited(resp: aiohttp.ClientResponse) -> bytes:
    buf = bytearray()
    while len(buf) < BODY_LIMIT:
        chunk = await resp.content.read(BODY_LIMIT - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


class _Http:
    """One lazily made session (it must be made inside the running loop)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self.closed = False

    def session(self) -> aiohttp.ClientSession:
        if self.closed:
            raise _NotSent("closed: canaryd is shutting down")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None), trust_env=False)
        return self._session

    async def aclose(self) -> None:
        self.closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def exchange(self, req: _Request, ep: EndpointConfig, ctx: Mapping[str, Any]) -> HookResult:
        """Send ``req``: connection errors retried per ``ep``; a timeout or an answer ends it."""
        session = self.session()
        start = time.monotonic()
        attempts = ep.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                async with (
                    asyncio.timeout(ep.timeout_s),
                    session.request(
                        req.method,
                        req.url,
                        headers=req.headers,
                        data=req.body,
                        params=req.params,
                        allow_redirects=False,
                    ) as resp,
                ):
                    raw = await _read_limited(resp)
                    status, phrase = resp.status, resp.reason or ""
            except TimeoutError:  # also aiohttp's own ServerTimeoutError
                reason = f"timed out after {ep.timeout_s:g}s"
                return HookResult(False, None, reason, time.monotonic() - start, "timeout")
            except aiohttp.ClientConnectionError as e:
                if attempt < attempts:
                    delay = min(ep.backoff_s * 2 ** (attempt - 1), BACKOFF_CAP_S)
                    log.info("hook_retry", **ctx, attempt=attempt, error=_describe(e), delay_s=delay)
                    await asyncio.sleep(delay)
                    continue
                reason = f"unreachable after {attempts} attempt(s): {_describe(e)}"
                return HookResult(False, None, reason, time.monotonic() - start, "error")
            except aiohttp.ClientError as e:
                return HookResult(False, None, f"request failed: {_describe(e)}", time.monotonic() - start, "error")
            duration = time.monotonic() - start
            reason = _reason(raw, status, phrase)
            if 200 <= status < 300:
                return HookResult(True, status, reason, duration, "ok")
            if 300 <= status < 400:
                reason = f"{reason} (redirects are not followed)"
            return HookResult(False, status, reason, duration, "refused")
        raise AssertionError("unreachable")  # pragma: no cover


def _query(payload: Mapping[str, Any]) -> dict[str, str]:
    """What a GET hook receives instead of the JSON body."""
    keys = ("type", "hook", "namespace", "route", "phase", "step", "canary", "stable", "rollout_id")
    q = {k: str(payload[k]) for k in keys if payload.get(k) is not None}
    weights = payload.get("weights")
    if isinstance(weights, Mapping) and "canary" in weights:
        q["canary_weight"] = str(weights["canary"])
    return q


class HookRunner:
    """Calls the admin's named hooks. One per process (its metrics are registered once on the registry).

    Metrics: ``canaryd_hook_calls_total{name,kind,outcome}``, ``canaryd_hook_duration_seconds{name,kind}``.
    """

    def __init__(self, settings: HooksSettings, *, metrics_registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = metrics_registry if metrics_registry is not None else CollectorRegistry()
        self._calls = Counter(
            "canaryd_hook_calls",
            "Hook calls by outcome (ok, refused, timeout, error)",
            ["name", "kind", "outcome"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "canaryd_hook_duration_seconds",
            "Time of one hook call, retries included",
            ["name", "kind"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._http = _Http()

    async def call(self, name: str, kind: str, payload: Mapping[str, Any]) -> HookResult:
        """Call hook ``name`` for ``kind`` with ``payload`` (see ``build_payload``); never raises
        (but for cancellation). The body's ``hook`` and ``type`` are set to ``name`` and ``kind``.
        The URL is the configured one: nothing in the payload changes it."""
        start = time.monotonic()
        hook = self.settings.hooks.get(name)
        try:
            if hook is None:
                raise _NotSent(f"hook {name!r} is not configured")
            if kind not in hook.kinds:
                raise _NotSent(f"hook {name!r} does not take {kind!r} calls (kinds: {', '.join(hook.kinds)})")
            req = await self._request(hook, kind, {**payload, "hook": name, "type": kind})
            result = await self._http.exchange(req, hook, {"hook": name, "kind": kind})
        except _NotSent as e:
            result = HookResult(False, None, str(e), time.monotonic() - start, "error")
        except Exception as e:
            log.exception("hook_call_crashed", hook=name, kind=kind, error=type(e).__name__)
            result = HookResult(False, None, f"internal error: {type(e).__name__}", time.monotonic() - start, "error")
        self._calls.labels(name, kind, result.outcome).inc()
        self._duration.labels(name, kind).observe(result.duration_s)
        log.info(
            "hook_call",
            hook=name,
            kind=kind,
            namespace=payload.get("namespace"),
            route=payload.get("route"),
            step=payload.get("step"),
            outcome=result.outcome,
            status=result.status,
            reason=result.reason,
            duration_s=round(result.duration_s, 3),
        )
        return result

    @staticmethod
    async def _request(hook: HookConfig, kind: str, payload: Mapping[str, Any]) -> _Request:
        if "rollout_id" not in payload:
            raise _NotSent("payload has no rollout_id")
        headers = {
            **hook.headers,
            **await asyncio.to_thread(_secret_headers, hook),
            "User-Agent": USER_AGENT,
            "Idempotency-Key": f"{payload['rollout_id']}:{kind}:{payload.get('step')}",
        }
        if hook.method == "GET":
            return _Request("GET", hook.url, headers, params=_query(payload))
        headers["Content-Type"] = "application/json"
        body = json.dumps(dict(payload), separators=(",", ":"), ensure_ascii=False).encode()
        return _Request("POST", hook.url, headers, body=body)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> HookRunner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Notifier:
    """Tells the admin's named notifiers about phase transitions. Never raises (but for cancellation):
    a failure is logged (``notification_failed``) and counted in ``canaryd_notifications_total{name,outcome}``.
    """

    def __init__(self, settings: HooksSettings, *, metrics_registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = metrics_registry if metrics_registry is not None else CollectorRegistry()
        self._sent = Counter(
            "canaryd_notifications",
            "Notifications by outcome (ok, refused, timeout, error)",
            ["name", "outcome"],
            registry=self.registry,
        )
        self._http = _Http()
        self._tasks: set[asyncio.Task[dict[str, HookResult]]] = set()

    async def notify(self, payload: Mapping[str, Any], names: Sequence[str] | None = None) -> dict[str, HookResult]:
        """Send a Notification payload (``phase`` = the phase just entered) to the route's notifiers:
        ``names`` from ``parse_route_notify`` (``None`` = ``default_notifiers``, ``[]`` = none), those
        whose ``phases`` list the phase. Concurrently; returns each one's result by name."""
        try:
            chosen = list(self.settings.default_notifiers if names is None else names)
            phase = str(payload.get("phase", ""))
            targets = [
                n for n in chosen if n not in self.settings.notifiers or phase in self.settings.notifiers[n].phases
            ]
            results = await asyncio.gather(*(self._one(n, payload) for n in targets))
            return dict(zip(targets, results, strict=True))
        except Exception as e:  # never raise into the engine
            log.exception("notification_failed", error=type(e).__name__)
            return {}

    def notify_soon(
        self, payload: Mapping[str, Any], names: Sequence[str] | None = None
    ) -> asyncio.Task[dict[str, HookResult]]:
        """``notify`` in the background, so a slow receiver does not hold the rollout; ``aclose`` waits for it."""
        task = asyncio.get_running_loop().create_task(
            self.notify(dict(payload), None if names is None else list(names)), name="canaryd-notify"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _one(self, name: str, payload: Mapping[str, Any]) -> HookResult:
        start = time.monotonic()
        cfg = self.settings.notifiers.get(name)
        try:
            if cfg is None:
                raise _NotSent(f"notifier {name!r} is not configured")
            req = await self._request(name, cfg, payload)
            result = await self._http.exchange(req, cfg, {"notifier": name})
        except _NotSent as e:
            result = HookResult(False, None, str(e), time.monotonic() - start, "error")
        except Exception as e:
            result = HookResult(False, None, f"internal error: {type(e).__name__}", time.monotonic() - start, "error")
        self._sent.labels(name, result.outcome).inc()
        ctx = {"notifier": name, "namespace": payload.get("namespace"), "route": payload.get("route")}
        if result.ok:
            log.debug("notification_sent", **ctx, phase=payload.get("phase"), duration_s=round(result.duration_s, 3))
        else:
            log.warning(
                "notification_failed",
                **ctx,
                phase=payload.get("phase"),
                outcome=result.outcome,
                status=result.status,
                reason=result.reason,
            )
        return result

    @staticmethod
    async def _request(name: str, cfg: NotifierConfig, payload: Mapping[str, Any]) -> _Request:
        doc = {**payload, "hook": name}
        body: Any = slack_message(doc) if cfg.type == "slack" else doc
        url = cfg.url if cfg.url is not None else await asyncio.to_thread(_url_from_file, str(cfg.url_from_file))
        headers = {
            **cfg.headers,
            **await asyncio.to_thread(_secret_headers, cfg),
            "User-Agent": USER_AGENT,
            "Content-Type": "application/json",
            "Idempotency-Key": f"{payload.get('rollout_id')}:{payload.get('phase')}:{payload.get('step')}",
        }
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        return _Request("POST", url, headers, body=data)

    async def aclose(self, grace_s: float = 5.0) -> None:
        """Wait up to ``grace_s`` for background notifications, cancel the rest, close the session."""
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._http.aclose()

    async def __aenter__(self) -> Notifier:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
