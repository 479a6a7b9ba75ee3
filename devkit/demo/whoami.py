"""A traefik/whoami look-alike: answers who it is, with optional injected errors and latency.

``GET /`` (any path but the ones below) answers what traefik/whoami's ``whoamiHandler`` writes
(traefik/whoami ``app.go``): ``Name: <name>`` (only when a name is set), ``Hostname:``, one
``IP:`` line per address, ``RemoteAddr:`` (LF-terminated lines), then the request as Go's
``Request.Write`` puts it on the wire — CRLF lines: ``GET /path?q HTTP/1.1``, ``Host:``,
``User-Agent:`` (``Go-http-client/1.1`` when the request had none), ``Content-Length:`` /
``Transfer-Encoding:`` when there is a body, the other headers under their canonical names
(``Dapr-Caller-App-Id``) sorted by name, an empty line and the body::

    Name: v1
    Hostname: whoami-v1-7d9c5b8f6d-x2x4k
    IP: 127.0.0.1
    IP: ::1
    IP: 10.244.0.5
    RemoteAddr: 127.0.0.1:52144
    GET /whoami HTTP/1.1
    Host: 127.0.0.1:3500
    User-Agent: curl/8.5.0
    Accept: */*
    Dapr-Callee-App-Id: whoami
    Dapr-Caller-App-Id: ingress

``GET /api`` answers traefik's JSON (``hostname``, ``ip``, ``headers`` as lists, ``url``, ``host``,
``method``, ``name``, ``remoteAddr``; empty ones left out), ``GET /health`` answers 200 with an
empty body (never an injected error). Every answer carries ``x-whoami-name: <name>``.

Hostname and IPs are this host's (the listening socket's address) unless given: the pod runner
(``devkit.demo.podrunner``) passes the Pod's name and IP, so the process answers as the Pod.

Errors are deterministic: with ``error_ratio`` r, request n (counting from 1) fails with 500 when
``floor(n*r) > floor((n-1)*r)`` — exactly ``floor(N*r)`` errors in N requests, evenly spread.

Run as ``python -m devkit.demo.whoami --name v1 --port 0 [--hostname H] [--ip A ...]
[--exit-with-parent]`` (exit when stdin ends: the parent holds the pipe); it prints one JSON
line ``{"event": "whoami_ready", "name": "v1", "port": 41234, "url": "http://127.0.0.1:41234"}``
on stdout once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import structlog
from aiohttp import web
from multidict import CIMultiDictProxy

log = structlog.get_logger("devkit.demo.whoami")

NAME_HEADER = "x-whoami-name"
GO_USER_AGENT = "Go-http-client/1.1"
_NOT_COUNTED = ("/health",)
# Go's Request.Write writes these itself (or never), not from the header map.
_WRITTEN_APART = frozenset({"host", "user-agent", "content-length", "transfer-encoding", "trailer"})
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_GO_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


@dataclass(frozen=True)
class WhoamiConfig:
    name: str
    error_ratio: float = 0.0  # fraction of requests answered with 500, 0..1
    latency_ms: float = 0.0  # added to every answer
    error_status: int = 500
    hostname: str | None = None  # None: this host's name
    ips: tuple[str, ...] = ()  # empty: the address the request came in on

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_ratio <= 1.0:
            raise ValueError(f"error_ratio must be within 0..1, got {self.error_ratio}")
        if self.latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {self.latency_ms}")


class ErrorSchedule:
    """Deterministic error injection: exactly floor(n*ratio) errors in the first n requests."""

    def __init__(self, ratio: float) -> None:
        self._ratio = ratio
        self._n = 0

    def next_is_error(self) -> bool:
        self._n += 1
        return math.floor(self._n * self._ratio) > math.floor((self._n - 1) * self._ratio)


# --------------------------------------------------------------------------- traefik's output (pure)


def canonical_header_key(key: str) -> str:
    """Go's textproto.CanonicalMIMEHeaderKey: ``dapr-caller-app-id`` -> ``Dapr-Caller-App-Id``."""
    if not key or any(c not in _TOKEN for c in key):
        return key
    return "-".join(part[:1].upper() + part[1:].lower() for part in key.split("-"))


def header_map(headers: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Go's http.Header of a server request: canonical keys, values in order, no Host."""
    out: dict[str, list[str]] = {}
    for k, v in headers:
        if k.lower() != "host":
            out.setdefault(canonical_header_key(k), []).append(v)
    return out


def _clean(value: str) -> str:
    return value.replace("\n", " ").replace("\r", " ").strip(" \t")


def request_wire(
    method: str, uri: str, host: str, headers: dict[str, list[str]], body: bytes, *, chunked: bool
) -> bytes:
    """What Go's ``Request.Write`` writes for a server request."""
    lines = [f"{method or 'GET'} {uri or '/'} HTTP/1.1", f"Host: {host}"]
    agent = _clean(headers["User-Agent"][0]) if "User-Agent" in headers else GO_USER_AGENT
    if agent:
        lines.append(f"User-Agent: {agent}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif body or method not in ("GET", "HEAD", ""):
        lines.append(f"Content-Length: {len(body)}")
    for key in sorted(headers):
        if key.lower() not in _WRITTEN_APART:
            lines.extend(f"{key}: {_clean(v)}" for v in headers[key])
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    if chunked:
        body = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    return head + body


def whoami_text(*, name: str, hostname: str, ips: Iterable[str], remote_addr: str, wire: bytes) -> bytes:
    """traefik/whoami's whoamiHandler output."""
    lines = [f"Name: {name}"] if name else []
    lines += [f"Hostname: {hostname}", *(f"IP: {ip}" for ip in ips), f"RemoteAddr: {remote_addr}"]
    return ("\n".join(lines) + "\n").encode() + wire


def whoami_json(info: dict[str, object]) -> str:
    """traefik/whoami's /api: Go's json.Encoder (compact, HTML-escaped, newline) of its Data struct."""
    order = ("hostname", "ip", "headers", "url", "host", "method", "name", "remoteAddr")
    data = {k: info[k] for k in order if info.get(k)}
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), sort_keys=False)
    for ch, esc in _GO_JSON_ESCAPES.items():
        text = text.replace(ch, esc)
    return text + "\n"


def go_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- the server


def _peer(request: web.Request, key: str) -> tuple[str, int] | None:
    info = request.transport.get_extra_info(key) if request.transport else None
    return (str(info[0]), int(info[1])) if info else None


def make_app(cfg: WhoamiConfig) -> web.Application:
    """The aiohttp application; one ErrorSchedule per app (requests are counted per process)."""
    schedule = ErrorSchedule(cfg.error_ratio)
    hostname = cfg.hostname or socket.gethostname()

    def describe(request: web.Request) -> dict[str, object]:
        peer, sock = _peer(request, "peername"), _peer(request, "sockname")
        return {
            "hostname": hostname,
            "ip": list(cfg.ips) or ([sock[0]] if sock else []),
            "headers": dict(sorted(header_map(request.headers.items()).items())),
            "url": request.raw_path or "/",
            "host": request.host,
            "method": request.method,
            "name": cfg.name,
            "remoteAddr": go_host_port(*peer) if peer else "",
        }

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = {NAME_HEADER: cfg.name}
        if request.path in _NOT_COUNTED:
            return web.Response(body=b"", headers=headers)
        if cfg.latency_ms > 0:
            await asyncio.sleep(cfg.latency_ms / 1000.0)
        body = await request.read()  # drain the body so keep-alive connections stay usable
        status = cfg.error_status if schedule.next_is_error() else 200
        info = describe(request)
        if request.path == "/api":
            return web.Response(text=whoami_json(info), status=status, content_type="application/json", headers=headers)
        wire = request_wire(
            request.method,
            request.raw_path,
            request.host,
            header_map(request.headers.items()),
            body,
            chunked=_chunked(request.headers),
        )
        text = whoami_text(
            name=cfg.name,
            hostname=hostname,
            ips=info["ip"],  # type: ignore[arg-type]
            remote_addr=str(info["remoteAddr"]),
            wire=wire,
        )
        return web.Response(body=text, status=status, content_type="text/plain", charset="utf-8", headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def _chunked(headers: CIMultiDictProxy[str]) -> bool:
    return "chunked" in headers.get("Transfer-Encoding", "").lower()


class Whoami:
    """One whoami server on 127.0.0.1 (port 0 = a free port, read ``.port`` after ``start()``)."""

    def __init__(self, cfg: WhoamiConfig, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.cfg = cfg
        self.host = host
        self._want_port = port
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        runner = web.AppRunner(make_app(self.cfg), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._want_port, reuse_address=True)
        await site.start()
        self._runner = runner
        self.port = _bound_port(runner)
        log.info(
            "whoami_started",
            name=self.cfg.name,
            port=self.port,
            error_ratio=self.cfg.error_ratio,
            latency_ms=self.cfg.latency_ms,
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Whoami:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _bound_port(runner: web.BaseRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    raise RuntimeError("server is not listening on a TCP port")


async def serve_until_signalled(server: Whoami, *, exit_with_parent: bool = False) -> None:
    """Start, print the ready line, run until SIGINT/SIGTERM (or, with ``exit_with_parent``, until
    stdin ends: the process that started this one holds the pipe and is gone)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    watch = asyncio.create_task(_parent_gone(stop)) if exit_with_parent else None
    await server.start()
    print(
        json.dumps({"event": "whoami_ready", "name": server.cfg.name, "port": server.port, "url": server.url}),
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        if watch is not None:
            watch.cancel()
        await server.stop()


async def _parent_gone(stop: asyncio.Event) -> None:
    """Until stdin ends: the parent holds the other end of the pipe, so EOF means it is gone."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass
    log.info("whoami_parent_gone")
    stop.set()


def configure_logging(level: int = logging.INFO) -> None:
    """structlog to stderr, JSON unless on a TTY (stdout is reserved for the ready line)."""
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if sys.stderr.isatty() else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devkit.demo.whoami", description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "--name", default=os.environ.get("WHOAMI_NAME", ""), help="the version this instance answers as, e.g. v1"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = a free port (printed in the ready line)")
    p.add_argument("--error-ratio", type=float, default=0.0, help="fraction of 500s, 0..1 (deterministic)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="latency added to every answer")
    p.add_argument("--hostname", default=None, help="the Hostname to answer with (default: this host's)")
    p.add_argument(
        "--ip", action="append", default=[], help="an IP to answer with (repeatable; default: the listening address)"
    )
    p.add_argument("--exit-with-parent", action="store_true", help="exit when stdin ends (the parent holds the pipe)")
    args = p.parse_args(argv)
    configure_logging()
    try:
        cfg = WhoamiConfig(
            name=args.name,
            error_ratio=args.error_ratio,
            latency_ms=args.latency_ms,
            hostname=args.hostname,
            ips=tuple(args.ip),
        )
    except ValueError as exc:
        p.error(str(exc))
    server = Whoami(cfg, host=args.host, port=args.port)
    asyncio.run(serve_until_signalled(server, exit_with_parent=args.exit_with_parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
