"""Builders for the ordinary Kubernetes objects tests need.

Tests about readiness use real workloads (``deployment_backend``): a Deployment whose Pods the
real controllers, scheduler and kwok take to Ready, and the real EndpointSlice controller's
slices. ``create_backend`` writes a hand-made slice instead, for tests that are not about
readiness and only need a Service that counts as ready now.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from kubernetes_asyncio import client

from canaryd.engine import Engine
from canaryd.kube import GATEWAY_GROUP, GATEWAY_VERSION, HTTPROUTES
from canaryd.metrics import PrometheusAnalyzer
from canaryd.settings import PrometheusSettings, Settings

T = TypeVar("T")


def route_body(
    name: str,
    *,
    parent: str = "whoami",
    backends: tuple[tuple[str, int], ...] = (("whoami-v1", 100), ("whoami-v2", 0)),
    annotations: dict[str, str] | None = None,
    extra_rules: list[dict[str, Any]] | None = None,
    parent_kind: str = "Service",
) -> dict[str, Any]:
    parent_ref: dict[str, Any] = (
        {"group": "", "kind": "Service", "name": parent, "port": 80} if parent_kind == "Service" else {"name": parent}
    )
    return {
        "apiVersion": f"{GATEWAY_GROUP}/{GATEWAY_VERSION}",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "annotations": annotations or {}, "labels": {"app": "whoami"}},
        "spec": {
            "parentRefs": [parent_ref],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "filters": [
                        {
                            "type": "RequestHeaderModifier",
                            "requestHeaderModifier": {"set": [{"name": "x-route", "value": name}]},
                        }
                    ],
                    "backendRefs": [{"name": b, "port": 80, "weight": w} for b, w in backends],
                },
                *(extra_rules or []),
            ],
        },
    }


async def create_route(api: client.ApiClient, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    co = client.CustomObjectsApi(api)
    out: dict[str, Any] = await co.create_namespaced_custom_object(
        GATEWAY_GROUP, GATEWAY_VERSION, namespace, HTTPROUTES, body
    )
    return out


async def get_route(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    co = client.CustomObjectsApi(api)
    out: dict[str, Any] = await co.get_namespaced_custom_object(
        GATEWAY_GROUP, GATEWAY_VERSION, namespace, HTTPROUTES, name
    )
    return out


async def patch_route(api: client.ApiClient, namespace: str, name: str, body: Any) -> dict[str, Any]:
    co = client.CustomObjectsApi(api)
    kw: dict[str, Any] = {} if isinstance(body, list) else {"_content_type": "application/merge-patch+json"}
    out: dict[str, Any] = await co.patch_namespaced_custom_object(
        GATEWAY_GROUP, GATEWAY_VERSION, namespace, HTTPROUTES, name, body, **kw
    )
    return out


async def create_backend(
    api: client.ApiClient,
    namespace: str,
    name: str,
    *,
    port: int = 80,
    ready: bool = True,
    target_port: int | None = None,
) -> None:
    """A selector-less Service and (if ``ready``) a hand-made EndpointSlice with one ready endpoint.

    For tests that are not about readiness: no Pods to wait for. The apiserver refuses loopback
    endpoint addresses, so a TEST-NET-1 address stands in; nothing dials it.
    """
    core = client.CoreV1Api(api)
    await core.create_namespaced_service(
        namespace,
        client.V1Service(
            metadata=client.V1ObjectMeta(name=name),
            spec=client.V1ServiceSpec(ports=[client.V1ServicePort(port=port, name="http")]),
        ),
    )
    if ready:
        await set_endpoints(api, namespace, name, ready=True, port=target_port or port)


async def set_endpoints(api: client.ApiClient, namespace: str, service: str, *, ready: bool, port: int = 80) -> None:
    disc = client.DiscoveryV1Api(api)
    body = client.V1EndpointSlice(
        metadata=client.V1ObjectMeta(name=f"{service}-local", labels={"kubernetes.io/service-name": service}),
        address_type="IPv4",
        endpoints=[client.V1Endpoint(addresses=["192.0.2.10"], conditions=client.V1EndpointConditions(ready=ready))],
        ports=[client.DiscoveryV1EndpointPort(name="http", port=port, protocol="TCP")],
    )
    try:
        await disc.create_namespaced_endpoint_slice(namespace, body)
    except client.ApiException as exc:
        if exc.status != 409:
            raise
        await disc.replace_namespaced_endpoint_slice(f"{service}-local", namespace, body)


async def deployment_backend(api: client.ApiClient, namespace: str, name: str, *, replicas: int) -> None:
    """A Service selecting the Pods of a Deployment of ``replicas`` (kwok runs them; nothing listens)."""
    labels = {"app.kubernetes.io/name": name}
    await client.CoreV1Api(api).create_namespaced_service(
        namespace,
        client.V1Service(
            metadata=client.V1ObjectMeta(name=name),
            spec=client.V1ServiceSpec(
                selector=labels, ports=[client.V1ServicePort(port=80, name="http", target_port="http")]
            ),
        ),
    )
    container = client.V1Container(
        name="app", image="traefik/whoami:v1.11", ports=[client.V1ContainerPort(name="http", container_port=80)]
    )
    await client.AppsV1Api(api).create_namespaced_deployment(
        namespace,
        client.V1Deployment(
            metadata=client.V1ObjectMeta(name=name, labels=labels),
            spec=client.V1DeploymentSpec(
                replicas=replicas,
                selector=client.V1LabelSelector(match_labels=labels),
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels=labels), spec=client.V1PodSpec(containers=[container])
                ),
            ),
        ),
    )


async def scale(api: client.ApiClient, namespace: str, name: str, replicas: int) -> None:
    await client.AppsV1Api(api).patch_namespaced_deployment_scale(name, namespace, {"spec": {"replicas": replicas}})


async def ready_addresses(api: client.ApiClient, namespace: str, service: str) -> list[str]:
    """The ready endpoint addresses of ``service``, as its EndpointSlices list them now."""
    out = await client.DiscoveryV1Api(api).list_namespaced_endpoint_slice(
        namespace, label_selector=f"kubernetes.io/service-name={service}"
    )
    return sorted(
        a
        for s in out.items
        for e in s.endpoints or []
        if e.conditions is None or e.conditions.ready is not False
        for a in e.addresses
    )


def weights(route: dict[str, Any], rule: int = 0) -> dict[str, int]:
    return {b["name"]: b.get("weight", 1) for b in route["spec"]["rules"][rule]["backendRefs"]}


async def eventually(
    fn: Callable[[], Awaitable[T | None]], *, timeout: float, interval: float = 0.1, what: str = "condition"
) -> T:
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await fn()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


async def route_events(api: client.ApiClient, namespace: str, name: str) -> list[client.CoreV1Event]:
    core = client.CoreV1Api(api)
    evs = await core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
    return sorted(evs.items, key=lambda e: int(e.metadata.resource_version))  # creation order


async def wait_events(
    api: client.ApiClient, namespace: str, name: str, reason: str, timeout: float = 15
) -> list[client.CoreV1Event]:
    """The route's Events with ``reason``, waiting for the first (Events follow the patch that caused them)."""

    async def found() -> list[client.CoreV1Event] | None:
        return [e for e in await route_events(api, namespace, name) if e.reason == reason] or None

    return await eventually(found, timeout=timeout, what=f"a {reason} event on {namespace}/{name}")


@asynccontextmanager
async def running_engine(
    api: client.ApiClient,
    namespace: str,
    *,
    prometheus_url: str | None = None,
    analyzer: bool = False,
    **settings_overrides: Any,
) -> AsyncIterator[Engine]:
    """The real controller in-process, watching one namespace, cancelled on exit."""
    settings = Settings(
        leader_election=False,
        namespaces=[namespace],
        prometheus=PrometheusSettings(url=prometheus_url or "http://127.0.0.1:9"),
        **settings_overrides,
    )
    prom = PrometheusAnalyzer(settings.prometheus) if analyzer else None
    engine = Engine(api, settings, analyzer=prom)
    task = asyncio.create_task(engine.run(), name=f"engine {namespace}")
    try:
        yield engine
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if prom is not None:
            await prom.aclose()
