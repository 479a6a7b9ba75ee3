"""Kubernetes Events on the HTTPRoute, so ``kubectl describe httproute`` tells the rollout's story."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog

from canaryd.core.decide import Event
from canaryd.kube import GATEWAY_GROUP, GATEWAY_VERSION, Api
from canaryd.kube.api import send
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
        api: Api,
        component: str = "canaryd",
        instance: str = "",
        *,
        queue_size: int = 10_000,
        senders: int = 4,
        field_manager: str = "canaryd",
    ) -> None:
        self._api = api
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

    def body(self, route: Mapping[str, Any], event: Event) -> dict[str, Any]:
        """A core/v1 Event on the route, as the apiserver reads it (what ``kubectl describe`` lists)."""
        meta = route["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        involved = {
            "apiVersion": f"{GATEWAY_GROUP}/{GATEWAY_VERSION}",
            "kind": "HTTPRoute",
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        }
        source = {"component": self.component, "host": self.instance or None}
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": meta["namespace"]},
            "involvedObject": {k: v for k, v in involved.items() if v is not None},
            "reason": event.reason,
            "message": event.message[:1024],
            "type": event.type,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "source": {k: v for k, v in source.items() if v is not None},
            "reportingComponent": self.component,
            "reportingInstance": self.instance or self.component,
        }

    async def emit(self, route: Mapping[str, Any], event: Event) -> None:
        ns = route["metadata"]["namespace"]
        try:  # the reply is not read: nothing in it is needed
            await send(
                self._api,
                "POST",
                f"/api/v1/namespaces/{ns}/events",
                query={"fieldManager": self.field_manager},
                body=self.body(route, event),
                read=False,
                lane="events",
            )
        except Exception as exc:
            log.warning("event_failed", reason=event.reason, error=str(translate(exc, "create event")))


def coalesce(events: Sequence[Event]) -> Event | None:
    """One Event for what one write did (a thousand routes stepping together make a thousand Events,
    not two thousand): the reason of the first Warning, else of the first Event, and every message in
    order, each after the first led by its own reason. None for no Events."""
    if len(events) <= 1:
        return events[0] if events else None
    ordered = sorted(events, key=lambda e: e.type != "Warning")  # stable: Warnings first, else as decided
    lead = ordered[0]
    message = "; ".join([lead.message, *(f"{e.reason}: {e.message}" for e in ordered[1:])])
    return Event(lead.type, lead.reason, message)
