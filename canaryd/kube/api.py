"""Resource calls as plain dicts, each translated into ``canaryd.errors`` once.

The engine, ``canaryd check`` and the CLI use these instead of the generated client classes, so the
client library stays behind ``canaryd.kube`` and every caller gets the same error family. The daemon's
calls (``request``: lists, watches, route reads and patches, Events) build the path here and send it
through ``Api.transport``; none of them imports a generated API class or model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Mapping
from functools import partial
from typing import Any, Literal, NoReturn, TypeVar

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import kube_config

from canaryd.core.backends import SERVICE_NAME_LABEL
from canaryd.kube import GATEWAY_GROUP, GATEWAY_VERSION, HTTPROUTES, Api
from canaryd.kube.errors import translate
from canaryd.kube.informer import ListFn
from canaryd.kube.transport import Lane

T = TypeVar("T")
Kind = Literal["httproutes", "services", "endpointslices"]
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"

# The collection path of each kind, in one namespace ({ns}) or all.
_PATHS: dict[str, tuple[str, str]] = {
    "httproutes": (
        f"/apis/{GATEWAY_GROUP}/{GATEWAY_VERSION}/namespaces/{{ns}}/{HTTPROUTES}",
        f"/apis/{GATEWAY_GROUP}/{GATEWAY_VERSION}/{HTTPROUTES}",
    ),
    "services": ("/api/v1/namespaces/{ns}/services", "/api/v1/services"),
    "endpointslices": (
        "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
        "/apis/discovery.k8s.io/v1/endpointslices",
    ),
}
# The client's keyword arguments for list and watch, as the API's query parameters.
_QUERY = {
    "label_selector": "labelSelector",
    "field_selector": "fieldSelector",
    "resource_version": "resourceVersion",
    "allow_watch_bookmarks": "allowWatchBookmarks",
    "timeout_seconds": "timeoutSeconds",
    "watch": "watch",
    "field_manager": "fieldManager",
    "limit": "limit",
    "_continue": "continue",
}


async def call(what: str, coro: Awaitable[T]) -> T:
    """Await ``coro``; any failure comes back as the family member that says what went wrong."""
    try:
        return await coro
    except Exception as exc:
        raise translate(exc, what) from exc


def refused(status: int, reason: str | None, body: bytes) -> NoReturn:
    """Raise what the library raises for a non-2xx answer, so ``translate`` reads it the same way."""
    exc = ApiException(status=status, reason=reason)
    exc.body = body
    raise exc


def query_of(params: Mapping[str, Any]) -> dict[str, str]:
    """The client's keyword arguments (``label_selector=...``) as query parameters; unset ones left out."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = _QUERY.get(key)
        if value is None or (name is None and key.startswith("_")):  # _preload_content: the client's own option
            continue
        if name is None:
            raise TypeError(f"unexpected list/watch argument {key!r}")
        out[name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


async def send(
    api: Api,
    method: str,
    path: str,
    *,
    query: Mapping[str, str] | None = None,
    body: Any = None,
    content_type: str = "application/json",
    read: bool = True,
    lane: Lane = "requests",
) -> Any:
    """One call through ``api.transport``: the reply as a dict (read but not parsed, None, when ``read`` is False).
    Failures are the library's and aiohttp's own exceptions, for the caller to ``translate`` with its ``what``."""
    resp = await api.transport.send(method, path, query=query, body=body, content_type=content_type, lane=lane)
    try:
        data = await resp.read()  # read even when unused: a connection whose reply was not read is closed
        if not 200 <= resp.status <= 299:
            refused(resp.status, resp.reason, data)
        return json.loads(data) if read else None
    finally:
        resp.release()


async def request(api: Api, method: str, path: str, what: str, **kw: Any) -> Any:
    """``send``, with any failure translated into the family (``what`` names the call)."""
    return await call(what, send(api, method, path, **kw))


async def _list(api: Api, path: str, **params: Any) -> Any:
    """A list (a dict) or, with ``watch=True``, the open watch response (a stream of JSON lines)."""
    query = query_of(params)
    if not params.get("watch"):
        return await send(api, "GET", path, query=query)
    resp = await api.transport.send("GET", path, query=query, lane="watches")
    if not 200 <= resp.status <= 299:  # e.g. 404 once the CRD is gone: not a stream of events
        try:
            refused(resp.status, resp.reason, await resp.read())
        finally:
            resp.release()
    return resp


def lister(api: Api, kind: Kind, namespace: str | None) -> tuple[ListFn, tuple[Any, ...]]:
    """The list function (and its leading arguments) for an ``Informer`` of ``kind``."""
    one, every = _PATHS[kind]
    return partial(_list, api, one.format(ns=namespace) if namespace else every), ()


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


def route_path(namespace: str, name: str) -> str:
    return _PATHS["httproutes"][0].format(ns=namespace) + f"/{name}"


async def get_route(api: Api, namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = await request(api, "GET", route_path(namespace, name), f"get httproute {namespace}/{name}")
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
    obj: dict[str, Any] = await request(
        api,
        "PATCH",
        route_path(namespace, name),
        f"patch httproute {namespace}/{name}",
        query={"fieldManager": field_manager},
        body=body,
        content_type=content_type,
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
