"""Kubernetes Events on the HTTPRoute, so ``kubectl describe httproute`` tells the rollout's story."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from canaryd.core.decide import Event
from canaryd.kube import GATEWAY_GROUP, GATEWAY_VERSION
from canaryd.kube.errors import translate

log = structlog.get_logger("canaryd.kube.events")


class EventRecorder:
    """Creates Events off the rollout's critical path.

    ``submit`` queues (bounded; a full queue drops the Event with a log line, since the state
    annotation is the record) and ``run`` sends them with a few requests in flight, so a
    thousand routes stepping at once get their weight patches to the apiserver first. One
    route's Events always go through the same sender, so they keep their order.
    """

    def __init__(
        self,
        api: client.ApiClient,
        component: str = "canaryd",
        instance: str = "",
        *,
        queue_size: int = 10_000,
        senders: int = 4,
        field_manager: str = "canaryd",
    ) -> None:
        self._core = client.CoreV1Api(api)
        self.component = component
        self.instance = instance
        self.field_manager = field_manager  # named on every write, not left to the apiserver's guess
        self._queues: list[asyncio.Queue[tuple[Mapping[str, Any], Event]]] = [
            asyncio.Queue(maxsize=max(1, queue_size // senders)) for _ in range(max(1, senders))
        ]
        self.dropped = 0

    def submit(self, route: Mapping[str, Any], event: Event) -> None:
        meta = route["metadata"]
        queue = self._queues[hash((meta["namespace"], meta["name"])) % len(self._queues)]
        try:
            queue.put_nowait((route, event))
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("event_dropped", reason=event.reason, queued=queue.qsize())

    async def run(self) -> None:
        """Send queued Events until cancelled; on cancel, flush what is queued (bounded in time)."""

        async def sender(queue: asyncio.Queue[tuple[Mapping[str, Any], Event]]) -> None:
            while True:
                route, event = await queue.get()
                await self.emit(route, event)

        tasks = [asyncio.create_task(sender(q), name=f"events-{i}") for i, q in enumerate(self._queues)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.flush(timeout_s=2.0)

    async def flush(self, timeout_s: float) -> None:
        """Send what is still queued, directly, for at most ``timeout_s`` (shutdown)."""

        async def drain() -> None:
            for queue in self._queues:
                while not queue.empty():
                    route, event = queue.get_nowait()
                    await self.emit(route, event)

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(drain(), timeout_s)

    async def emit(self, route: Mapping[str, Any], event: Event) -> None:
        meta = route["metadata"]
        now = datetime.now(UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(name=f"{meta['name']}.{secrets.token_hex(8)}", namespace=meta["namespace"]),
            involved_object=client.V1ObjectReference(
                api_version=f"{GATEWAY_GROUP}/{GATEWAY_VERSION}",
                kind="HTTPRoute",
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta.get("uid"),
                resource_version=meta.get("resourceVersion"),
            ),
            reason=event.reason,
            message=event.message[:1024],
            type=event.type,
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            source=client.V1EventSource(component=self.component, host=self.instance or None),
            reporting_component=self.component,
            reporting_instance=self.instance or self.component,
        )
        try:
            # The reply is not read: skip turning it into model objects (costly at scale).
            resp: Any = await self._core.create_namespaced_event(
                meta["namespace"], body, field_manager=self.field_manager, _preload_content=False
            )
            try:
                if not 200 <= resp.status <= 299:
                    err = ApiException(status=resp.status, reason=resp.reason)
                    err.body = await resp.read()
                    log.warning("event_failed", reason=event.reason, error=str(translate(err, "create event")))
            finally:
                resp.release()
        except Exception as exc:
            log.warning("event_failed", reason=event.reason, error=str(translate(exc, "create event")))
