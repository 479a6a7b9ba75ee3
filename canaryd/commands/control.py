"""The control CLI: ``canaryd status``, ``promote|abort|pause|resume|retry`` and ``check``.

Reads the cluster like kubectl (``KUBECONFIG``, ``--kubeconfig``, ``--context``, ``-n``, ``-A``,
in-cluster config in a pod). Rendering is ``canaryd.status`` (pure), the preflight is
``canaryd.preflight``; this module fetches, watches, patches the intent annotation and maps
outcomes to exit codes. Every expected failure is a ``CanarydError`` with one line saying what to do.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import shutil
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import yaml

from canaryd import status as render
from canaryd.core import spec as ann
from canaryd.core.admit import admit, is_managed
from canaryd.core.backends import RouteRef
from canaryd.core.decide import Facts, decide, ignored_reason
from canaryd.core.spec import RolloutDefaults
from canaryd.core.state import IntentRecord, Phase, RolloutState, ts
from canaryd.errors import CanarydError, ForbiddenError, KubeError, NotFoundError, RouteError
from canaryd.kube import Api, new_client
from canaryd.kube.api import MERGE_PATCH, kubeconfig_namespace, list_objects, lister, patch_route
from canaryd.kube.api import get_route as _get_route
from canaryd.kube.api import route_events as _route_events
from canaryd.kube.informer import Informer, Key
from canaryd.settings import Settings

T = TypeVar("T")
FIELD_MANAGER = "canaryd-cli"
EXIT_OK, EXIT_FAILED, EXIT_TIMEOUT = 0, 1, 2

STATUS_EPILOG = """examples:
  canaryd status                       # managed routes in the current namespace
  canaryd status -A -o wide            # ... in every namespace, with steps, interval, analysis
  canaryd status -A -l team=shop       # only routes with this label
  canaryd status whoami -n shop        # plan, analysis history, intents and Events of one route
  canaryd status whoami -o json        # the documented schema (docs/status-schema.json)
  canaryd status whoami --watch        # that view, live (redrawn every second on a terminal)
  canaryd status whoami --wait --timeout 600 && echo promoted   # a line per change, for CI logs

exit codes with --wait: 0 Promoted, 1 RolledBack or Failed, 2 timed out.
"""

INTENT_HELP = {
    "promote": "skip the remaining steps: all traffic to the canary now",
    "abort": "roll back now: all traffic to the stable",
    "pause": "hold the current step until 'canaryd resume'",
    "resume": "continue a paused rollout from its current step",
    "retry": "restart a rolled-back or failed rollout from the first step",
}

CHECK_EPILOG = """examples:
  canaryd check whoami -n shop
  canaryd check whoami -n shop --canary whoami-v2 --set steps=10,50,100 --set analysis=envoy   # dry run
  canaryd check whoami -n shop --prometheus-url http://127.0.0.1:9090 -o json
  canaryd check whoami -n shop --kubeconfig canaryd-sa.kubeconfig --lease-namespace canaryd   # as canaryd

checks: the canaryd.io/* annotations, the GAMMA parent and the stable/canary pair, that both
backend Services exist, that the canary has ready EndpointSlices, the RBAC the daemon uses where
it uses it (for the identity of the kubeconfig; the daemon's settings -- CANARYD_NAMESPACES,
CANARYD_LEASE_NAMESPACE, ... -- or the flags below say where), and one analysis round against
Prometheus when analysis is configured (no series for either backend is a problem). --canary and
--set apply annotation values in memory only: nothing is written. Exit code 1 lists every problem.
"""


# --- argparse ---------------------------------------------------------------------------------
def _cluster_args(p: argparse.ArgumentParser, *, all_namespaces: bool = False) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, ~/.kube/config, in-cluster)")
    g.add_argument("--context", help="kubeconfig context (default: the current context)")
    g.add_argument("-n", "--namespace", help="namespace (default: the context's namespace or 'default')")
    if all_namespaces:
        g.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "status",
        help="show rollouts",
        formatter_class=fmt,
        epilog=STATUS_EPILOG,
        description="List the routes canaryd manages, or show one in detail.",
    )
    p.add_argument("route", nargs="?", metavar="ROUTE", help="one HTTPRoute (detail view)")
    _cluster_args(p, all_namespaces=True)
    p.add_argument(
        "-l",
        "--selector",
        metavar="SELECTOR",
        help="only routes whose labels match, e.g. team=shop,tier!=test (a Kubernetes label selector)",
    )
    p.add_argument(
        "-o",
        "--output",
        choices=("table", "wide", "json", "yaml"),
        default="table",
        help="output format; wide adds STEPS, INTERVAL, ANALYSIS and UPDATED to the list",
    )
    p.add_argument(
        "-w",
        "--watch",
        action="store_true",
        help="live view: redrawn every second on a terminal, a new copy per change when piped (a watch, not polling)",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="print a line per change until ROUTE is Promoted (exit 0), RolledBack or Failed (exit 1)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="give up --wait/--watch after S seconds (exit 2 for --wait); default: no limit",
    )
    p.add_argument("--no-color", action="store_true", help="plain output even on a terminal (also NO_COLOR)")
    p.set_defaults(func=_status)

    _register_intents(sub)

    cp = sub.add_parser(
        "check",
        help="preflight a route before rolling out",
        formatter_class=fmt,
        description="Find everything that would stop ROUTE's rollout, without changing anything.",
        epilog=CHECK_EPILOG,
    )
    cp.add_argument("route", metavar="ROUTE", help="the HTTPRoute")
    _cluster_args(cp)
    cp.add_argument(
        "--prometheus-url",
        help="Prometheus for the analysis round (default: CANARYD_PROMETHEUS__URL or the settings file)",
    )
    cp.add_argument("--timeout", type=float, default=30.0, metavar="S", help="limit for the analysis round")
    dry = cp.add_argument_group("dry run (in memory only: nothing is written)")
    dry.add_argument("--canary", metavar="BACKEND", help=f"check as if {ann.CANARY}=BACKEND were set")
    dry.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"check as if the annotation KEY ({ann.PREFIX}KEY, e.g. steps=10,50,100) were VALUE; repeatable",
    )
    daemon = cp.add_argument_group("the daemon's settings (default: its CANARYD_* environment and settings file)")
    daemon.add_argument(
        "--watch-namespaces",
        metavar="NS[,NS...]",
        help="namespaces the daemon watches (CANARYD_NAMESPACES; default: all)",
    )
    daemon.add_argument("--lease-namespace", metavar="NS", help="namespace of its Lease (CANARYD_LEASE_NAMESPACE)")
    daemon.add_argument("--lease-name", metavar="NAME", help="name of its Lease (CANARYD_LEASE_NAME)")
    daemon.add_argument(
        "--no-leader-election", action="store_true", help="it runs without a Lease (CANARYD_LEADER_ELECTION=false)"
    )
    cp.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format")
    cp.add_argument("--no-color", action="store_true", help="plain output even on a terminal")
    cp.set_defaults(func=_check)


INTENT_MORE = {
    "promote": "This is Argo Rollouts' 'promote --full' (--full is accepted as an alias); Argo's plain "
    "'promote' (one step ahead) has no counterpart: "
    "canaryd has no intent that advances a single step; a step advances by itself once its interval "
    f"({ann.INTERVAL}) has passed and, when analysed, its analysis passed.",
    "retry": f"A Promoted rollout is finished: to roll out a new version, point {ann.CANARY} at its backend.",
}


def _register_intents(sub: argparse._SubParsersAction[Any]) -> None:
    for intent in ann.INTENTS:
        settled = intent in ("promote", "abort")
        ip = sub.add_parser(
            intent,
            help=INTENT_HELP[intent],
            formatter_class=argparse.RawDescriptionHelpFormatter,
            description=textwrap.fill(
                f"{INTENT_HELP[intent][0].upper()}{INTENT_HELP[intent][1:]}. Writes the {ann.INTENT}={intent} "
                "annotation; the controller "
                "applies it, removes it and records it in the route's state. An intent the controller would ignore "
                "in the route's current phase is refused, with the reason, and nothing is written. "
                + INTENT_MORE.get(intent, ""),
                width=100,
            ),
            epilog=f"examples:\n  canaryd {intent} whoami -n shop\n  canaryd {intent} whoami -n shop --wait "
            f"--timeout 120\n\nexit codes: 0 written (with --wait: applied"
            + (f" and {'Promoted' if intent == 'promote' else 'RolledBack'}" if settled else "")
            + "), 1 refused (ignored in this phase) or failed, 2 timed out.",
        )
        ip.add_argument("route", metavar="ROUTE", help="the HTTPRoute")
        _cluster_args(ip)
        if intent == "promote":
            ip.add_argument("--full", action="store_true", help="the same as plain promote: straight to 100%%")
        ip.add_argument(
            "--wait",
            action="store_true",
            help="follow until the controller has consumed the intent"
            + (" and the rollout is terminal" if settled else ""),
        )
        ip.add_argument("--timeout", type=float, default=None, metavar="S", help="give up --wait after S seconds")
        ip.set_defaults(func=_intent, intent=intent)


# --- connection --------------------------------------------------------------------------------
def default_namespace(kubeconfig: str | None, context: str | None) -> str:
    return kubeconfig_namespace(kubeconfig, context)


def check_kubeconfig(kubeconfig: str | None) -> None:
    """Refuse a named kubeconfig that does not exist (the client library's own message misleads)."""
    source, path = ("--kubeconfig", kubeconfig) if kubeconfig else ("KUBECONFIG", os.environ.get("KUBECONFIG"))
    if not path:
        return
    files = [p for p in path.split(os.pathsep) if p]
    if files and not any(os.path.exists(p) for p in files):
        raise KubeError(
            f"kubeconfig {path} (from {source}) does not exist; point {source} at your cluster's "
            "kubeconfig, e.g. the one 'canaryd devstack up' writes"
        )


async def _connect(args: argparse.Namespace) -> tuple[Api, str]:
    check_kubeconfig(args.kubeconfig)
    api = await new_client(args.kubeconfig, args.context)
    return api, args.namespace or default_namespace(args.kubeconfig, args.context)


def cli_error(exc: BaseException, what: str, *, ref: RouteRef | None = None) -> CanarydError:
    """The boundary's error, with advice for a person at a terminal rather than for the controller."""
    err = exc if isinstance(exc, CanarydError) else KubeError(f"{what}: {exc!r}")
    if isinstance(err, NotFoundError) and ref is not None:
        return NotFoundError(
            f"httproute {ref.name} not found in namespace {ref.namespace}; check the name and "
            "-n/--namespace ('canaryd status -A' lists every managed route)"
        )
    if isinstance(err, ForbiddenError) and err.status == 403:
        reason = str(err.body.get("message") or err)
        return ForbiddenError(
            f"{what}: forbidden ({reason}); use --kubeconfig/--context with an "
            "identity allowed to do this, or ask a cluster admin to grant it"
        )
    return err


async def get_route(api: Api, ref: RouteRef) -> dict[str, Any]:
    try:
        return await _get_route(api, ref.namespace, ref.name)
    except CanarydError as exc:
        raise cli_error(exc, f"get httproute {ref}", ref=ref) from exc


def require_managed(obj: dict[str, Any], ref: RouteRef) -> None:
    if not is_managed(obj):
        raise RouteError(
            f"httproute {ref} is not managed by canaryd (no {ann.CANARY} annotation); annotate it, "
            f"e.g. kubectl annotate httproute {ref.name} -n {ref.namespace} {ann.CANARY}=<backend>"
        )


async def list_routes(api: Api, namespace: str | None, selector: str | None = None) -> list[dict[str, Any]]:
    try:
        items, _ = await list_objects(api, "httproutes", namespace, label_selector=selector)
    except CanarydError as exc:
        raise cli_error(exc, "list httproutes") from exc
    return items


async def route_events(api: Api, ref: RouteRef) -> list[dict[str, Any]]:
    """core/v1 Events about the route; [] if the caller may not list Events."""
    try:
        return await _route_events(api, ref.namespace, ref.name)
    except ForbiddenError:
        return []


class RouteWatch:
    """HTTPRoutes through the controller's informer (list, then watch, relisting on 410): its cache and a
    wake-up on each change. The CLI's one watch: ``status --watch|--wait`` and the intents' ``--wait``."""

    def __init__(
        self, api: Api, namespace: str | None, *, name: str | None = None, label_selector: str | None = None
    ) -> None:
        self._changed = asyncio.Event()
        fn, fn_args = lister(api, "httproutes", namespace)
        self._informer = Informer(
            "httproutes",
            fn,
            fn_args,
            on_change=lambda _key, _obj: self._changed.set(),
            on_error="raise",
            label_selector=label_selector,
            field_selector=f"metadata.name={name}" if name else None,
        )
        self._task: asyncio.Task[None] | None = None

    @property
    def cache(self) -> dict[Key, dict[str, Any]]:
        return self._informer.cache

    async def __aenter__(self) -> RouteWatch:
        self._task = asyncio.create_task(self._informer.run(), name="watch httproutes")
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def synced(self, timeout: float | None) -> bool:
        """Wait for the first list (False: ``timeout`` passed first)."""
        got = await self._until(self._informer.synced, timeout)
        self._changed.clear()
        return got

    async def changed(self, timeout: float | None) -> bool:
        """Wait for the next change (False: ``timeout`` passed first); a failed watch raises."""
        got = await self._until(self._changed, timeout)
        self._changed.clear()
        return got

    async def _until(self, event: asyncio.Event, timeout: float | None) -> bool:
        assert self._task is not None, "use RouteWatch as 'async with'"
        waiter = asyncio.ensure_future(event.wait())
        try:
            done, _ = await asyncio.wait({waiter, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if self._task in done:
            exc = None if self._task.cancelled() else self._task.exception()
            raise cli_error(exc or KubeError("watch ended"), "watch httproutes")
        return waiter in done


class _Clock:
    """Seconds left of ``--timeout`` (None = no limit), on the loop's monotonic clock."""

    def __init__(self, timeout: float | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._end = None if timeout is None else self._loop.time() + timeout

    def left(self) -> float | None:
        return None if self._end is None else max(0.0, self._end - self._loop.time())

    def wait_s(self, tick: float | None) -> float | None:
        """How long to sleep: until the next tick or the end, whichever is first."""
        left = self.left()
        return tick if left is None else left if tick is None else min(left, tick)

    @property
    def over(self) -> bool:
        left = self.left()
        return left is not None and left <= 0


async def follow(
    api: Api,
    namespace: str | None,
    name: str | None,
    on_change: Callable[[dict[Key, dict[str, Any]]], T | None],
    timeout: float | None,
    *,
    label_selector: str | None = None,
    tick: float | None = None,
) -> T | None:
    """Watch HTTPRoutes; call ``on_change(cache)`` after the first list, after changes and every ``tick``
    seconds, until it returns something other than None (returned) or ``timeout`` passes (None)."""
    clock = _Clock(timeout)
    async with RouteWatch(api, namespace, name=name, label_selector=label_selector) as watch:
        if not await watch.synced(clock.left()):
            return None
        while True:
            out = on_change(watch.cache)
            if out is not None:
                return out
            if clock.over:
                return None
            await watch.changed(clock.wait_s(tick))


# --- status ------------------------------------------------------------------------------------
TICK_S = 1.0  # a live view (on a terminal) is redrawn this often, from the cached route
EVENTS_EVERY_S = 5.0  # ... and re-reads the route's Events this often, or when the route changes


def _use_color(args: argparse.Namespace) -> bool:
    return sys.stdout.isatty() and not args.no_color and not os.environ.get("NO_COLOR")


def dump(doc: dict[str, Any], output: str, *, compact: bool = False) -> str:
    if output == "yaml":
        return str(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    if compact:
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n"
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def _status(args: argparse.Namespace) -> int:
    if args.wait and not args.route:
        raise CanarydError("--wait needs a ROUTE: canaryd status ROUTE --wait")
    if args.route and args.all_namespaces:
        raise CanarydError("a ROUTE is in one namespace: use -n NAMESPACE instead of -A")
    if args.route and args.selector:
        raise CanarydError("-l/--selector filters the list: drop ROUTE, or drop -l to show ROUTE")
    return asyncio.run(_status_async(args))


async def _status_async(args: argparse.Namespace) -> int:
    api, ns = await _connect(args)
    try:
        color = _use_color(args)
        if args.route:
            return await _status_route(api, RouteRef(ns, args.route), args, color)
        return await _status_list(api, None if args.all_namespaces else ns, args, color)
    finally:
        await api.close()


def _now() -> datetime:
    return datetime.now(UTC)


def _emit(text: str, *, redraw: bool) -> None:
    """Write ``text``; ``redraw`` paints it over the previous frame (cursor home, each line cleared to its
    end, the rest of the screen cleared: no flicker), cut to the terminal's width and height."""
    if redraw:
        size = shutil.get_terminal_size()
        lines = [_fit(line, size.columns) for line in text.rstrip("\n").split("\n")]
        if len(lines) >= size.lines:
            keep = max(size.lines - 2, 1)
            lines = [*lines[:keep], f"… {len(lines) - keep} more lines (enlarge the terminal)"]
        text = "\x1b[H" + "".join(line + "\x1b[K\n" for line in lines) + "\x1b[J"
    sys.stdout.write(text)
    sys.stdout.flush()


def _fit(line: str, columns: int) -> str:
    """A line no wider than the terminal (a wrapped line would push the frame off the screen)."""
    plain = render._ANSI.sub("", line)
    return line if len(plain) <= columns else plain[: max(columns - 1, 1)] + "…"


def _live(args: argparse.Namespace) -> bool:
    """A live view: a table on a terminal, redrawn in place every tick (piped: a copy per change)."""
    return args.output in ("table", "wide") and sys.stdout.isatty()


async def _status_list(api: Api, namespace: str | None, args: argparse.Namespace, color: bool) -> int:
    live = _live(args)

    def show(routes: list[dict[str, Any]], watching: bool) -> None:
        if args.output in ("table", "wide"):
            text = render.render_list(routes, _now(), color=color, wide=args.output == "wide")
            _emit(text + ("\n" if watching and not live else ""), redraw=live)
        else:
            _emit(
                dump(render.list_document(routes, _now()), args.output, compact=watching and args.output == "json")
                + ("---\n" if watching and args.output == "yaml" else ""),
                redraw=False,
            )

    if not args.watch:
        show(await list_routes(api, namespace, args.selector), False)
        return EXIT_OK
    last: list[str] = []

    def changed(cache: dict[tuple[str, str], dict[str, Any]]) -> None:
        managed = [o for o in cache.values() if is_managed(o)]
        fingerprint = sorted(
            f"{o['metadata'].get('namespace')}/{o['metadata']['name']}@{o['metadata'].get('resourceVersion')}"
            for o in managed
        )
        if live or fingerprint != last:
            last[:] = fingerprint
            show(managed, True)

    await follow(
        api, namespace, None, changed, args.timeout, label_selector=args.selector, tick=TICK_S if live else None
    )
    return EXIT_OK


def _terminal_code(phase: str) -> int | None:
    if phase == Phase.PROMOTED.value:
        return EXIT_OK
    if phase in (Phase.ROLLED_BACK.value, Phase.FAILED.value):
        return EXIT_FAILED
    return None


async def _status_route(api: Api, ref: RouteRef, args: argparse.Namespace, color: bool) -> int:
    obj = await get_route(api, ref)
    require_managed(obj, ref)
    if args.watch:
        return await _watch_route(api, ref, args, color)
    if args.wait:
        return await _wait_route(api, ref, args)
    events = await route_events(api, ref)
    if args.output in ("table", "wide"):
        _emit(render.render_detail(obj, events, _now(), color=color, defaults=_defaults()), redraw=False)
    else:
        _emit(dump(render.single_document(obj, events, _now()), args.output), redraw=False)
    return EXIT_OK


@functools.cache
def _defaults() -> RolloutDefaults:
    """The rollout defaults as the daemon reads them (CANARYD_*, the settings file), once per process."""
    return Settings().defaults


def _events_key(events: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(str(e["metadata"].get("name")), str(e.get("count")), str(render._event_time(e))) for e in events]


async def _watch_route(api: Api, ref: RouteRef, args: argparse.Namespace, color: bool) -> int:
    """The detail view, live: on a terminal redrawn every tick from the cached route (NEXT, AGE and the
    Events' ages count on), Events re-read when the route changes or every EVENTS_EVERY_S; piped or
    -o json|yaml, one copy per change of the route or its Events. With --wait it ends like --wait."""
    live = _live(args)
    clock = _Clock(args.timeout)
    loop = asyncio.get_running_loop()
    events: list[dict[str, Any]] = []
    read_at, seen_rv, shown = -EVENTS_EVERY_S, "", None
    async with RouteWatch(api, ref.namespace, name=ref.name) as watch:
        if not await watch.synced(clock.left()):
            return _timed_out(ref, args, None) if args.wait else EXIT_OK
        while True:
            cur = watch.cache.get((ref.namespace, ref.name))
            if cur is None:
                raise NotFoundError(f"httproute {ref} was deleted while watching")
            rv = str(cur["metadata"].get("resourceVersion"))
            if rv != seen_rv or loop.time() - read_at >= EVENTS_EVERY_S:
                events, read_at, seen_rv = await route_events(api, ref), loop.time(), rv
            key = (rv, _events_key(events))
            if live or key != shown:
                _draw_route(cur, events, args, color=color, live=live)
            shown = key
            code = _terminal_code(render.RouteStatus.from_route(cur).phase) if args.wait else None
            if code is not None:
                return code
            if clock.over:
                return _timed_out(ref, args, cur) if args.wait else EXIT_OK
            await watch.changed(clock.wait_s(TICK_S if live else EVENTS_EVERY_S))


def _draw_route(
    obj: dict[str, Any], events: list[dict[str, Any]], args: argparse.Namespace, *, color: bool, live: bool
) -> None:
    if live:
        _emit(render.render_watch(obj, events, _now(), color=color, every_s=TICK_S, defaults=_defaults()), redraw=True)
    elif args.output in ("table", "wide"):
        _emit(render.render_detail(obj, events, _now(), color=color, defaults=_defaults()) + "\n", redraw=False)
    else:
        doc = dump(render.single_document(obj, events, _now()), args.output, compact=args.output == "json")
        _emit(doc + ("---\n" if args.output == "yaml" else ""), redraw=False)


async def _wait_route(api: Api, ref: RouteRef, args: argparse.Namespace) -> int:
    """--wait: one line per change of the rollout (for CI logs), then the outcome line and its exit code."""
    last: list[tuple[str, ...]] = []
    seen: list[dict[str, Any]] = []
    table_out = args.output in ("table", "wide")

    def changed(cache: dict[tuple[str, str], dict[str, Any]]) -> int | None:
        cur = cache.get((ref.namespace, ref.name))
        if cur is None:
            raise NotFoundError(f"httproute {ref} was deleted while waiting")
        seen[:] = [cur]
        key = render.progress_key(cur)
        if table_out and last != [key]:
            last[:] = [key]
            _emit(render.progress_line(cur, _now()), redraw=False)
        code = _terminal_code(render.RouteStatus.from_route(cur).phase)
        if code is not None:
            text = (
                render.outcome_line(cur, _now())
                if table_out
                else dump(render.single_document(cur, [], _now()), args.output)
            )
            _emit(text, redraw=False)
        return code

    got = await follow(api, ref.namespace, ref.name, changed, args.timeout)
    return _timed_out(ref, args, seen[0] if seen else None) if got is None else got


def _timed_out(ref: RouteRef, args: argparse.Namespace, route: dict[str, Any] | None) -> int:
    phase = "not read yet" if route is None else render.RouteStatus.from_route(route).phase
    print(f"timed out after {args.timeout:g}s waiting for httproute {ref} to finish (phase {phase})", file=sys.stderr)
    return EXIT_TIMEOUT


# --- intents -----------------------------------------------------------------------------------
class _AssumeReady:
    """Predictions are about the intent, not the endpoints: every backend counts as present and ready."""

    def service_exists(self, namespace: str, name: str) -> bool:
        return True

    def service_ready(self, namespace: str, name: str) -> bool:
        return True


@dataclass(frozen=True)
class Prediction:
    """What the controller will do with an intent: ``applies`` False = it would be ignored (so refused)."""

    applies: bool
    text: str


def predict(intent: str, obj: dict[str, Any], defaults: RolloutDefaults, now: datetime) -> Prediction:
    """What the controller will do with ``intent``: ``decide()`` itself, run on the route as annotated."""
    meta = obj["metadata"]
    annotated = {**obj, "metadata": {**meta, "annotations": {**(meta.get("annotations") or {}), ann.INTENT: intent}}}
    f = admit(annotated, _AssumeReady(), defaults, now).facts
    if f.intent is None:
        return Prediction(False, "the controller cannot read the intent and would ignore it")
    if f.error is not None:
        return Prediction(
            False,
            f"the route cannot be rolled out as annotated ({f.error}); the controller removes intents without "
            "applying them until that is fixed ('canaryd check' lists every problem)",
        )
    d = decide(f)
    new = d.state or f.state
    pending = [] if f.state is not None else ["the controller has not started this rollout yet; when it does"]
    why = _ignored(f, new, intent, now)
    if why is not None:
        finished = intent == "retry" and f.state is not None and f.state.phase == Phase.PROMOTED
        more = f" {INTENT_MORE['retry']}" if finished else ""
        text = f"{why}: the controller would record the intent as ignored and change nothing.{more}"
        return Prediction(False, ", ".join([*pending, text]))
    parts = pending
    if new is not None and d.canary_pct is not None:
        parts.append(f"weights become {new.stable} {100 - d.canary_pct} → {new.canary} {d.canary_pct}")
    if new is not None:
        parts.append(
            f"phase becomes {new.phase.value}"
            + (f" at step {new.step + 1}/{len(new.steps)}" if new.steps and new.step >= 0 else "")
        )
    return Prediction(True, "; ".join(parts))


def _ignored(f: Facts, new: RolloutState | None, intent: str, now: datetime) -> str | None:
    """Why decide() ignored ``intent``, from the record it wrote (None: applied)."""
    rec = next((r for r in reversed(new.intents) if r.intent == intent and r.at == ts(now)), None) if new else None
    if rec is not None:
        return None if rec.result == "applied" else rec.result.removeprefix("ignored: ")
    # A decision that only asks for analysis carries no state: then the rule decide()'s guard applies.
    assert f.intent is not None
    return ignored_reason(f.intent, f.state.phase if f.state else Phase.PROGRESSING)


def _intent(args: argparse.Namespace) -> int:
    return asyncio.run(_intent_async(args))


async def _intent_async(args: argparse.Namespace) -> int:
    api, ns = await _connect(args)
    try:
        return await _apply_intent(api, RouteRef(ns, args.route), args.intent, args.wait, args.timeout)
    finally:
        await api.close()


async def _apply_intent(api: Api, ref: RouteRef, intent: str, wait: bool, timeout: float | None) -> int:
    """Read, predict with decide(), refuse what would be ignored, else patch the intent (and follow it)."""
    obj = await get_route(api, ref)
    a: dict[str, str] = obj["metadata"].get("annotations") or {}
    if ann.CANARY not in a:
        require_managed({"metadata": {"annotations": {}}}, ref)
    rs = render.RouteStatus.from_route(obj)
    if rs.state_error:
        raise CanarydError(f"httproute {ref}: {rs.state_error}")
    before: tuple[IntentRecord, ...] = rs.state.intents if rs.state else ()
    outcome = predict(intent, obj, _defaults(), _now())
    if not outcome.applies:
        raise CanarydError(f"{intent} httproute {ref} refused, nothing written: {outcome.text.strip()}")
    if rs.pending_intent:
        print(f"replacing the pending intent {rs.pending_intent!r} (not yet applied)")
    print(f"{intent} httproute {ref}: {outcome.text}")
    try:  # a merge patch of metadata.annotations only: nothing else of the route is sent
        await patch_route(
            api,
            ref.namespace,
            ref.name,
            {"metadata": {"annotations": {ann.INTENT: intent}}},
            field_manager=FIELD_MANAGER,
            content_type=MERGE_PATCH,
        )
    except CanarydError as exc:
        raise cli_error(exc, f"patch httproute {ref}", ref=ref) from exc
    print(f"annotated {ann.INTENT}={intent}; the controller applies it on its next reconcile")
    if not wait:
        return EXIT_OK
    got = await follow(api, ref.namespace, ref.name, lambda cache: _consumed(cache, ref, intent, before), timeout)
    if got is None:
        print(
            f"timed out after {timeout:g}s: the intent is still pending on httproute {ref}; is the canaryd "
            "controller running?",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    code, text = got
    print(text, file=sys.stdout if code == EXIT_OK else sys.stderr)
    return code


def _consumed(
    cache: dict[Key, dict[str, Any]], ref: RouteRef, intent: str, before: tuple[IntentRecord, ...]
) -> tuple[int, str] | None:
    """The outcome once the controller has consumed ``intent`` (None: still pending)."""
    cur = cache.get((ref.namespace, ref.name))
    if cur is None:
        return EXIT_FAILED, f"httproute {ref} was deleted"
    now = render.RouteStatus.from_route(cur)
    if now.pending_intent == intent:
        return None
    if now.pending_intent is not None:
        return EXIT_FAILED, f"the intent was replaced by {now.pending_intent!r} before the controller applied it"
    st = now.state
    new = [r for r in (st.intents if st else ()) if r not in before and r.intent == intent]
    if st is None or not new:
        return EXIT_FAILED, (
            f"the controller removed the intent without applying it (phase {now.phase}: {render.message_of(now)})"
        )
    result = new[-1].result
    if intent in ("promote", "abort"):
        want = Phase.PROMOTED if intent == "promote" else Phase.ROLLED_BACK
        code = EXIT_OK if st.phase == want else EXIT_FAILED
        return code, f"{intent}: {result}; phase {st.phase.value}: {st.message}"
    return (EXIT_OK if result == "applied" else EXIT_FAILED), f"{intent}: {result}; phase {st.phase.value}"


# --- check -------------------------------------------------------------------------------------
def _check(args: argparse.Namespace) -> int:
    from canaryd import logs

    # Logs (the analyzer's, the clients') go to stderr: stdout is the report, -o json parses.
    logs.configure("auto", "debug" if getattr(args, "debug", False) else "error")
    settings = _check_settings(args)
    dry_run = _dry_run(args)
    return asyncio.run(_check_async(args, settings, dry_run))


def _check_settings(args: argparse.Namespace) -> Settings:
    """The daemon's settings (its environment, its settings file), with what the flags say instead."""
    overrides: dict[str, Any] = {}
    if args.watch_namespaces is not None:
        overrides["namespaces"] = [n.strip() for n in args.watch_namespaces.split(",") if n.strip()]
    if args.lease_namespace:
        overrides["lease_namespace"] = args.lease_namespace
    if args.lease_name:
        overrides["lease_name"] = args.lease_name
    if args.no_leader_election:
        overrides["leader_election"] = False
    return Settings(**overrides)


def _dry_run(args: argparse.Namespace) -> dict[str, str] | None:
    """``--canary`` and ``--set KEY=VALUE`` as full annotation keys; None when neither is given."""
    values: dict[str, str] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CanarydError(f"--set {item!r}: expected KEY=VALUE, e.g. --set steps=10,50,100")
        full = key if key.startswith(ann.PREFIX) else ann.PREFIX + key
        if full in (ann.STATE, ann.INTENT):
            raise CanarydError(f"--set {key}: {full} is written by canaryd and its CLI, not a rollout setting")
        values[full] = value
    if args.canary is not None:
        values[ann.CANARY] = args.canary
    return values or None


def format_report(report: Any, color: bool) -> str:
    from canaryd.preflight import Report

    assert isinstance(report, Report)
    ok_mark = "\x1b[32m✓\x1b[0m" if color else "ok  "
    bad_mark = "\x1b[31m✗\x1b[0m" if color else "FAIL"
    title = f"check httproute {report.route}"
    if report.dry_run is not None:
        title += " (dry run, nothing written: " + ", ".join(f"{k}={v}" for k, v in report.dry_run.items()) + ")"
    lines = [title]
    lines += [f"  {ok_mark if f.ok else bad_mark} {f.check}: {f.message}" for f in report.findings]
    if report.judgements:
        lines.append(f"analysis now (Prometheus {report.prometheus_url}):")
        lines += [
            f"  {j.signal}: {_stats('canary', j.canary)}; {_stats('stable', j.stable)} "
            f"-> judge: {j.verdict.value} ({j.reason})"
            for j in report.judgements
        ]
    problems = report.problems
    if problems:
        lines.append(f"{len(problems)} problem{'s' if len(problems) != 1 else ''}:")
        lines += [f"  {i}. {f.check}: {f.message}" for i, f in enumerate(problems, 1)]
    else:
        lines.append("no problems found: ready to roll out")
    return "\n".join(lines) + "\n"


def _stats(who: str, s: Any) -> str:
    if s is None:
        return f"{who} -"
    rate = "-" if s.success_rate is None else f"{s.success_rate:.3f}".rstrip("0").rstrip(".") + "%"
    lat = "" if s.latency_ms is None else f", {s.latency_ms:.1f}ms"
    return f"{who} {round(s.requests):,} req, {rate} success{lat}"


async def _check_async(args: argparse.Namespace, settings: Settings, dry_run: dict[str, str] | None) -> int:
    from canaryd.preflight import preflight

    api, ns = await _connect(args)
    try:
        ref = RouteRef(ns, args.route)
        try:
            report = await preflight(
                api,
                ref,
                settings=settings,
                now=_now(),
                prometheus_url=args.prometheus_url,
                timeout_s=args.timeout,
                dry_run=dry_run,
            )
        except CanarydError:
            raise
        except Exception as exc:
            raise cli_error(exc, f"check httproute {ref}", ref=ref) from exc
        if args.output == "json":
            sys.stdout.write(dump(report.document(), "json"))
        else:
            sys.stdout.write(format_report(report, _use_color(args)))
        return EXIT_FAILED if report.problems else EXIT_OK
    finally:
        await api.close()
