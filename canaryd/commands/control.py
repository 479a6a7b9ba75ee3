"""The control CLI: ``canaryd status``, ``promote|abort|pause|resume|retry`` and ``check``.

Reads the cluster like kubectl (``KUBECONFIG``, ``--kubeconfig``, ``--context``, ``-n``, ``-A``,
in-cluster config in a pod). Rendering is ``canaryd.status`` (pure), the preflight is
``canaryd.preflight``; this module fetches, watches, patches the intent annotation and maps
outcomes to exit codes. Every expected failure is a ``CanarydError`` with one line saying what to do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import yaml

from canaryd import status as render
from canaryd.core import spec as ann
from canaryd.core.admit import admit, is_managed
from canaryd.core.backends import RouteRef
from canaryd.core.decide import decide, ignored_reason
from canaryd.core.spec import RolloutDefaults
from canaryd.core.state import IntentRecord, Phase
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
  canaryd status -A                    # ... in every namespace
  canaryd status whoami -n shop        # plan, analysis history, intents and Events of one route
  canaryd status whoami -o json        # the documented schema (docs/status-schema.json)
  canaryd status -A --watch            # redraw whenever a route changes
  canaryd status whoami --wait --timeout 600 && echo promoted

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
  canaryd check whoami -n shop --prometheus-url http://127.0.0.1:9090
  KUBECONFIG=canaryd-sa.kubeconfig canaryd check whoami -n shop   # RBAC as canaryd's identity

checks: the canaryd.io/* annotations, the GAMMA parent and the stable/canary pair, that both
backend Services exist, that the canary has ready EndpointSlices, the RBAC canaryd needs (for
the identity of the kubeconfig), and one analysis round against Prometheus when analysis is
configured. Exit code 1 lists every problem found.
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
    p.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table", help="output format")
    p.add_argument("-w", "--watch", action="store_true", help="redraw on every change (a watch, not polling)")
    p.add_argument(
        "--wait", action="store_true", help="wait until ROUTE is Promoted (exit 0), RolledBack or Failed (exit 1)"
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

    for intent in ann.INTENTS:
        ip = sub.add_parser(
            intent,
            help=INTENT_HELP[intent],
            formatter_class=fmt,
            description=f"{INTENT_HELP[intent].capitalize()}. Writes the {ann.INTENT}={intent} annotation; the "
            "controller applies it, removes it and records it in the route's state.",
            epilog=f"examples:\n  canaryd {intent} whoami -n shop\n  canaryd {intent} whoami -n shop --wait "
            f"--timeout 120\n\nexit codes with --wait: 0 applied"
            + (f" and {'Promoted' if intent == 'promote' else 'RolledBack'}" if intent in ("promote", "abort") else "")
            + ", 1 ignored or failed, 2 timed out.",
        )
        ip.add_argument("route", metavar="ROUTE", help="the HTTPRoute")
        _cluster_args(ip)
        ip.add_argument(
            "--wait",
            action="store_true",
            help="follow until the controller has consumed the intent"
            + (" and the rollout is terminal" if intent in ("promote", "abort") else ""),
        )
        ip.add_argument("--timeout", type=float, default=None, metavar="S", help="give up --wait after S seconds")
        ip.set_defaults(func=_intent, intent=intent)

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
    cp.add_argument("--no-color", action="store_true", help="plain output even on a terminal")
    cp.set_defaults(func=_check)


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


async def list_routes(api: Api, namespace: str | None) -> list[dict[str, Any]]:
    try:
        items, _ = await list_objects(api, "httproutes", namespace)
    except CanarydError as exc:
        raise cli_error(exc, "list httproutes") from exc
    return items


async def route_events(api: Api, ref: RouteRef) -> list[dict[str, Any]]:
    """core/v1 Events about the route; [] if the caller may not list Events."""
    try:
        return await _route_events(api, ref.namespace, ref.name)
    except ForbiddenError:
        return []


async def follow(
    api: Api,
    namespace: str | None,
    name: str | None,
    on_change: Callable[[dict[Key, dict[str, Any]]], T | None],
    timeout: float | None,
) -> T | None:
    """Watch HTTPRoutes with the controller's informer; call ``on_change(cache)`` after the list and every
    event until it returns something other than None (returned) or ``timeout`` passes (None)."""
    got: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    informer: Informer

    def changed(_key: Key, _obj: dict[str, Any] | None) -> None:
        if got.done() or not informer.synced.is_set():
            return
        check(informer.cache)

    def check(cache: dict[Key, dict[str, Any]]) -> None:
        try:
            out = on_change(cache)
        except BaseException as exc:  # the callback's own error ends the wait
            got.set_exception(exc)
            return
        if out is not None:
            got.set_result(out)

    fn, args = lister(api, "httproutes", namespace)
    informer = Informer(
        "httproutes",
        fn,
        args,
        on_change=changed,
        on_error="raise",
        field_selector=f"metadata.name={name}" if name else None,
    )
    task = asyncio.create_task(informer.run(), name="follow httproutes")

    async def first() -> None:
        await informer.synced.wait()
        if not got.done():
            check(informer.cache)

    starter = asyncio.create_task(first())
    try:
        waits: set[asyncio.Future[Any]] = {got, task}
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task in done and not got.done():
            exc = task.exception()
            raise cli_error(exc or KubeError("watch ended"), "watch httproutes")
        return got.result() if got.done() else None
    finally:
        for t in (task, starter):
            t.cancel()
        await asyncio.gather(task, starter, return_exceptions=True)


# --- status ------------------------------------------------------------------------------------
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
    if redraw:
        sys.stdout.write("\x1b[H\x1b[2J")
    sys.stdout.write(text)
    sys.stdout.flush()


async def _status_list(api: Api, namespace: str | None, args: argparse.Namespace, color: bool) -> int:
    def show(routes: list[dict[str, Any]], watching: bool) -> None:
        if args.output == "table":
            _emit(
                render.render_list(routes, _now(), color=color) + ("\n" if watching and not color else ""),
                redraw=watching and color,
            )
        else:
            _emit(
                dump(render.list_document(routes, _now()), args.output, compact=watching and args.output == "json")
                + ("---\n" if watching and args.output == "yaml" else ""),
                redraw=False,
            )

    if not args.watch:
        routes = await list_routes(api, namespace)
        show(routes, False)
        return EXIT_OK
    last: list[str] = []

    def changed(cache: dict[tuple[str, str], dict[str, Any]]) -> None:
        managed = [o for o in cache.values() if is_managed(o)]
        fingerprint = sorted(
            f"{o['metadata'].get('namespace')}/{o['metadata']['name']}@{o['metadata'].get('resourceVersion')}"
            for o in managed
        )
        if fingerprint != last:
            last[:] = fingerprint
            show(managed, True)

    await follow(api, namespace, None, changed, args.timeout)
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
    if not args.watch and not args.wait:
        events = await route_events(api, ref)
        if args.output == "table":
            _emit(render.render_detail(obj, events, _now(), color=color), redraw=False)
        else:
            _emit(dump(render.single_document(obj, events, _now()), args.output), redraw=False)
        return EXIT_OK

    last_rv: list[str] = []
    outcome: list[int] = []

    def changed(cache: dict[tuple[str, str], dict[str, Any]]) -> int | None:
        cur = cache.get((ref.namespace, ref.name))
        if cur is None:
            raise NotFoundError(f"httproute {ref} was deleted while waiting")
        rv = str(cur["metadata"].get("resourceVersion"))
        if args.watch and last_rv != [rv]:
            last_rv[:] = [rv]
            if args.output == "table":
                _emit(render.render_list([cur], _now(), color=color) + ("" if color else "\n"), redraw=color)
            else:
                _emit(
                    dump(render.single_document(cur, [], _now()), args.output, compact=args.output == "json")
                    + ("---\n" if args.output == "yaml" else ""),
                    redraw=False,
                )
        code = _terminal_code(render.RouteStatus.from_route(cur).phase) if args.wait else None
        if code is not None:
            outcome.append(code)
            if not args.watch:  # one final line for scripts
                if args.output == "table":
                    _emit(render.render_list([cur], _now(), color=color), redraw=False)
                else:
                    _emit(dump(render.single_document(cur, [], _now()), args.output), redraw=False)
        return code

    got = await follow(api, ref.namespace, ref.name, changed, args.timeout)
    if got is None:
        if args.wait:
            cur = await get_route(api, ref)
            phase = render.RouteStatus.from_route(cur).phase
            print(
                f"timed out after {args.timeout:g}s waiting for httproute {ref} to finish (phase {phase})",
                file=sys.stderr,
            )
            return EXIT_TIMEOUT
        return EXIT_OK
    return got


# --- intents -----------------------------------------------------------------------------------
class _AssumeReady:
    """Predictions are about the intent, not the endpoints: every backend counts as present and ready."""

    def service_exists(self, namespace: str, name: str) -> bool:
        return True

    def service_ready(self, namespace: str, name: str) -> bool:
        return True


def predict(intent: str, obj: dict[str, Any], defaults: RolloutDefaults, now: datetime) -> str:
    """What the controller will do with ``intent``: ``decide()`` itself, run on the route as annotated."""
    meta = obj["metadata"]
    annotated = {**obj, "metadata": {**meta, "annotations": {**(meta.get("annotations") or {}), ann.INTENT: intent}}}
    adm = admit(annotated, _AssumeReady(), defaults, now)
    st = adm.facts.state
    if st is None:
        return "the controller has not started this rollout yet; it applies the intent when it does"
    if adm.facts.intent is None:
        return "the controller cannot read the intent and will ignore it"
    if adm.facts.error is not None:
        return f"the route cannot be rolled out as annotated ({adm.facts.error}); the intent will not change weights"
    why = ignored_reason(adm.facts.intent, st.phase)
    if why is not None:
        return f"{why}: the controller will record the intent as ignored and change nothing"
    d = decide(adm.facts)
    new = d.state or st
    parts = []
    if d.canary_pct is not None:
        parts.append(f"weights become {new.stable} {100 - d.canary_pct} → {new.canary} {d.canary_pct}")
    parts.append(
        f"phase becomes {new.phase.value}"
        + (f" at step {new.step + 1}/{len(new.steps)}" if new.steps and new.step >= 0 else "")
    )
    return "; ".join(parts)


def _intent(args: argparse.Namespace) -> int:
    return asyncio.run(_intent_async(args))


async def _intent_async(args: argparse.Namespace) -> int:
    api, ns = await _connect(args)
    try:
        return await _apply_intent(api, RouteRef(ns, args.route), args.intent, args.wait, args.timeout)
    finally:
        await api.close()


async def _apply_intent(api: Api, ref: RouteRef, intent: str, wait: bool, timeout: float | None) -> int:  # noqa: C901 - one linear CLI flow: read, predict, patch, follow
    obj = await get_route(api, ref)
    a: dict[str, str] = obj["metadata"].get("annotations") or {}
    if ann.CANARY not in a:
        require_managed({"metadata": {"annotations": {}}}, ref)
    rs = render.RouteStatus.from_route(obj)
    if rs.state_error:
        raise CanarydError(f"httproute {ref}: {rs.state_error}")
    before: tuple[IntentRecord, ...] = rs.state.intents if rs.state else ()
    if rs.pending_intent:
        print(f"replacing the pending intent {rs.pending_intent!r} (not yet applied)")
    print(f"{intent} httproute {ref}: {predict(intent, obj, Settings().defaults, _now())}")
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

    def consumed(cache: dict[tuple[str, str], dict[str, Any]]) -> tuple[int, str] | None:
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

    got = await follow(api, ref.namespace, ref.name, consumed, timeout)
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


# --- check -------------------------------------------------------------------------------------
def _check(args: argparse.Namespace) -> int:
    return asyncio.run(_check_async(args))


def format_report(report: Any, color: bool) -> str:
    from canaryd.preflight import Report

    assert isinstance(report, Report)
    ok_mark = "\x1b[32m✓\x1b[0m" if color else "ok  "
    bad_mark = "\x1b[31m✗\x1b[0m" if color else "FAIL"
    lines = [f"check httproute {report.route}"]
    lines += [f"  {ok_mark if f.ok else bad_mark} {f.check}: {f.message}" for f in report.findings]
    if report.judgements:
        lines.append(f"analysis now (Prometheus {report.prometheus_url}):")
        for j in report.judgements:

            def stats(who: str, s: Any) -> str:
                if s is None:
                    return f"{who} -"
                rate = "-" if s.success_rate is None else f"{s.success_rate:.3f}".rstrip("0").rstrip(".") + "%"
                lat = "" if s.latency_ms is None else f", {s.latency_ms:.1f}ms"
                return f"{who} {round(s.requests):,} req, {rate} success{lat}"

            lines.append(
                f"  {j.signal}: {stats('canary', j.canary)}; {stats('stable', j.stable)} "
                f"-> judge: {j.verdict.value} ({j.reason})"
            )
    problems = report.problems
    if problems:
        lines.append(f"{len(problems)} problem{'s' if len(problems) != 1 else ''}:")
        lines += [f"  {i}. {f.check}: {f.message}" for i, f in enumerate(problems, 1)]
    else:
        lines.append("no problems found: ready to roll out")
    return "\n".join(lines) + "\n"


async def _check_async(args: argparse.Namespace) -> int:
    from canaryd.preflight import preflight

    api, ns = await _connect(args)
    try:
        ref = RouteRef(ns, args.route)
        try:
            report = await preflight(
                api, ref, settings=Settings(), now=_now(), prometheus_url=args.prometheus_url, timeout_s=args.timeout
            )
        except CanarydError:
            raise
        except Exception as exc:
            raise cli_error(exc, f"check httproute {ref}", ref=ref) from exc
        sys.stdout.write(format_report(report, _use_color(args)))
        return EXIT_FAILED if report.problems else EXIT_OK
    finally:
        await api.close()
