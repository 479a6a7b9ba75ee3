"""``PrometheusAnalyzer``: the ``Analyzer`` the engine calls, with query batching.

The engine calls ``analyze(target)`` concurrently for every due route. Calls for a batched
signal (envoy, dapr) that arrive within ``batch_window_s`` and share the window are coalesced:
one query per metric for the whole batch (a coarse selector: the batch's namespaces for envoy,
a union of app-ids for dapr), and each route gets its slice. The analyses of one round can
arrive spread over seconds, far beyond the batch window, so answers are also *shared*: a batch
whose (signal, window) matches an answer sent less than ``answer_ttl_s`` ago (at most a tenth of
the window) and whose scope (namespaces / app-ids) that answer covers reuses it, in flight or
done, instead of querying again. Prometheus load therefore grows with the number of distinct
windows (and namespace sets), not with the number of routes. Custom templates run per route.

Never raises for a measurement problem: any ``MetricsError`` (Prometheus down, refused value,
bad template) becomes an Observation with ``error`` set, which the judge turns into ERROR.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from canaryd.core.analysis import AnalysisTarget, Observation
from canaryd.errors import MetricsError
from canaryd.metrics import custom, dapr, envoy
from canaryd.metrics.base import BatchedSignal, batch_key, measure
from canaryd.metrics.dapr import DaprSignal
from canaryd.metrics.envoy import EnvoySignal
from canaryd.metrics.prometheus import PrometheusClient
from canaryd.settings import PrometheusSettings

log = structlog.get_logger()


@dataclass
class _Batch:
    signal: BatchedSignal[Any, Any]
    window_s: float
    items: list[tuple[Any, asyncio.Future[Observation]]] = field(default_factory=list)


@dataclass(eq=False)
class _Answer:
    """A batched answer, shared for ``answer_ttl`` after it was sent."""

    scope: frozenset[str]
    future: asyncio.Future[Any]
    sent_at: float  # monotonic; Prometheus evaluates the query at about this moment


def _failed(fut: asyncio.Future[Any]) -> bool:
    # A failed answer is not shared: the next batch asks again.
    return fut.done() and (fut.cancelled() or fut.exception() is not None)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # Mark the exception retrieved: the callers may all have gone (cancelled) meanwhile.
    if not fut.cancelled():
        fut.exception()


class PrometheusAnalyzer:
    def __init__(
        self,
        settings: PrometheusSettings,
        *,
        client: PrometheusClient | None = None,
    ) -> None:
        self.settings = settings
        self.client = client if client is not None else PrometheusClient(settings)
        self._owns_client = client is None
        self._batched: dict[str, BatchedSignal[Any, Any]] = {
            "envoy": EnvoySignal(settings),
            "dapr": DaprSignal(),
        }
        self._templates = custom.TemplateStore(settings.custom_templates_file)
        self._pending: dict[Hashable, _Batch] = {}
        self._answers: dict[Hashable, list[_Answer]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    async def analyze(self, target: AnalysisTarget) -> list[Observation]:
        observations = await asyncio.gather(*(self.observe(s, target) for s in target.spec.signals))
        return list(observations)

    async def observe(self, signal: str, target: AnalysisTarget) -> Observation:
        try:
            batched = self._batched.get(signal)
            if batched is not None:
                return await self._submit(batched, target)
            if signal.startswith("custom:"):
                template = self._templates.get(signal.removeprefix("custom:"))
                return await custom.measure(self.client, template, target)
            raise MetricsError(f"unknown signal {signal!r}")
        except MetricsError as exc:
            if exc.query is None:  # a failed query was logged by the client, with its PromQL
                log.warning(
                    "analysis_query_failed",
                    signal=signal,
                    namespace=target.namespace,
                    route=target.route,
                    error=str(exc),
                )
            return Observation(signal, canary=None, stable=None, error=str(exc))

    def no_series_hint(self, signal: str, target: AnalysisTarget) -> str:
        """Why a signal can find no series for either backend, and where to look (``canaryd check``)."""
        if signal == "envoy":
            t = self._batched["envoy"].prepare(target)
            return (
                f"no {envoy.REQUESTS} series with {self.settings.envoy_cluster_label} matching {t.canary} (or the "
                "stable's): this Prometheus does not scrape Envoy (with Cilium: enable Envoy's metrics and scrape "
                "cilium-envoy), or the cluster names differ from prometheus.envoy_cluster_pattern"
            )
        if signal == "dapr":
            ids = ", ".join(a for a in (target.spec.app_id, target.spec.stable_app_id) if a)
            return (
                f"no {dapr.SENT} or {dapr.RECEIVED} series for app-id {ids}: this Prometheus does not scrape "
                "the callers' daprd, or canaryd.io/app-id is not the callee's Dapr app-id"
            )
        return (
            f"the requests query of {signal} answered no series for either backend: check the metric and "
            "label names in the template"
        )

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._owns_client:
            self.client.close()

    async def _submit(self, signal: BatchedSignal[Any, Any], target: AnalysisTarget) -> Observation:
        # Validate before joining: a refused value fails only its own route, not the batch.
        prepared = signal.prepare(target)
        window_s = target.spec.window_s
        key = batch_key(signal.name, window_s)
        batch = self._pending.get(key)
        if batch is None:
            batch = _Batch(signal, window_s)
            self._pending[key] = batch
            task = asyncio.create_task(self._flush_later(key, batch), name=f"analysis-batch-{signal.name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        fut: asyncio.Future[Observation] = asyncio.get_running_loop().create_future()
        batch.items.append((prepared, fut))
        return await fut

    async def _flush_later(self, key: Hashable, batch: _Batch) -> None:
        try:
            try:
                await asyncio.sleep(self.settings.batch_window_s)
            finally:
                # Later calls start a new batch; this one is closed from here on.
                if self._pending.get(key) is batch:
                    del self._pending[key]
            size = max(1, self.settings.batch_max_targets)
            chunks = [batch.items[i : i + size] for i in range(0, len(batch.items), size)]
            await asyncio.gather(*(self._run(batch, chunk) for chunk in chunks))
        except asyncio.CancelledError:
            # Shutting down: release the callers instead of leaving them waiting.
            for _, fut in batch.items:
                fut.cancel()
            raise

    def answer_ttl(self, window_s: float) -> float:
        """How long an answer for ``window_s`` may be shared (0 = not at all)."""
        return max(0.0, min(self.settings.answer_ttl_s, window_s / 10))

    async def _measure(self, signal: BatchedSignal[Any, Any], window_s: float, items: list[Any]) -> list[Observation]:
        ttl = self.answer_ttl(window_s)
        if ttl <= 0:
            return await measure(signal, self.client, window_s, items)
        scope = signal.scope(items)
        key = batch_key(signal.name, window_s)
        now = time.monotonic()
        answers = self._answers.setdefault(key, [])
        shared = next(
            (a for a in answers if now - a.sent_at < ttl and scope <= a.scope and not _failed(a.future)),
            None,
        )
        if shared is None:
            task = asyncio.create_task(signal.fetch(self.client, window_s, scope), name=f"analysis-fetch-{signal.name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(_retrieve)
            shared = _Answer(scope, task, now)
            answers.append(shared)
            asyncio.get_running_loop().call_later(ttl, self._expire, key, shared)
        # Shielded: one caller being cancelled must not cancel the answer the others wait for.
        index = await asyncio.shield(shared.future)
        return signal.match(index, items)

    def _expire(self, key: Hashable, answer: _Answer) -> None:
        answers = self._answers.get(key)
        if answers is not None and answer in answers:
            answers.remove(answer)
            if not answers:
                del self._answers[key]

    async def _run(self, batch: _Batch, chunk: Sequence[tuple[Any, asyncio.Future[Observation]]]) -> None:
        started = time.monotonic()
        try:
            results = await self._measure(batch.signal, batch.window_s, [p for p, _ in chunk])
        except MetricsError as exc:
            results = [Observation(batch.signal.name, None, None, error=str(exc))] * len(chunk)
        except Exception as exc:  # a bug must not leave the callers waiting forever
            log.exception("analysis_batch_crashed", signal=batch.signal.name)
            msg = f"internal error measuring {batch.signal.name}: {exc!r}"
            results = [Observation(batch.signal.name, None, None, error=msg)] * len(chunk)
        log.debug(
            "analysis_batch",
            signal=batch.signal.name,
            routes=len(chunk),
            window_s=batch.window_s,
            seconds=round(time.monotonic() - started, 3),
        )
        for (_, fut), obs in zip(chunk, results, strict=True):
            if not fut.done():  # the caller may have been cancelled meanwhile
                fut.set_result(obs)
