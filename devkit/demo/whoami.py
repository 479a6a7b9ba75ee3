"""A traefik/whoami look-alike: answers who it is, with optional injected errors and latency.

``GET /`` (any path but the ones below) answers text like traefik/whoami::

    Name: v1
    Hostname: myhost
    IP: 127.0.0.1
    RemoteAddr: 127.0.0.1:52144
    GET / HTTP/1.1
    Host: 127.0.0.1:8080
    ...request headers...

``GET /api`` answers the same as JSON, ``GET /health`` answers 200 (never an injected error).
Every answer carries ``x-whoami-name: <name>``.

Errors are deterministic: with ``error_ratio`` r, request n (counting from 1) fails with 500 when
``floor(n*r) > floor((n-1)*r)`` — exactly ``floor(N*r)`` errors in N requests, evenly spread.

Run as ``python -m devkit.demo.whoami --name v1 --port 0``; it prints one JSON line
``{"event": "whoami_ready", "name": "v1", "port": 41234, "url": "http://127.0.0.1:41234"}`` on
stdout once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import signal
import socket
import sys
from dataclasses import dataclass

import structlog
from aiohttp import web

log = structlog.get_logger("devkit.demo.whoami")

NAME_HEADER = "x-whoami-name"
_NOT_COUNTED = ("/health",)


@dataclass(frozen=True)
class WhoamiConfig:
    name: str
    error_ratio: float = 0.0  # fraction of requests answered with 500, 0..1
    latency_ms: float = 0.0  # added to every answer
    error_status: int = 500

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


def _local_ips(request: web.Request) -> list[str]:
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    return [str(sock[0])] if sock else []


def make_app(cfg: WhoamiConfig) -> web.Application:
    """The aiohttp application; one ErrorSchedule per app (requests are counted per process)."""
    schedule = ErrorSchedule(cfg.error_ratio)
    hostname = socket.gethostname()

    def describe(request: web.Request) -> dict[str, object]:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        return {
            "name": cfg.name,
            "hostname": hostname,
            "ip": _local_ips(request),
            "remoteAddr": f"{peer[0]}:{peer[1]}" if peer else "",
            "method": request.method,
            "url": request.path_qs,
            "proto": f"HTTP/{request.version.major}.{request.version.minor}",
            "host": request.host,
            "headers": {k: v for k, v in request.headers.items()},
        }

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path in _NOT_COUNTED:
            return web.Response(text="OK\n", headers={NAME_HEADER: cfg.name})
        if cfg.latency_ms > 0:
            await asyncio.sleep(cfg.latency_ms / 1000.0)
        await request.read()  # drain the body so keep-alive connections stay usable
        status = cfg.error_status if schedule.next_is_error() else 200
        info = describe(request)
        headers = {NAME_HEADER: cfg.name}
        if request.path == "/api":
            return web.json_response(info, status=status, headers=headers)
        lines = [
            f"Name: {info['name']}",
            f"Hostname: {info['hostname']}",
            *(f"IP: {ip}" for ip in _local_ips(request)),
            f"RemoteAddr: {info['remoteAddr']}",
            f"{info['method']} {info['url']} {info['proto']}",
            f"Host: {info['host']}",
            *(f"{k}: {v}" for k, v in request.headers.items() if k.lower() != "host"),
        ]
        return web.Response(text="\n".join(lines) + "\n", status=status, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


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


async def serve_until_signalled(server: Whoami) -> None:
    """Start, print the ready line, run until SIGINT/SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(
        json.dumps({"event": "whoami_ready", "name": server.cfg.name, "port": server.port, "url": server.url}),
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await server.stop()


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
    p.add_argument("--name", required=True, help="the version this instance answers as, e.g. v1")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = a free port (printed in the ready line)")
    p.add_argument("--error-ratio", type=float, default=0.0, help="fraction of 500s, 0..1 (deterministic)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="latency added to every answer")
    args = p.parse_args(argv)
    configure_logging()
    try:
        cfg = WhoamiConfig(name=args.name, error_ratio=args.error_ratio, latency_ms=args.latency_ms)
    except ValueError as exc:
        p.error(str(exc))
    asyncio.run(serve_until_signalled(Whoami(cfg, host=args.host, port=args.port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
