"""``canaryd run``: the controller daemon."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from typing import Any

import structlog

from canaryd.errors import CanarydError
from canaryd.settings import Settings


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "run",
        help="run the controller",
        description="Watch annotated HTTPRoutes and step their weights. Settings come from CANARYD_* "
        "environment variables and the YAML file in CANARYD_CONFIG_FILE (see config/canaryd.yaml).",
        epilog="example:\n  CANARYD_PROMETHEUS__URL=http://127.0.0.1:9090 canaryd run --kubeconfig ~/.kube/config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, ~/.kube/config, in-cluster)")
    p.add_argument("--context", help="kubeconfig context")
    p.add_argument("--no-leader-election", action="store_true", help="act without a Lease (single replica)")
    p.add_argument("--http-port", type=int, help="port for /metrics, /healthz, /readyz")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.kubeconfig:
        overrides["kubeconfig"] = args.kubeconfig
    if args.context:
        overrides["context"] = args.context
    if args.no_leader_election:
        overrides["leader_election"] = False
    if args.http_port is not None:
        overrides["http_port"] = args.http_port
    settings = Settings(**overrides)
    return asyncio.run(run_daemon(settings))


async def run_daemon(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT (0) or until a root task ends (1). Start-up failures that a person
    must fix (a bad kubeconfig, a busy --http-port) raise ``CanarydError``: one ``error:`` line."""
    from canaryd import logs
    from canaryd.kube import new_client

    logs.configure(settings.log_format, settings.log_level)
    api = await new_client(settings.kubeconfig, settings.context)
    stack = contextlib.AsyncExitStack()  # what was opened, closed in reverse order however we leave
    stack.push_async_callback(api.close)
    try:
        return await _serve_and_run(api, settings, stack)
    finally:
        await stack.aclose()


async def _serve_and_run(api: Any, settings: Settings, stack: contextlib.AsyncExitStack) -> int:
    from canaryd.engine import Engine
    from canaryd.kube.leader import LeaderElector
    from canaryd.observability import Metrics, serve

    log = structlog.get_logger("canaryd")
    metrics = Metrics.create()
    analyzer = _analyzer(settings)
    stack.push_async_callback(_close_quietly, analyzer)
    elector = (
        LeaderElector(
            api,
            name=settings.lease_name,
            namespace=settings.lease_namespace,
            identity=settings.identity,
            duration_s=settings.lease_duration_s,
            renew_s=settings.lease_renew_s,
            on_change=lambda leading: metrics.leader.set(1 if leading else 0),
        )
        if settings.leader_election
        else None
    )
    engine = Engine(
        api,
        settings,
        analyzer=analyzer,
        metrics=metrics,
        is_leader=(lambda: elector.is_leader) if elector else (lambda: True),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    where = f"{settings.http_host}:{settings.http_port}"
    try:
        runner = await serve(
            metrics,
            settings.http_host,
            settings.http_port,
            ready=lambda: engine.synced or (elector is not None and not elector.is_leader),
        )
    except OSError as exc:
        why = os.strerror(exc.errno).lower() if exc.errno else str(exc)  # not asyncio's "error while attempting..."
        raise CanarydError(
            f"cannot serve /metrics, /healthz and /readyz on {where}: {why}; "
            "pick a free port with --http-port or CANARYD_HTTP_PORT"
        ) from exc
    stack.push_async_callback(runner.cleanup)
    log.info(
        "started",
        identity=settings.identity,
        http_port=settings.http_port,
        leader_election=settings.leader_election,
        namespaces=settings.namespaces or "all",
    )
    rc = 0
    tasks: list[asyncio.Task[Any]] = []
    try:
        if elector is not None:
            tasks.append(asyncio.create_task(elector.run(), name="leader"))
            waiter = asyncio.create_task(elector.elected.wait())
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if stop.is_set():
                return 0
            metrics.leader.set(1)
        engine_task = asyncio.create_task(engine.run(), name="engine")
        tasks.append(engine_task)
        rc = await _supervise([t for t in tasks if t is engine_task or t.get_name() == "leader"], stop)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        metrics.leader.set(0)
        if elector is not None:
            await elector.release()
        log.info("stopped", rc=rc)
    return rc


async def _close_quietly(analyzer: Any) -> None:
    with contextlib.suppress(Exception):
        await analyzer.aclose()


async def _supervise(roots: list[asyncio.Task[Any]], stop: asyncio.Event) -> int:
    """Wait for shutdown; a root task must run until then: if one ends, say which and why, and return 1."""
    log = structlog.get_logger("canaryd")
    watch = [asyncio.create_task(stop.wait(), name="stop")]
    done, _pending = await asyncio.wait({*roots, *watch}, return_when=asyncio.FIRST_COMPLETED)
    for t in watch:
        t.cancel()
    ended = [t for t in roots if t in done]
    for t in ended:
        exc = None if t.cancelled() else t.exception()
        log.error("root_task_ended", task=t.get_name(), error=repr(exc) if exc else "returned", exc_info=exc)
    return 1 if ended else 0


def _analyzer(settings: Settings) -> Any:
    from canaryd.metrics import PrometheusAnalyzer

    return PrometheusAnalyzer(settings.prometheus)
