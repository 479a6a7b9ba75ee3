"""The engine: the only place where time, Kubernetes and Prometheus meet.

Informers keep HTTPRoutes, Services and EndpointSlices current (watch, don't poll). Every
route annotated ``canaryd.io/canary`` (or carrying canaryd state) gets one worker task; a
worker reconciles its route when the route or its canary's endpoints change, or when the
decision's wake-up time comes. A reconcile gathers facts, calls ``decide`` (pure), and
performs what it returns: one guarded JSON patch (weights + state + consumed intent + the
``canaryd.io/phase`` label), then Events and metrics. Conflicts re-read the route and decide again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from canaryd.core.admit import Admission, admit, is_managed
from canaryd.core.analysis import AnalysisTarget, Analyzer, Observation
from canaryd.core.backends import (
    SERVICE_NAME_LABEL,
    Pair,
    RouteRef,
    annotation_ops,
    label_ops,
    slice_ready,
    weight_ops,
)
from canaryd.core.decide import Decision, Event, decide
from canaryd.core.hooks import key as hook_key
from canaryd.core.spec import INTENT, PHASE_LABEL, STATE
from canaryd.core.state import Failure, Phase, RolloutState, parse_ts
from canaryd.errors import CanarydError, ConflictError, InvalidError, NotFoundError
from canaryd.hooks import HookRunner, Notifier, payload_from_state
from canaryd.hooks.config import catalog as hook_catalog
from canaryd.kube import Api
from canaryd.kube.api import lister
from canaryd.kube.events import EventRecorder, coalesce
from canaryd.kube.informer import Informer, Key
from canaryd.kube.routes import RouteClient
from canaryd.observability import Metrics
from canaryd.settings import Settings

log = structlog.get_logger("canaryd.engine")

MAX_CONFLICT_RETRIES = 5
REFUSED_BACKOFF_S = 5.0
REFUSED_BACKOFF_MAX_S = 300.0


@dataclass
class _Worker:
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


def _state_ops(
    obj: dict[str, Any], state: RolloutState | None, remove: dict[str, str], *, shown: RolloutState | None = None
) -> list[dict[str, Any]]:
    """The state annotation (when written), the consumed intent, and the ``canaryd.io/phase`` label in sync
    with the state written or, when none is, with the one the route holds (a route from before the label)."""
    ops = annotation_ops(obj, {STATE: state.to_annotation()} if state is not None else {}, remove)
    phase_of = state or shown
    if phase_of is not None:
        ops += label_ops(obj, {PHASE_LABEL: phase_of.phase.value})
    return ops


def _meta(obj: dict[str, Any], *extra: str) -> dict[str, Any]:
    m = obj["metadata"]
    keep = ("name", "namespace", "resourceVersion", *extra)
    return {k: m[k] for k in keep if k in m}


def _slim_route(obj: dict[str, Any]) -> dict[str, Any]:
    """The route as the engine reads and patches it, without ``managedFields`` (often a third of it)."""
    obj["metadata"].pop("managedFields", None)
    return obj


def _slim_service(obj: dict[str, Any]) -> dict[str, Any]:
    """The engine only asks whether a Service exists: its cache keeps the name."""
    return {"metadata": _meta(obj)}


def _slim_slice(obj: dict[str, Any]) -> dict[str, Any]:
    """What ``slice_ready`` and the service index read: the Service label and each endpoint's readiness."""
    meta = _meta(obj)
    service = (obj["metadata"].get("labels") or {}).get(SERVICE_NAME_LABEL)
    if service is not None:
        meta["labels"] = {SERVICE_NAME_LABEL: service}
    endpoints = [
        {"addresses": (ep.get("addresses") or [])[:1], "conditions": ep.get("conditions") or {}}
        for ep in obj.get("endpoints") or []
    ]
    return {"metadata": meta, "endpoints": endpoints}


class Engine:
    def __init__(
        self,
        api: Api,
        settings: Settings,
        *,
        analyzer: Analyzer | None = None,
        metrics: Metrics | None = None,
        owns: Callable[[str, str], bool] = lambda namespace, name: True,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.api = api
        self.settings = settings
        self.analyzer = analyzer
        self.metrics = metrics or Metrics.create()
        self.owns = owns  # may this replica write the route now (its Lease or its shard's)? Asked before each write
        self.clock = clock
        self.routes = RouteClient(api, settings.field_manager)
        self.events = EventRecorder(api, instance=settings.identity, field_manager=settings.field_manager)
        self._sem = asyncio.Semaphore(settings.max_concurrent_rollouts)
        self._workers: dict[Key, _Worker] = {}
        # Indexed both ways so a slice event or a readiness check costs O(1), not O(routes).
        self._slice_service: dict[Key, Key] = {}  # slice -> its service
        self._slices_ready: dict[Key, dict[Key, bool]] = {}  # service -> {slice: ready}
        self._services: set[Key] = set()
        self._canary_of: dict[Key, Key] = {}  # route -> canary service it waits on
        self._waiters: dict[Key, set[Key]] = {}  # canary service -> routes
        self._shown: dict[Key, tuple[str, int, int]] = {}  # what the gauges show per route
        self._refusals: dict[Key, int] = {}  # writes the apiserver refused as invalid, per route
        self._written: dict[Key, str] = {}  # the resourceVersion of our last write, per route, until its echo
        self._analysed: dict[Key, datetime] = {}  # when the route's last analysis answered
        self._quiet: dict[Key, datetime] = {}  # when the route's last unwritten (quiet) round was judged
        self.catalog = hook_catalog(settings.hooks)
        self.hooks = HookRunner(settings.hooks, metrics_registry=self.metrics.registry)
        self.notifier = Notifier(settings.hooks, metrics_registry=self.metrics.registry)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.informers: list[Informer] = []
        self._stopping = False

    # --- informers -------------------------------------------------------------------------
    def _build_informers(self) -> list[Informer]:
        scopes: list[str | None] = list(self.settings.namespaces) or [None]
        out: list[Informer] = []
        for scope in scopes:
            suffix = f"/{scope}" if scope else ""
            for kind, on_change, slim in (
                ("httproutes", self._on_route, _slim_route),
                ("services", self._on_service, _slim_service),
                ("endpointslices", self._on_slice, _slim_slice),
            ):
                fn, args = lister(self.api, kind, scope)  # type: ignore[arg-type]
                selector = self.settings.label_selector if kind == "httproutes" else None
                out.append(
                    Informer(f"{kind}{suffix}", fn, args, on_change=on_change, label_selector=selector, transform=slim)
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
        if obj is None or not is_managed(obj) or not self.owns(*key):
            if w is not None:
                w.wake.set()  # the worker sees the route gone/unmanaged/another shard's and ends
            return
        if w is None or w.task is None or w.task.done():
            w = _Worker()
            self._workers[key] = w
            w.task = asyncio.create_task(self._work(key, w), name=f"rollout {key[0]}/{key[1]}")
        elif self._written.pop(key, None) != obj["metadata"].get("resourceVersion"):
            w.wake.set()  # (our own write coming back changes nothing its worker has not decided already)

    def reassess(self) -> None:
        """This replica gained or lost a shard: end the workers of routes it no longer owns at once, and
        start the newly owned ones from the informer cache (their state is on the route: nothing is lost)."""
        for inf in self.informers:
            if inf.name.startswith("httproutes"):
                for key, obj in list(inf.cache.items()):
                    w = self._workers.get(key)
                    running = w is not None and w.task is not None and not w.task.done()
                    if running != self.owns(*key):  # only where ownership changed: the others are left alone
                        self._on_route(key, obj)

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
                    if obj is None or not is_managed(obj) or not self.owns(ns, name):
                        self.metrics.forget(ns, name)  # another shard's route: its holder shows it
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
                    self._written.pop(key, None)
                    self._analysed.pop(key, None)
                    self._quiet.pop(key, None)
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
        observations: list[Observation] | None = None
        answers: dict[str, tuple[bool, str]] | None = None
        ref = RouteRef(obj["metadata"]["namespace"], obj["metadata"]["name"])
        for _attempt in range(MAX_CONFLICT_RETRIES):
            adm = admit(obj, self, self.settings.defaults, self.clock(), self.catalog)
            quiet = self._quiet.get((ref.namespace, ref.name))
            facts = dataclasses.replace(
                adm.facts, observations=observations, hook_results=answers, quiet_round_at=quiet
            )
            d = decide(facts)
            if d.analyze and adm.pair is not None and adm.spec is not None:
                window = d.window_s or adm.spec.analysis.window_s
                observations = await self._analyze(obj, adm, window)
                self._analysed[(ref.namespace, ref.name)] = self.clock()  # for the step's delay (_step_delay)
                # Measuring takes time: decide (and schedule the next round) from when it ended.
                facts = dataclasses.replace(facts, observations=observations, now=self.clock())
                d = decide(facts)
                self._log_round(ref, d, window, facts.state)
                if d.quiet:  # nothing to write: remember the round so the next is an interval later
                    self._quiet[(ref.namespace, ref.name)] = facts.now
            if d.call_hooks:
                if not self.owns(ref.namespace, ref.name):  # a gate can start a smoke test: only the replica that acts
                    return self.clock() + timedelta(seconds=1)
                answers = await self._call_gates(obj, d)
                d = decide(dataclasses.replace(facts, hook_results=answers, now=self.clock()))
            if adm.spec is not None:
                self._wait_on((ref.namespace, ref.name), (ref.namespace, adm.spec.canary))
            try:
                if await self._apply(obj, d, adm.pair, adm.raw_intent, facts.state):
                    self._after_patch(obj, d, adm)  # triggers and notifications only from the replica that wrote
                self._refusals.pop((ref.namespace, ref.name), None)
                return d.wake_at
            except ConflictError as exc:
                log.info("conflict_rereading", error=str(exc))
                try:
                    obj = await self.routes.get(ref)
                except NotFoundError:
                    return None
            except InvalidError as exc:
                return await self._refused(obj, d, exc)
        log.warning("conflict_retries_exhausted")
        return self.clock() + timedelta(seconds=1)

    async def _refused(self, obj: dict[str, Any], d: Decision, exc: InvalidError) -> datetime:
        """The apiserver refuses our write as invalid (e.g. annotations over 256 KiB): the same write
        cannot succeed, so say so once, try a minimal Failed state that holds the weights, and back off."""
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        n = self._refusals.get(key, 0) + 1
        self._refusals[key] = n
        cause = str(exc)[:300]
        if n == 1:
            log.error("patch_refused", error=cause)
            self.events.submit(obj, Event("Warning", "PatchRefused", f"the apiserver refused canaryd's write: {cause}"))
        if d.state is not None and d.state.phase != Phase.FAILED and n <= 2:
            now = self.clock()
            failed = d.state.with_(
                phase=Phase.FAILED,
                failure=Failure.STATE,
                message=f"the apiserver refused canaryd's write ({cause}); weights held",
                next_at=None,
                history=(),
            )
            with contextlib.suppress(CanarydError):
                await self.routes.patch(obj, _state_ops(obj, failed, {}))
                log.info("route_failed_refused_write", at=str(now))
        return self.clock() + timedelta(seconds=min(REFUSED_BACKOFF_S * 2 ** (n - 1), REFUSED_BACKOFF_MAX_S))

    async def _analyze(self, obj: dict[str, Any], adm: Admission, window_s: float | None) -> list[Observation]:
        """This round's counts per signal, over the window since the last round."""
        assert adm.spec is not None and adm.pair is not None
        spec = adm.spec
        signals = spec.analysis.signals
        if self.analyzer is None:
            return [Observation(s, None, None, error="no analyzer configured (Prometheus URL unset)") for s in signals]
        analysis = dataclasses.replace(spec.analysis, window_s=window_s or spec.analysis.window_s)
        target = AnalysisTarget(
            namespace=obj["metadata"]["namespace"],
            route=obj["metadata"]["name"],
            service=adm.parent or "",
            port=int(spec.port or adm.pair.port or 80),
            stable=adm.pair.stable,
            canary=spec.canary,
            spec=analysis,
        )
        try:
            return await self.analyzer.analyze(target)
        except CanarydError as exc:
            return [Observation(s, None, None, error=str(exc)) for s in signals]

    async def _call_gates(self, obj: dict[str, Any], d: Decision) -> dict[str, tuple[bool, str]]:
        """Call the gates the decision names (concurrently); answers keyed as the state records them."""
        st = d.state
        assert st is not None
        meta = obj["metadata"]
        now = self.clock()

        async def one(kind: str, name: str) -> tuple[str, tuple[bool, str]]:
            payload = payload_from_state(
                kind="HookCall", name=name, type=kind, namespace=meta["namespace"], route=meta["name"], state=st, at=now
            )
            result = await self.hooks.call(name, kind, payload)
            log.info("hook_answered", hook=name, kind=kind, ok=result.ok, status=result.status, reason=result.reason)
            return hook_key(kind, st.step, name), (result.ok, result.reason)

        return dict(await asyncio.gather(*(one(k, n) for k, n in d.call_hooks)))

    def _after_patch(self, obj: dict[str, Any], d: Decision, adm: Admission) -> None:
        """Triggers and notifications go out after the patch, off the critical path, never blocking."""
        st = d.state
        if st is None or not (d.fire_hooks or d.transitions):
            return
        meta = obj["metadata"]
        now = self.clock()
        for kind, name in d.fire_hooks:
            payload = payload_from_state(
                kind="HookCall", name=name, type=kind, namespace=meta["namespace"], route=meta["name"], state=st, at=now
            )
            self._background(self.hooks.call(name, kind, payload))
        if d.transitions:  # one phase entered per decision; notifiers filter on the payload's phase
            payload = payload_from_state(
                kind="Notification",
                type="transition",
                namespace=meta["namespace"],
                route=meta["name"],
                state=st,
                at=now,
            )
            self.notifier.notify_soon(payload, None if adm.notifiers is None else list(adm.notifiers))

    def _background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _log_round(self, ref: RouteRef, d: Decision, window_s: float, before: RolloutState | None) -> None:
        """One canonical line per analysis round (written or quiet), from the decision's records; the gauges show it."""
        recs = list(d.records)
        st = d.state or before
        if not recs or st is None:
            return
        for r in recs:
            self.metrics.analysis.labels(r.verdict, r.signal).inc()
        self.metrics.set_analysis(ref.namespace, ref.name, recs, window_s)
        log.info(
            "analysis_round",
            step=recs[0].step,
            phase=st.phase.value,
            written=not d.quiet,
            verdicts={r.signal: r.verdict for r in recs},
            evidence={r.signal: r.evidence for r in recs},
            reasons=[r.reason for r in recs],
        )

    async def _apply(
        self, obj: dict[str, Any], d: Decision, pair: Pair | None, raw_intent: str | None, before: RolloutState | None
    ) -> bool:
        """Send the decision's one patch; True when it was written (nothing to write, or a standby: False)."""
        ops: list[dict[str, Any]] = []
        if d.canary_pct is not None and pair is not None:
            ops += weight_ops(pair, d.canary_pct)
        remove = {INTENT: raw_intent} if d.consume_intent and raw_intent is not None else {}
        ops += _state_ops(obj, d.state, remove, shown=before)
        if not ops:
            self._observe(obj, before)
            return False
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        if not self.owns(ns, name):  # the Lease (of the route's shard) is not held, or no longer
            log.warning("not_leader_skipping_patch")
            return False
        t0 = time.perf_counter()
        sent = self.clock()
        written = await self.routes.patch(obj, ops)
        self.metrics.patch_seconds.observe(time.perf_counter() - t0)
        late = self._step_delay(before, d.state, (self._analysed.pop((ns, name), None), sent, self.clock()))
        self._written[(ns, name)] = written["metadata"]["resourceVersion"]
        self.metrics.patches.inc()
        st = d.state or before
        log.info(
            "route_patched",
            resource_version=written["metadata"]["resourceVersion"],  # which write is whose, in etcd's history
            step=st.step if st else None,
            phase=st.phase.value if st else None,
            canary_weight=d.canary_pct,
            events=[e.reason for e in d.events],
            **late,
        )
        for e in d.events:
            if e.reason == "WeightsOverwritten":
                self.metrics.overwrites.labels(ns, name).inc()
        for phase in d.transitions:
            self.metrics.transitions.labels(ns, name, phase).inc()
            self.metrics.last_transition.labels(ns, name).set(time.time())
            if phase == Phase.ROLLED_BACK.value:
                self.metrics.rollbacks.labels(ns, name).inc()
        self._observe(obj, st)
        event = coalesce(d.events)  # one Event per write, however many the decision named
        if event is not None:
            self.events.submit(obj, event)
        return True

    def _step_delay(
        self,
        before: RolloutState | None,
        after: RolloutState | None,
        times: tuple[datetime | None, datetime, datetime],
    ) -> dict[str, float]:
        """For a write that takes a scheduled step (moves the step or the phase of a state that planned
        ``next_at``): how late, after ``next_at``, its analysis answered (when it had one), its patch was
        sent and the apiserver acknowledged it; {} for any other write. Due -> sent is the daemon's share
        (waking, the analysis round, deciding); sent -> acknowledged the apiserver's (and our queue to it)."""
        if before is None or after is None or (before.step, before.phase) == (after.step, after.phase):
            return {}
        due = parse_ts(before.next_at)
        analysed, sent, acked = times
        if due is None or sent < due:  # taken early (an intent): not a delay
            return {}
        out: dict[str, float] = {}
        for stage, at in (("analysed", analysed), ("sent", sent), ("acknowledged", acked)):
            if at is not None and at >= due:
                late = (at - due).total_seconds()
                self.metrics.step_delay.labels(stage).observe(late)
                out[f"due_to_{stage}_s"] = round(late, 4)
        return out

    def _observe(self, obj: dict[str, Any], st: RolloutState | None) -> None:
        if st is None:
            return
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        shown = (st.phase.value, st.canary_weight, st.step)
        if self._shown.get((ns, name)) == shown:
            return  # most wake-ups change nothing: skip eight gauge updates per tick
        self._shown[(ns, name)] = shown
        if st.phase.terminal:  # the rollout ended: what its last round judged is no longer being judged
            self.metrics.forget_analysis(ns, name)
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
            await asyncio.gather(events, *self._tasks, return_exceptions=True)
            await self.hooks.aclose()
            await self.notifier.aclose()
