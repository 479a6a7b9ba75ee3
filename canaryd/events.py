"""Kubernetes Events on the HTTPRoute, so ``kubectl describe httproute`` tells the rollout's story."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from canaryd.decide import Event
from canaryd.kube import GATEWAY_GROUP, GATEWAY_VERSION, translate

log = structlog.get_logger("canaryd.events")


class EventRecorder:
    def __init__(self, api: client.ApiClient, component: str = "canaryd", instance: str = "") -> None:
        self._core = client.CoreV1Api(api)
        self.component = component
        self.instance = instance

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
            resp: Any = await self._core.create_namespaced_event(meta["namespace"], body, _preload_content=False)
            try:
                if not 200 <= resp.status <= 299:
                    err = ApiException(status=resp.status, reason=resp.reason)
                    err.body = await resp.read()
                    log.warning("event_failed", reason=event.reason, error=str(translate(err, "create event")))
            finally:
                resp.release()
        except Exception as exc:
            log.warning("event_failed", reason=event.reason, error=str(translate(exc, "create event")))
