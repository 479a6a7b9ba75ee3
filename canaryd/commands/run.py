"""``canaryd run``: the controller daemon."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
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
    p.add_argument(
        "--shards",
        type=int,
        metavar="N",
        help="split the routes into N shards, one Lease each; run N or more replicas with the same N (CANARYD_SHARDS)",
    )
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
    if args.shards is not None:
        overrides["shards"] = args.shards
    settings = Settings(**overrides)
    if settings.shards > 1 and not settings.leader_election:
        raise CanarydError(
            f"--shards {settings.shards} needs leader election (one Lease per shard decides who drives which "
            "routes); drop --no-leader-election, or run one replica without --shards"
        )
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
    from canaryd.observability import Metrics, serve

    log = structlog.get_logger("canaryd")
    metrics = Metrics.create()
    analyzer = _analyzer(settings)
    stack.push_async_callback(_close_quietly, analyzer)
    election = _election(api, settings, metrics, lambda: engine)
    engine = Engine(
        api,
        settings,
        analyzer=analyzer,
        metrics=metrics,
        owns=election.owns if election else (lambda namespace, name: True),
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
            ready=lambda: engine.synced or (election is not None and not election.held()),
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
        shards=settings.shards,
        own_shard=election.preferred if election else None,
        namespaces=settings.namespaces or "all",
    )
    rc = 0
    tasks: list[asyncio.Task[Any]] = []
    try:
        if election is not None:
            tasks.append(asyncio.create_task(election.run(), name="leader"))
            waiter = asyncio.create_task(election.elected.wait())
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if stop.is_set():
                return 0
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
        if election is not None:
            await election.release()
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


def _election(api: Any, settings: Settings, metrics: Any, engine: Callable[[], Any]) -> Any:
    """The Leases: one (``lease_name``) or one per shard; None without leader election. ``canaryd_leader``
    counts the shards held (0/1 without shards); a shard gained or lost makes the engine reassess its
    routes at once (``engine`` is looked up late: it is built with this election's ``owns``)."""
    from canaryd.kube.leader import ShardElection

    if not settings.leader_election:
        return None

    def changed(_shard: int, _leading: bool) -> None:
        metrics.leader.set(len(election.held()))
        engine().reassess()

    election = ShardElection(
        api,
        base_name=settings.lease_name,
        namespace=settings.lease_namespace,
        identity=settings.identity,
        shards=settings.shards,
        duration_s=settings.lease_duration_s,
        renew_s=settings.lease_renew_s,
        on_change=changed,
    )
    return election


def _analyzer(settings: Settings) -> Any:
    from canaryd.metrics import PrometheusAnalyzer

    return PrometheusAnalyzer(settings.prometheus)
