"""Resource calls as plain dicts, each translated into ``canaryd.errors`` once.

The engine, ``canaryd check`` and the CLI use these instead of the generated client classes, so the
client library stays behind ``canaryd.kube`` and every caller gets the same error family.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable
from typing import Any, Literal, TypeVar

from kubernetes_asyncio import client
from kubernetes_asyncio.config import kube_config

from canaryd.core.backends import SERVICE_NAME_LABEL
from canaryd.kube import GATEWAY_GROUP, GATEWAY_VERSION, HTTPROUTES, Api
from canaryd.kube.errors import translate
from canaryd.kube.informer import ListFn, raw

T = TypeVar("T")
Kind = Literal["httproutes", "services", "endpointslices"]
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"


async def call(what: str, coro: Awaitable[T]) -> T:
    """Await ``coro``; any failure comes back as the family member that says what went wrong."""
    try:
        return await coro
    except Exception as exc:
        raise translate(exc, what) from exc


def lister(api: Api, kind: Kind, namespace: str | None) -> tuple[ListFn, tuple[Any, ...]]:
    """The raw list function (and its leading arguments) for an ``Informer`` of ``kind``."""
    if kind == "httproutes":
        co = client.CustomObjectsApi(api)
        if namespace is None:
            return raw(co.list_cluster_custom_object), (GATEWAY_GROUP, GATEWAY_VERSION, HTTPROUTES)
        return raw(co.list_namespaced_custom_object), (GATEWAY_GROUP, GATEWAY_VERSION, namespace, HTTPROUTES)
    if kind == "services":
        core = client.CoreV1Api(api)
        if namespace is None:
            return raw(core.list_service_for_all_namespaces), ()
        return raw(core.list_namespaced_service), (namespace,)
    disc = client.DiscoveryV1Api(api)
    if namespace is None:
        return raw(disc.list_endpoint_slice_for_all_namespaces), ()
    return raw(disc.list_namespaced_endpoint_slice), (namespace,)


async def list_objects(
    api: Api, kind: Kind, namespace: str | None, *, label_selector: str | None = None, name: str | None = None
) -> tuple[list[dict[str, Any]], str]:
    """Objects of ``kind`` (one namespace, or all with ``None``) and the list's resourceVersion."""
    fn, args = lister(api, kind, namespace)
    kw: dict[str, Any] = {}
    if label_selector:
        kw["label_selector"] = label_selector
    if name:
        kw["field_selector"] = f"metadata.name={name}"
    where = f"in namespace {namespace}" if namespace else "in all namespaces"
    out: dict[str, Any] = await call(f"list {kind} {where}", fn(*args, **kw))
    return list(out.get("items") or []), str(out["metadata"]["resourceVersion"])


async def get_route(api: Api, namespace: str, name: str) -> dict[str, Any]:
    co = client.CustomObjectsApi(api)
    obj: dict[str, Any] = await call(
        f"get httproute {namespace}/{name}",
        co.get_namespaced_custom_object(GATEWAY_GROUP, GATEWAY_VERSION, namespace, HTTPROUTES, name),
    )
    return obj


async def patch_route(
    api: Api,
    namespace: str,
    name: str,
    body: list[dict[str, Any]] | dict[str, Any],
    *,
    field_manager: str,
    content_type: str = JSON_PATCH,
) -> dict[str, Any]:
    """A JSON patch (ops) or a merge patch (a dict) of one HTTPRoute, under ``field_manager``."""
    co = client.CustomObjectsApi(api)
    options: dict[str, Any] = {"_content_type": content_type}  # a client option the typed signature leaves out
    obj: dict[str, Any] = await call(
        f"patch httproute {namespace}/{name}",
        co.patch_namespaced_custom_object(
            GATEWAY_GROUP,
            GATEWAY_VERSION,
            namespace,
            HTTPROUTES,
            name,
            body,
            field_manager=field_manager,
            **options,
        ),
    )
    return obj


async def service_slices(api: Api, namespace: str, service: str) -> list[dict[str, Any]]:
    items, _ = await list_objects(api, "endpointslices", namespace, label_selector=f"{SERVICE_NAME_LABEL}={service}")
    return items


async def route_events(api: Api, namespace: str, name: str) -> list[dict[str, Any]]:
    core = client.CoreV1Api(api)
    evs = await call(
        f"list events of httproute {namespace}/{name}",
        core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.kind=HTTPRoute,involvedObject.name={name}"
        ),
    )
    return [api.sanitize_for_serialization(e) for e in evs.items]


async def allowed(
    api: Api, *, group: str, resource: str, verb: str, namespace: str | None, name: str | None = None
) -> bool:
    """SelfSubjectAccessReview: may the client's identity do ``verb`` on ``resource`` (the object ``name``,
    which a rule limited by ``resourceNames`` needs; None = any object)?"""
    authz = client.AuthorizationV1Api(api)
    body = client.V1SelfSubjectAccessReview(
        spec=client.V1SelfSubjectAccessReviewSpec(
            resource_attributes=client.V1ResourceAttributes(
                group=group, resource=resource, verb=verb, namespace=namespace or None, name=name or None
            )
        )
    )
    out = await call("create selfsubjectaccessreview", authz.create_self_subject_access_review(body))
    return bool(out.status.allowed)


def kubeconfig_namespace(kubeconfig: str | None, context: str | None) -> str:
    """The namespace of the kubeconfig context (kubectl's rule), the pod's own in-cluster, else 'default'."""
    path = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    if os.path.exists(path):
        try:
            contexts, active = kube_config.list_kube_config_contexts(config_file=path)
        except Exception:
            return "default"
        chosen = next((c for c in contexts if c.get("name") == context), None) if context else active
        ns = ((chosen or {}).get("context") or {}).get("namespace")
        return str(ns) if ns else "default"
    if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(SA_NAMESPACE_FILE):
        with open(SA_NAMESPACE_FILE) as f:
            return f.read().strip() or "default"
    return "default"
