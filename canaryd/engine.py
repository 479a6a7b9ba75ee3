"""The engine: the only place where time, Kubernetes and Prometheus meet.

Informers keep HTTPRoutes, Services and EndpointSlices current (watch, don't poll). Every
route annotated ``canaryd.io/canary`` (or carrying canaryd state) gets one worker task; a
worker reconciles its route when the route or its canary's endpoints change, or when the
decision's wake-up time comes. A reconcile gathers facts, calls ``decide`` (pure), and
performs what it returns: one guarded JSON patch (weights + state + consumed intent), then
Events and metrics. Conflicts re-read the route and decide again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from kubernetes_asyncio import client

from canaryd import spec as ann
from canaryd.analysis import AnalysisTarget, Analyzer, Judgement, Verdict
from canaryd.decide import Decision, Facts, decide
from canaryd.errors import (
    CanarydError,
    ConflictError,
    NotFoundError,
    RouteError,
    SpecError,
    StateError,
)
from canaryd.events import EventRecorder
from canaryd.informer import Informer, Key, raw
from canaryd.kube import GATEWAY_GROUP, GATEWAY_VERSION, HTTPROUTES
from canaryd.observability import Metrics
from canaryd.plan import canary_percent
from canaryd.routes import (
    Pair,
    RouteClient,
    RouteRef,
    annotation_ops,
    gamma_parents,
    resolve_pair,
    weight_ops,
)
from canaryd.settings import Settings
from canaryd.state import Phase, RolloutState

log = structlog.get_logger("canaryd.engine")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MAX_CONFLICT_RETRIES = 5


def is_managed(obj: dict[str, Any]) -> bool:
    a = obj["metadata"].get("annotations") or {}
    return ann.CANARY in a or ann.STATE in a


def slice_ready(es: dict[str, Any]) -> bool:
    for ep in es.get("endpoints") or []:
        cond = ep.get("conditions") or {}
        if cond.get("ready", True) is not False and ep.get("addresses"):
            return True
    return False


@dataclass
class _Worker:
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Engine:
    def __init__(
        self,
        api: client.ApiClient,
        settings: Settings,
        *,
        analyzer: Analyzer | None = None,
        metrics: Metrics | None = None,
        is_leader: Callable[[], bool] = lambda: True,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.api = api
        self.settings = settings
        self.analyzer = analyzer
        self.metrics = metrics or Metrics.create()
        self.is_leader = is_leader
        self.clock = clock
        self.routes = RouteClient(api, settings.field_manager)
        self.events = EventRecorder(api, instance=settings.identity)
        self._sem = asyncio.Semaphore(settings.max_concurrent_rollouts)
        self._workers: dict[Key, _Worker] = {}
        # Indexed both ways so a slice event or a readiness check costs O(1), not O(routes).
        self._slice_service: dict[Key, Key] = {}  # slice -> its service
        self._slices_ready: dict[Key, dict[Key, bool]] = {}  # service -> {slice: ready}
        self._services: set[Key] = set()
        self._canary_of: dict[Key, Key] = {}  # route -> canary service it waits on
        self._waiters: dict[Key, set[Key]] = {}  # canary service -> routes
        self._shown: dict[Key, tuple[str, int, int]] = {}  # what the gauges show per route
        self.informers: list[Informer] = []
        self._stopping = False

    # --- informers -------------------------------------------------------------------------
    def _build_informers(self) -> list[Informer]:
        co = client.CustomObjectsApi(self.api)
        core = client.CoreV1Api(self.api)
        disc = client.DiscoveryV1Api(self.api)
        ns = self.settings.namespaces
        out: list[Informer] = []
        scopes: list[str | None] = list(ns) if ns else [None]
        for scope in scopes:
            suffix = f"/{scope}" if scope else ""
            if scope:
                out.append(
                    Informer(
                        f"httproutes{suffix}",
                        raw(co.list_namespaced_custom_object),
                        (GATEWAY_GROUP, GATEWAY_VERSION, scope, HTTPROUTES),
                        on_change=self._on_route,
                        label_selector=self.settings.label_selector,
                    )
                )
                out.append(
                    Informer(
                        f"services{suffix}", raw(core.list_namespaced_service), (scope,), on_change=self._on_service
                    )
                )
                out.append(
                    Informer(
                        f"endpointslices{suffix}",
                        raw(disc.list_namespaced_endpoint_slice),
                        (scope,),
                        on_change=self._on_slice,
                    )
                )
            else:
                out.append(
                    Informer(
                        "httproutes",
                        raw(co.list_cluster_custom_object),
                        (GATEWAY_GROUP, GATEWAY_VERSION, HTTPROUTES),
                        on_change=self._on_route,
                        label_selector=self.settings.label_selector,
                    )
                )
                out.append(
                    Informer("services", raw(core.list_service_for_all_namespaces), (), on_change=self._on_service)
                )
                out.append(
                    Informer(
                        "endpointslices", raw(disc.list_endpoint_slice_for_all_namespaces), (), on_change=self._on_slice
                    )
                )
        return out

    def _route_cache(self, key: Key) -> dict[str, Any] | None:
        for inf in self.informers:
            if inf.name.startswith("httproutes") and key in inf.cache:
                return inf.cache[key]
        return None

    def _on_service(self, key: Key, obj: dict[str, Any] | None) -> None:
        if obj is None:
            self._services.discard(key)
        else:
            self._services.add(key)
        self._wake_waiters(key)

    def _on_slice(self, key: Key, obj: dict[str, Any] | None) -> None:
        prev = self._slice_service.pop(key, None)
        if prev is not None:
            self._slices_ready.get(prev, {}).pop(key, None)
        svc_name = None if obj is None else (obj["metadata"].get("labels") or {}).get(SERVICE_NAME_LABEL)
        if obj is not None and svc_name:
            svc = (key[0], svc_name)
            self._slice_service[key] = svc
            self._slices_ready.setdefault(svc, {})[key] = slice_ready(obj)
            self._wake_waiters(svc)
        if prev is not None and prev != (key[0], svc_name):
            self._wake_waiters(prev)

    def _wake_waiters(self, service: Key) -> None:
        for route in self._waiters.get(service, ()):
            w = self._workers.get(route)
            if w is not None:
                w.wake.set()

    def _wait_on(self, route: Key, service: Key | None) -> None:
        old = self._canary_of.pop(route, None)
        if old is not None:
            self._waiters.get(old, set()).discard(route)
        if service is not None:
            self._canary_of[route] = service
            self._waiters.setdefault(service, set()).add(route)

    def service_exists(self, namespace: str, name: str) -> bool:
        return (namespace, name) in self._services

    def service_ready(self, namespace: str, name: str) -> bool:
        return any(self._slices_ready.get((namespace, name), {}).values())

    def _on_route(self, key: Key, obj: dict[str, Any] | None) -> None:
        if self._stopping:
            return
        w = self._workers.get(key)
        if obj is None or not is_managed(obj):
            if w is not None:
                w.wake.set()  # the worker sees the route gone/unmanaged and ends
            return
        if w is None or w.task is None or w.task.done():
            w = _Worker()
            self._workers[key] = w
            w.task = asyncio.create_task(self._work(key, w), name=f"rollout {key[0]}/{key[1]}")
        else:
            w.wake.set()

    # --- workers ---------------------------------------------------------------------------
    async def _work(self, key: Key, w: _Worker) -> None:
        ns, name = key
        with structlog.contextvars.bound_contextvars(namespace=ns, route=name):
            try:
                # Decide nothing before every cache is filled: a missing Service would read as
                # "backend does not exist" and fail a healthy rollout.
                await asyncio.gather(*(i.synced.wait() for i in self.informers))
                backoff = 1.0
                while not self._stopping:
                    w.wake.clear()
                    obj = self._route_cache(key)
                    if obj is None or not is_managed(obj):
                        self.metrics.forget(ns, name)
                        self._shown.pop(key, None)
                        return
                    try:
                        wake_at = await self.reconcile(obj)
                        backoff = 1.0
                    except Exception as exc:
                        # Forbidden, apiserver trouble, a bug: keep the rollout and retry with backoff;
                        # the state on the route is unchanged, so nothing is repeated or skipped.
                        log.error("reconcile_failed", error=str(exc), exc_info=not isinstance(exc, CanarydError))
                        wake_at = self.clock() + timedelta(seconds=backoff)
                        backoff = min(backoff * 2, 60.0)
                    timeout = None if wake_at is None else max(0.0, (wake_at - self.clock()).total_seconds())
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(w.wake.wait(), timeout)
            finally:
                if self._workers.get(key) is w:
                    del self._workers[key]
                self._wait_on(key, None)

    async def reconcile(self, obj: dict[str, Any]) -> datetime | None:
        """Reconcile one route; returns when to look again (None = on the next change)."""
        async with self._sem:
            t0 = time.perf_counter()
            try:
                return await self._reconcile(obj)
            finally:
                self.metrics.reconcile_seconds.observe(time.perf_counter() - t0)

    async def _reconcile(self, obj: dict[str, Any]) -> datetime | None:
        judgements: list[Judgement] | None = None
        for _attempt in range(MAX_CONFLICT_RETRIES):
            facts, pair, raw_intent, parent = self._facts(obj, judgements)
            d = decide(facts)
            if d.analyze and pair is not None and facts.spec is not None and facts.stable is not None:
                judgements = await self._analyze(obj, facts, pair, parent)
                # Measuring takes time: decide (and schedule the next round) from when it ended.
                facts = dataclasses.replace(facts, judgements=judgements, now=self.clock())
                d = decide(facts)
            if facts.spec is not None:
                ns = obj["metadata"]["namespace"]
                self._wait_on((ns, obj["metadata"]["name"]), (ns, facts.spec.canary))
            try:
                await self._apply(obj, d, pair, raw_intent, facts.state)
                return d.wake_at
            except ConflictError as exc:
                log.info("conflict_rereading", error=str(exc))
                try:
                    obj = await self.routes.get(RouteRef(obj["metadata"]["namespace"], obj["metadata"]["name"]))
                except NotFoundError:
                    return None
        log.warning("conflict_retries_exhausted")
        return self.clock() + timedelta(seconds=1)

    def _facts(
        self, obj: dict[str, Any], judgements: list[Judgement] | None
    ) -> tuple[Facts, Pair | None, str | None, str | None]:
        meta = obj["metadata"]
        a: dict[str, str] = meta.get("annotations") or {}
        now = self.clock()
        state: RolloutState | None = None
        error: str | None = None
        rspec = None
        pair: Pair | None = None
        parent: str | None = None
        where = f"httproute {meta['namespace']}/{meta['name']}"
        try:
            if ann.STATE in a:
                state = RolloutState.from_annotation(a[ann.STATE])
        except StateError as exc:
            error = f"{where}: {ann.STATE}: {exc}"
        raw_intent = a.get(ann.INTENT)
        intent = None
        try:
            intent = ann.parse_intent(raw_intent)
        except SpecError as exc:
            log.warning("bad_intent", error=str(exc))
        current = 0
        if error is None:
            try:
                rspec = ann.parse_spec(a, self.settings.defaults)
                if rspec is None:
                    raise SpecError(ann.CANARY, "missing; set it to the backendRef to roll out")
                parents = gamma_parents(obj)
                if not parents:
                    raise RouteError(
                        f"{where}: canaryd manages GAMMA routes (parentRefs of kind Service); "
                        "this route attaches to a Gateway — annotate the mesh route instead"
                    )
                parent = parents[0]
                pair = resolve_pair(obj, rspec.canary, rspec.stable)
                for backend in (pair.stable, pair.canary):
                    if not self.service_exists(meta["namespace"], backend):
                        raise RouteError(
                            f"{where}: backend Service {meta['namespace']}/{backend} does not exist; "
                            "create it or fix the backendRef"
                        )
                r0 = pair.rules[0]
                current = round(canary_percent(r0.stable_weight, r0.canary_weight))
                if all(r.stable_weight + r.canary_weight == 0 for r in pair.rules):
                    raise RouteError(
                        f"{where}: the weights of {pair.stable} and {pair.canary} are both 0; "
                        "give the stable a weight (e.g. 100)"
                    )
            except SpecError as exc:
                error = f"{where}: annotation {exc}"
            except RouteError as exc:
                error = str(exc)
        facts = Facts(
            now=now,
            spec=rspec if error is None else None,
            stable=pair.stable if pair and error is None else None,
            error=error,
            state=state,
            intent=intent,
            canary_ready=bool(rspec and self.service_ready(meta["namespace"], rspec.canary)),
            current_canary_pct=current,
            judgements=judgements,
        )
        return facts, pair, raw_intent, parent

    async def _analyze(self, obj: dict[str, Any], facts: Facts, pair: Pair, parent: str | None) -> list[Judgement]:
        assert facts.spec is not None and facts.stable is not None
        if self.analyzer is None:
            return [
                Judgement(signal=s, verdict=Verdict.ERROR, reason="no analyzer configured (Prometheus URL unset)")
                for s in facts.spec.analysis.signals
            ]
        target = AnalysisTarget(
            namespace=obj["metadata"]["namespace"],
            route=obj["metadata"]["name"],
            service=parent or "",
            port=int(facts.spec.port or pair.port or 80),
            stable=facts.stable,
            canary=facts.spec.canary,
            spec=facts.spec.analysis,
        )
        try:
            out = await self.analyzer.analyze(target)
        except CanarydError as exc:
            out = [Judgement(signal=s, verdict=Verdict.ERROR, reason=str(exc)) for s in facts.spec.analysis.signals]
        for j in out:
            self.metrics.analysis.labels(j.verdict.value, j.signal).inc()
        log.info(
            "analysis_round",
            verdicts={j.signal: j.verdict.value for j in out},
            reasons=[j.reason for j in out],
            step=facts.state.step if facts.state else None,
        )
        return out

    async def _apply(
        self, obj: dict[str, Any], d: Decision, pair: Pair | None, raw_intent: str | None, before: RolloutState | None
    ) -> None:
        ops: list[dict[str, Any]] = []
        if d.canary_pct is not None and pair is not None:
            ops += weight_ops(pair, d.canary_pct)
        set_ = {ann.STATE: d.state.to_annotation()} if d.state is not None else {}
        remove = {ann.INTENT: raw_intent} if d.consume_intent and raw_intent is not None else {}
        ops += annotation_ops(obj, set_, remove)
        if not ops:
            self._observe(obj, before)
            return
        if not self.is_leader():
            log.warning("not_leader_skipping_patch")
            return
        t0 = time.perf_counter()
        await self.routes.patch(obj, ops)
        self.metrics.patch_seconds.observe(time.perf_counter() - t0)
        self.metrics.patches.inc()
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        st = d.state or before
        log.info(
            "route_patched",
            step=st.step if st else None,
            phase=st.phase.value if st else None,
            canary_weight=d.canary_pct,
            events=[e.reason for e in d.events],
        )
        for phase in d.transitions:
            self.metrics.transitions.labels(ns, name, phase).inc()
            self.metrics.last_transition.labels(ns, name).set(time.time())
            if phase == Phase.ROLLED_BACK.value:
                self.metrics.rollbacks.labels(ns, name).inc()
        self._observe(obj, st)
        for e in d.events:
            self.events.submit(obj, e)

    def _observe(self, obj: dict[str, Any], st: RolloutState | None) -> None:
        if st is None:
            return
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        shown = (st.phase.value, st.canary_weight, st.step)
        if self._shown.get((ns, name)) == shown:
            return  # most wake-ups change nothing: skip eight gauge updates per tick
        self._shown[(ns, name)] = shown
        self.metrics.set_phase(ns, name, st.phase.value)
        self.metrics.canary_weight.labels(ns, name).set(st.canary_weight)
        self.metrics.step.labels(ns, name).set(st.step + 1)

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def synced(self) -> bool:
        return bool(self.informers) and all(i.synced.is_set() for i in self.informers)

    async def run(self) -> None:
        """Run informers and workers until cancelled."""
        self.informers = self._build_informers()
        tasks = [asyncio.create_task(i.run(), name=f"informer {i.name}") for i in self.informers]
        events = asyncio.create_task(self.events.run(), name="events")
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            self._stopping = True
            for t in tasks:
                t.cancel()
            workers = [w.task for w in self._workers.values() if w.task is not None]
            for t in workers:
                t.cancel()
            await asyncio.gather(*tasks, *workers, return_exceptions=True)
            events.cancel()  # after the workers: it flushes what they queued last
            await asyncio.gather(events, return_exceptions=True)
