"""A local GAMMA data plane: what Cilium's Envoy does for Service-parented HTTPRoutes, locally.

Reads (list + watch with resourceVersion, re-list on 410 Gone) in one namespace:

* HTTPRoutes (gateway.networking.k8s.io/v1) with a parentRef ``{group: "", kind: Service}``;
* Services (to map a backendRef port to the EndpointSlice port by port name);
* EndpointSlices labelled ``kubernetes.io/service-name`` — the backends' endpoints.

**Local endpoints.** The apiserver refuses loopback addresses in EndpointSlices of addressType
IPv4/IPv6 ("may not be in the loopback range"), so local backends are selector-less Services
whose EndpointSlice has ``addressType: FQDN`` and addresses under the reserved ``.localhost``
domain (RFC 6761), e.g. ``whoami-v1.localhost``; the data plane maps those to 127.0.0.1
itself (no DNS). Loopback IPs are accepted too; anything else is ignored (logged once) —
this data plane never sends traffic off the host. ``local_backend_objects()`` builds such
objects, ``apply_local_backend()`` creates them.

**Listeners.** One HTTP listener per parent Service, on 127.0.0.1. ``listen={"whoami": 18080}``
binds those at ``start()`` (port 0 = a free port; read ``ports``); parents not in the mapping
are not served. ``listen=None`` binds a free port for every parent Service as it appears.
The admin listener serves ``/metrics``, ``/routes`` (JSON: listeners and routing table) and
``/healthz``.

**Routing.** For a request on parent P: among the rules of P's HTTPRoutes (routes ordered by
creation time, then name) the rule with the longest matching ``PathPrefix`` wins (a rule without
matches matches ``/``; other match types are ignored); ties go to the first. A backendRef is
chosen by weighted random (weight 0 = no traffic; default weight 1). All weights 0 → 500; no
rule → 404; chosen backend without ready endpoints → 503 for its share (as Envoy's "no healthy
upstream"). The routing table is an immutable snapshot swapped on every watch event and read
once per request, so a weight change never splits one request across two tables. A connection
error is retried once on another ready endpoint of the same backend (the same one if it is
alone); still failing → 503. Every request gets an answer carrying
``x-canaryd-backend: <service>`` when a backend was chosen.

**Metrics** (text format 0.0.4, own ``CollectorRegistry``), per request — not per attempt:

* Cilium Envoy: ``envoy_cluster_upstream_rq{envoy_cluster_name, envoy_response_code}``,
  ``envoy_cluster_upstream_rq_xx{envoy_cluster_name, envoy_response_code_class}``,
  ``envoy_cluster_upstream_rq_total{envoy_cluster_name}``,
  ``envoy_cluster_upstream_rq_time_bucket/_sum/_count{envoy_cluster_name, le}`` (ms) with
  ``envoy_cluster_name = "<ns>/<parent>/<ns>:<svc>:<port>"``. The first two are exposed as
  ``untyped``: prometheus_client forces ``_total`` onto counter names, Envoy does not. PromQL
  treats them the same.
* A shared Dapr sidecar calling the parent Service: ``dapr_runtime_service_invocation_req_sent_total
  {app_id, dst_app_id, type}``, ``..._res_recv_total{app_id, src_app_id, status, type}``,
  ``..._res_recv_latency_ms_bucket/_sum/_count{app_id, src_app_id, status, le}``.
  ``app_id`` = the request header ``dapr-caller-app-id``, else ``caller_app_id``
  (default ``ingress``); ``dst_app_id``/``src_app_id`` = the route's ``canaryd.io/app-id``
  annotation, else the parent Service name; ``type="unary"``. Dapr sees every version of the
  service together (the split happens after it); a locally generated 503 is a response too.

Run: ``python -m devkit.demo.dataplane --kubeconfig K --namespace N [--listen whoami=0]
[--admin-port 0]``; prints ``{"event": "dataplane_ready", "admin_port": .., "listeners": {..}}``
on stdout once the first lists are applied and every listener is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import random
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from canaryd.core.spec import APP_ID
from canaryd.kube import GATEWAY_GROUP, GATEWAY_VERSION, HTTPROUTES, new_client
from canaryd.kube.informer import Informer
from canaryd.kube.informer import raw as raw_list

log = structlog.get_logger("devkit.demo.dataplane")

BACKEND_HEADER = "x-canaryd-backend"
CALLER_HEADER = "dapr-caller-app-id"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "demo.canaryd.io"
LOCAL_DOMAIN = "localhost"
LOOPBACK = "127.0.0.1"

# Envoy's default histogram buckets (ms) and Dapr's default latency distribution (ms).
ENVOY_BUCKETS_MS: tuple[float, ...] = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)
DAPR_BUCKETS_MS: tuple[float, ...] = (
    1,
    2,
    3,
    4,
    5,
    6,
    8,
    10,
    13,
    16,
    20,
    25,
    30,
    40,
    50,
    65,
    80,
    100,
    130,
    160,
    200,
    250,
    300,
    400,
    500,
    650,
    800,
    1000,
    2000,
    5000,
    10000,
    20000,
    50000,
    100000,
)
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


# --------------------------------------------------------------------------- routing table (pure)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


@dataclass(frozen=True)
class Backend:
    service: str
    port: int
    weight: int
    cluster: str  # Envoy cluster name, "<ns>/<parent>/<ns>:<svc>:<port>"


@dataclass(frozen=True)
class Rule:
    prefixes: tuple[str, ...]  # PathPrefix values; ("/",) when the rule has no path match
    backends: tuple[Backend, ...]

    @property
    def total_weight(self) -> int:
        return sum(b.weight for b in self.backends)

    def match_length(self, path: str) -> int:
        """Length of the longest matching prefix, -1 when none matches."""
        best = -1
        for p in self.prefixes:
            if _prefix_matches(p, path):
                best = max(best, len(p))
        return best


@dataclass(frozen=True)
class ParentRoutes:
    parent: str
    app_id: str
    routes: tuple[str, ...]  # names of the HTTPRoutes attached, in precedence order
    rules: tuple[Rule, ...]

    def rule_for(self, path: str) -> Rule | None:
        best: Rule | None = None
        best_len = -1
        for r in self.rules:
            n = r.match_length(path)
            if n > best_len:
                best, best_len = r, n
        return best


@dataclass(frozen=True)
class Table:
    """One immutable snapshot of everything the proxy needs; replaced, never mutated."""

    namespace: str
    parents: Mapping[str, ParentRoutes] = field(default_factory=dict)
    endpoints: Mapping[tuple[str, int], tuple[Endpoint, ...]] = field(default_factory=dict)
    version: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "parents": {
                p: {
                    "app_id": pr.app_id,
                    "routes": list(pr.routes),
                    "rules": [
                        {
                            "prefixes": list(r.prefixes),
                            "backends": [
                                {
                                    "service": b.service,
                                    "port": b.port,
                                    "weight": b.weight,
                                    "cluster": b.cluster,
                                    "endpoints": [
                                        f"{e.host}:{e.port}" for e in self.endpoints.get((b.service, b.port), ())
                                    ],
                                }
                                for b in r.backends
                            ],
                        }
                        for r in pr.rules
                    ],
                }
                for p, pr in sorted(self.parents.items())
            },
        }


def _prefix_matches(prefix: str, path: str) -> bool:
    """Gateway API PathPrefix: element-wise; '/foo' matches '/foo' and '/foo/bar', not '/foobar'."""
    p = prefix.rstrip("/")
    if not p:
        return True
    return path == p or path.startswith(p + "/")


def cluster_name(namespace: str, parent: str, service: str, port: int) -> str:
    return f"{namespace}/{parent}/{namespace}:{service}:{port}"


def _service_parents(route: Mapping[str, Any], namespace: str) -> list[str]:
    out: list[str] = []
    for ref in route.get("spec", {}).get("parentRefs") or []:
        if ref.get("group", "gateway.networking.k8s.io") != "" or ref.get("kind") != "Service":
            continue
        if ref.get("namespace", namespace) != namespace:
            continue
        out.append(str(ref["name"]))
    return out


def _route_rules(route: Mapping[str, Any], namespace: str, parent: str) -> list[Rule]:
    rules: list[Rule] = []
    for raw in route.get("spec", {}).get("rules") or []:
        prefixes: list[str] = []
        matches = raw.get("matches") or []
        for m in matches:
            path = m.get("path")
            if path is None:
                prefixes.append("/")
            elif path.get("type", "PathPrefix") == "PathPrefix":
                prefixes.append(str(path.get("value", "/")))
        if matches and not prefixes:
            continue  # only match types we do not implement: the rule is not served
        backends: list[Backend] = []
        for ref in raw.get("backendRefs") or []:
            if ref.get("group", "") != "" or ref.get("kind", "Service") != "Service":
                continue
            if ref.get("namespace", namespace) != namespace:
                continue
            svc, port = str(ref["name"]), int(ref.get("port", 0))
            backends.append(
                Backend(
                    service=svc,
                    port=port,
                    weight=int(ref.get("weight", 1)),
                    cluster=cluster_name(namespace, parent, svc, port),
                )
            )
        rules.append(Rule(prefixes=tuple(prefixes or ["/"]), backends=tuple(backends)))
    return rules


def _local_host(address: str, address_type: str) -> str | None:
    """127.0.0.1 (or the loopback IP) for a local endpoint address, None for anything else."""
    if address_type == "FQDN":
        name = address.rstrip(".").lower()
        return LOOPBACK if name == LOCAL_DOMAIN or name.endswith("." + LOCAL_DOMAIN) else None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    return str(ip) if ip.is_loopback and ip.version == 4 else None


def _resolve_endpoints(  # noqa: C901 - mirrors the EndpointSlice rules one by one
    service: str,
    port: int,
    services: Mapping[str, Mapping[str, Any]],
    slices: Iterable[Mapping[str, Any]],
    refused: set[str],
) -> tuple[Endpoint, ...]:
    svc = services.get(service)
    port_name: str | None = None
    if svc is not None:
        for sp in svc.get("spec", {}).get("ports") or []:
            if int(sp.get("port", 0)) == port:
                port_name = sp.get("name") or ""
                break
        else:
            return ()  # the Service has no such port
    out: list[Endpoint] = []
    for sl in slices:
        if (sl.get("metadata", {}).get("labels") or {}).get(SERVICE_NAME_LABEL) != service:
            continue
        slice_ports = sl.get("ports") or []
        target: int | None = None
        for sp in slice_ports:
            if port_name is not None and (sp.get("name") or "") == port_name:
                target = sp.get("port")
                break
        if target is None and port_name is None and len(slice_ports) == 1:
            target = slice_ports[0].get("port")
        if target is None:
            continue
        addr_type = str(sl.get("addressType", "IPv4"))
        for ep in sl.get("endpoints") or []:
            if (ep.get("conditions") or {}).get("ready") is False:
                continue  # nil means ready (EndpointSlice API)
            for addr in ep.get("addresses") or []:
                host = _local_host(str(addr), addr_type)
                if host is None:
                    refused.add(f"{service}:{addr}")
                    continue
                out.append(Endpoint(host=host, port=int(target)))
    return tuple(dict.fromkeys(out))


def build_table(
    namespace: str,
    routes: Iterable[Mapping[str, Any]],
    services: Iterable[Mapping[str, Any]],
    slices: Iterable[Mapping[str, Any]],
    *,
    version: int = 0,
    refused: set[str] | None = None,
) -> Table:
    """The routing snapshot for ``namespace`` from plain API dicts. Pure.

    ``refused`` collects endpoint addresses that were ignored because they are not local.
    """
    refused = refused if refused is not None else set()
    svc_by_name = {str(s["metadata"]["name"]): s for s in services}
    slice_list = list(slices)
    ordered = sorted(
        routes, key=lambda r: (str(r["metadata"].get("creationTimestamp") or ""), str(r["metadata"]["name"]))
    )
    acc: dict[str, tuple[str | None, list[str], list[Rule]]] = {}
    for route in ordered:
        name = str(route["metadata"]["name"])
        annotations = route["metadata"].get("annotations") or {}
        for parent in _service_parents(route, namespace):
            app_id, names, rules = acc.setdefault(parent, (None, [], []))
            names.append(name)
            rules.extend(_route_rules(route, namespace, parent))
            if app_id is None and annotations.get(APP_ID):
                acc[parent] = (str(annotations[APP_ID]), names, rules)
    parents = {
        p: ParentRoutes(parent=p, app_id=app_id or p, routes=tuple(names), rules=tuple(rules))
        for p, (app_id, names, rules) in acc.items()
    }
    endpoints: dict[tuple[str, int], tuple[Endpoint, ...]] = {}
    for pr in parents.values():
        for rule in pr.rules:
            for b in rule.backends:
                key = (b.service, b.port)
                if key not in endpoints:
                    endpoints[key] = _resolve_endpoints(b.service, b.port, svc_by_name, slice_list, refused)
    return Table(namespace=namespace, parents=parents, endpoints=endpoints, version=version)


def choose_backend(rule: Rule, rng: random.Random) -> Backend | None:
    """Weighted random choice; None when every weight is 0."""
    total = rule.total_weight
    if total <= 0:
        return None
    x = rng.random() * total
    acc = 0
    for b in rule.backends:
        if b.weight <= 0:
            continue
        acc += b.weight
        if x < acc:
            return b
    return next(b for b in reversed(rule.backends) if b.weight > 0)


# --------------------------------------------------------------------------- local backends


def local_backend_objects(
    service: str,
    ports: Iterable[int],
    *,
    service_port: int = 80,
    port_name: str = "http",
    labels: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A selector-less Service plus one EndpointSlice per local instance port.

    Each instance is an endpoint ``<service>-<i>.localhost`` (addressType FQDN; the apiserver
    refuses loopback IPs) that the demo data plane maps to 127.0.0.1:<port>.
    """
    extra = dict(labels or {})
    svc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service, "labels": {**extra, "app.kubernetes.io/managed-by": MANAGED_BY}},
        "spec": {"ports": [{"name": port_name, "port": service_port, "protocol": "TCP"}]},
    }
    slices: list[dict[str, Any]] = []
    for i, port in enumerate(ports):
        slices.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{service}-local-{i}",
                    "labels": {**extra, SERVICE_NAME_LABEL: service, MANAGED_BY_LABEL: MANAGED_BY},
                },
                "addressType": "FQDN",
                "ports": [{"name": port_name, "port": int(port), "protocol": "TCP"}],
                "endpoints": [{"addresses": [f"{service}-{i}.{LOCAL_DOMAIN}"], "conditions": {"ready": True}}],
            }
        )
    return svc, slices


async def apply_local_backend(
    api: client.ApiClient,
    namespace: str,
    service: str,
    ports: Iterable[int],
    *,
    service_port: int = 80,
    port_name: str = "http",
) -> None:
    """Create the EndpointSlices for local instances (replacing ours), and the Service if missing.

    An existing Service (e.g. from config/samples/whoami.yaml) is left as it is; its port named
    ``port_name`` is what the slices' port is matched with.
    """
    svc, slices = local_backend_objects(service, ports, service_port=service_port, port_name=port_name)
    body: Any = svc
    core = client.CoreV1Api(api)
    disc = client.DiscoveryV1Api(api)
    try:
        await core.create_namespaced_service(namespace, body)
    except ApiException as exc:
        if exc.status != 409:
            raise
    wanted = {s["metadata"]["name"] for s in slices}
    existing = await disc.list_namespaced_endpoint_slice(
        namespace, label_selector=f"{SERVICE_NAME_LABEL}={service},{MANAGED_BY_LABEL}={MANAGED_BY}"
    )
    for old in existing.items:
        if old.metadata.name not in wanted:
            await disc.delete_namespaced_endpoint_slice(old.metadata.name, namespace)
    for sl in slices:
        sl_body: Any = sl
        try:
            await disc.create_namespaced_endpoint_slice(namespace, sl_body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            await disc.replace_namespaced_endpoint_slice(sl["metadata"]["name"], namespace, sl_body)


# --------------------------------------------------------------------------- metrics


class _Histogram:
    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.bounds):
            if value <= b:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        acc = 0
        for b, c in zip(self.bounds, self.counts, strict=True):
            acc += c
            out.append((_fmt_le(b), float(acc)))
        out.append(("+Inf", float(self.count)))
        return out


def _fmt_le(b: float) -> str:
    return str(int(b)) if float(b).is_integer() else repr(float(b))


class DataPlaneStats(Collector):
    """Request counters in Envoy's and Dapr's shapes. Mutated only on the event loop."""

    def __init__(self) -> None:
        self.rq: Counter[tuple[str, str]] = Counter()
        self.rq_xx: Counter[tuple[str, str]] = Counter()
        self.rq_total: Counter[str] = Counter()
        self.rq_time: dict[str, _Histogram] = {}
        self.dapr_sent: Counter[tuple[str, str, str]] = Counter()
        self.dapr_recv: Counter[tuple[str, str, str, str]] = Counter()
        self.dapr_latency: dict[tuple[str, str, str], _Histogram] = {}

    def record(self, *, cluster: str | None, caller: str, app_id: str, status: int, elapsed_ms: float) -> None:
        self.dapr_sent[(caller, app_id, "unary")] += 1
        self.dapr_recv[(caller, app_id, str(status), "unary")] += 1
        self.dapr_latency.setdefault((caller, app_id, str(status)), _Histogram(DAPR_BUCKETS_MS)).observe(elapsed_ms)
        if cluster is None:
            return
        self.rq_total[cluster] += 1
        self.rq[(cluster, str(status))] += 1
        self.rq_xx[(cluster, str(status // 100))] += 1
        self.rq_time.setdefault(cluster, _Histogram(ENVOY_BUCKETS_MS)).observe(elapsed_ms)

    def collect(self) -> Iterator[Metric]:
        rq = UnknownMetricFamily(
            "envoy_cluster_upstream_rq",
            "Upstream responses by code",
            labels=["envoy_cluster_name", "envoy_response_code"],
        )
        for (c, code), v in sorted(self.rq.items()):
            rq.add_metric([c, code], v)
        yield rq
        xx = UnknownMetricFamily(
            "envoy_cluster_upstream_rq_xx",
            "Upstream responses by class",
            labels=["envoy_cluster_name", "envoy_response_code_class"],
        )
        for (c, cls), v in sorted(self.rq_xx.items()):
            xx.add_metric([c, cls], v)
        yield xx
        total = CounterMetricFamily(
            "envoy_cluster_upstream_rq_total", "Total upstream requests", labels=["envoy_cluster_name"]
        )
        for c, v in sorted(self.rq_total.items()):
            total.add_metric([c], v)
        yield total
        tm = HistogramMetricFamily(
            "envoy_cluster_upstream_rq_time", "Upstream request time (ms)", labels=["envoy_cluster_name"]
        )
        for c, h in sorted(self.rq_time.items()):
            tm.add_metric([c], h.cumulative(), h.sum)
        yield tm
        sent = CounterMetricFamily(
            "dapr_runtime_service_invocation_req_sent_total",
            "Service invocation requests sent",
            labels=["app_id", "dst_app_id", "type"],
        )
        for key, v in sorted(self.dapr_sent.items()):
            sent.add_metric(list(key), v)
        yield sent
        recv = CounterMetricFamily(
            "dapr_runtime_service_invocation_res_recv_total",
            "Service invocation responses received",
            labels=["app_id", "src_app_id", "status", "type"],
        )
        for key4, v in sorted(self.dapr_recv.items()):
            recv.add_metric(list(key4), v)
        yield recv
        lat = HistogramMetricFamily(
            "dapr_runtime_service_invocation_res_recv_latency_ms",
            "Service invocation response latency (ms)",
            labels=["app_id", "src_app_id", "status"],
        )
        for key3, h in sorted(self.dapr_latency.items()):
            lat.add_metric(list(key3), h.cumulative(), h.sum)
        yield lat


# --------------------------------------------------------------------------- the data plane


class DataPlane:
    """Serve the GAMMA routes of ``namespace`` on 127.0.0.1; see the module docstring."""

    def __init__(
        self,
        kubeconfig: str | None,
        namespace: str,
        *,
        listen: Mapping[str, int] | None = None,
        admin_port: int = 0,
        caller_app_id: str = "ingress",
        upstream_timeout_s: float = 15.0,
        seed: int | None = None,
        api: client.ApiClient | None = None,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self._listen = dict(listen) if listen is not None else None
        self._admin_port = admin_port
        self.caller_app_id = caller_app_id
        self.upstream_timeout_s = upstream_timeout_s
        self._rng = random.Random(seed)
        self._api = api
        self._own_api = api is None
        self.stats = DataPlaneStats()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.stats)
        self.table = Table(namespace=namespace)
        self.ports: dict[str, int] = {}
        self.admin_port = 0
        self._runners: dict[str, web.BaseRunner] = {}
        self._admin: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._informers: dict[str, Informer] = {}
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._rebuild_lock = asyncio.Lock()
        self._refused_logged: set[str] = set()
        self._version = 0

    # -- lifecycle

    async def start(self) -> None:
        """List everything, bind the listeners, start watching. Ready when it returns."""
        if self._api is None:
            self._api = await new_client(self.kubeconfig)
        api = self._api
        co = client.CustomObjectsApi(api)
        core = client.CoreV1Api(api)
        disc = client.DiscoveryV1Api(api)
        ns = self.namespace
        # The controller's own informers (list+watch, 410 relist); any change marks the table dirty.
        changed = lambda _key, _obj: self._dirty.set()  # noqa: E731
        self._informers = {
            "httproute": Informer(
                "httproute",
                raw_list(co.list_namespaced_custom_object),
                (GATEWAY_GROUP, GATEWAY_VERSION, ns, HTTPROUTES),
                on_change=changed,
                timeout_s=55,
            ),
            "service": Informer(
                "service", raw_list(core.list_namespaced_service), (ns,), on_change=changed, timeout_s=55
            ),
            "endpointslice": Informer(
                "endpointslice",
                raw_list(disc.list_namespaced_endpoint_slice),
                (ns,),
                on_change=changed,
                label_selector=SERVICE_NAME_LABEL,
                timeout_s=55,
            ),
        }
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, limit_per_host=64),
            timeout=aiohttp.ClientTimeout(total=self.upstream_timeout_s),
            auto_decompress=False,
        )
        self._stopping.clear()
        for name, inf in self._informers.items():
            self._tasks.append(asyncio.create_task(inf.run(), name=f"dataplane-watch-{name}"))
        try:
            await self._wait_synced()
            await self._rebuild()
            await self._start_admin()
            for parent, port in (self._listen or {}).items():
                await self._bind(parent, port)
        except BaseException:
            await self.stop()
            raise
        self._tasks.append(asyncio.create_task(self._rebuild_on_change(), name="dataplane-rebuild"))
        log.info(
            "dataplane_started",
            namespace=ns,
            admin_port=self.admin_port,
            listeners=self.ports,
            parents=sorted(self.table.parents),
        )

    async def stop(self) -> None:
        self._stopping.set()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        for runner in list(self._runners.values()):
            await runner.cleanup()
        self._runners.clear()
        if self._admin is not None:
            await self._admin.cleanup()
            self._admin = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._own_api and self._api is not None:
            await self._api.close()
            self._api = None

    async def __aenter__(self) -> DataPlane:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def url(self, parent: str) -> str:
        return f"http://{LOOPBACK}:{self.ports[parent]}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}/metrics"

    # -- table

    async def _wait_synced(self) -> None:
        """Until every informer has listed once; an informer that fails (e.g. forbidden) raises."""
        synced: asyncio.Future[Any] = asyncio.gather(*(inf.synced.wait() for inf in self._informers.values()))
        waiting: list[asyncio.Future[Any]] = [synced, *self._tasks]
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not synced:
                t.result()
        synced.cancel()
        self._dirty.clear()

    async def _rebuild_on_change(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await self._rebuild()

    async def _rebuild(self) -> None:
        async with self._rebuild_lock:
            by_kind = {kind: {key[1]: obj for key, obj in inf.cache.items()} for kind, inf in self._informers.items()}
            refused: set[str] = set()
            self._version += 1
            table = build_table(
                self.namespace,
                by_kind["httproute"].values(),
                by_kind["service"].values(),
                by_kind["endpointslice"].values(),
                version=self._version,
                refused=refused,
            )
            old = self.table
            self.table = table  # the one atomic swap; requests read self.table once
            for r in refused - self._refused_logged:
                log.warning(
                    "endpoint_not_local_ignored",
                    endpoint=r,
                    hint="the demo data plane only sends to *.localhost / 127.0.0.1",
                )
            self._refused_logged |= refused
            if _weights(old) != _weights(table):
                log.info("routes_changed", version=table.version, weights=_weights(table))
            if self._listen is None:
                for parent in table.parents:
                    if parent not in self._runners and self._session is not None:
                        await self._bind(parent, 0)

    # -- listeners

    async def _bind(self, parent: str, port: int) -> None:
        server = web.Server(partial(self._handle, parent), access_log=None)
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, LOOPBACK, port, reuse_address=True)
        await site.start()
        self._runners[parent] = runner
        self.ports[parent] = _bound_port(runner)
        log.info("listener_bound", parent=parent, port=self.ports[parent])

    async def _start_admin(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/routes", self._routes)
        app.router.add_get("/healthz", self._healthz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, LOOPBACK, self._admin_port, reuse_address=True).start()
        self._admin = runner
        self.admin_port = _bound_port(runner)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _routes(self, request: web.Request) -> web.Response:
        return web.json_response({"namespace": self.namespace, "listeners": self.ports, **self.table.to_json()})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    # -- proxy

    async def _handle(self, parent: str, request: web.BaseRequest) -> web.StreamResponse:
        began = time.monotonic()
        table = self.table  # read once: one request, one table
        routes = table.parents.get(parent)
        caller = request.headers.get(CALLER_HEADER, self.caller_app_id)
        app_id = routes.app_id if routes is not None else parent
        rule = routes.rule_for(request.path) if routes is not None else None
        if rule is None:
            self.stats.record(cluster=None, caller=caller, app_id=app_id, status=404, elapsed_ms=_ms(began))
            return web.Response(status=404, text="route not found\n")
        backend = choose_backend(rule, self._rng)
        if backend is None:
            self.stats.record(cluster=None, caller=caller, app_id=app_id, status=500, elapsed_ms=_ms(began))
            return web.Response(status=500, text="no backend with weight > 0\n")
        body = await request.read()
        status, headers, payload = await self._forward(
            request, body, table.endpoints.get((backend.service, backend.port), ())
        )
        elapsed = _ms(began)
        self.stats.record(cluster=backend.cluster, caller=caller, app_id=app_id, status=status, elapsed_ms=elapsed)
        headers[BACKEND_HEADER] = backend.service
        headers["x-envoy-upstream-service-time"] = str(int(elapsed))
        return web.Response(status=status, headers=headers, body=payload)

    async def _forward(
        self,
        request: web.BaseRequest,
        body: bytes,
        endpoints: tuple[Endpoint, ...],
    ) -> tuple[int, CIMultiDict[str], bytes]:
        if not endpoints:
            return 503, CIMultiDict(), b"no healthy upstream"
        session = self._session
        assert session is not None, "start() first"
        first = self._rng.choice(endpoints)
        others = [e for e in endpoints if e != first]
        attempts = [first, self._rng.choice(others) if others else first]
        fwd = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP)
        peer = request.remote or ""
        prior = fwd.get("x-forwarded-for")
        fwd["x-forwarded-for"] = f"{prior}, {peer}" if prior else peer
        fwd["x-forwarded-proto"] = "http"
        fwd.setdefault("x-request-id", str(uuid.uuid4()))
        last: str = ""
        for i, ep in enumerate(attempts):  # bounded: at most two attempts
            url = f"http://{ep.host}:{ep.port}{request.raw_path}"
            try:
                async with session.request(
                    request.method, url, headers=fwd, data=body or None, allow_redirects=False
                ) as resp:
                    payload = await resp.read()
                    out = CIMultiDict((k, v) for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP)
                    return resp.status, out, payload
            except aiohttp.ClientConnectorError as exc:
                last = f"connect {ep.host}:{ep.port}: {exc.os_error!r}"
            except aiohttp.ServerDisconnectedError as exc:
                last = f"disconnected by {ep.host}:{ep.port}: {exc!r}"
                if request.method not in _IDEMPOTENT:
                    break
            except TimeoutError:
                return 504, CIMultiDict(), b"upstream request timeout"
            except aiohttp.ClientError as exc:
                last = f"{ep.host}:{ep.port}: {exc!r}"
                break
            log.debug("upstream_retry" if i == 0 else "upstream_failed", error=last)
        log.warning("upstream_unavailable", error=last)
        msg = f"upstream connect error or disconnect/reset before headers. {last}"
        return 503, CIMultiDict(), msg.encode()


def _ms(began: float) -> float:
    return (time.monotonic() - began) * 1000.0


def _weights(table: Table) -> dict[str, list[list[tuple[str, int]]]]:
    return {p: [[(b.service, b.weight) for b in r.backends] for r in pr.rules] for p, pr in table.parents.items()}


def _bound_port(runner: web.BaseRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    raise RuntimeError("server is not listening on a TCP port")


# --------------------------------------------------------------------------- main


def _parse_listen(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        name, sep, port = item.partition("=")
        if not sep or not name or not port.isdigit():
            raise ValueError(f"--listen {item!r}: write <service>=<port>, e.g. whoami=18080 (0 = free)")
        out[name] = int(port)
    return out


async def _serve(dp: DataPlane) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await dp.start()
    print(
        json.dumps(
            {"event": "dataplane_ready", "namespace": dp.namespace, "admin_port": dp.admin_port, "listeners": dp.ports}
        ),
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await dp.stop()


def main(argv: list[str] | None = None) -> int:
    from devkit.demo.whoami import configure_logging

    p = argparse.ArgumentParser(prog="python -m devkit.demo.dataplane", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--kubeconfig", default=None)
    p.add_argument("--namespace", required=True)
    p.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="SERVICE=PORT",
        help="serve this parent Service on 127.0.0.1:PORT (0 = free); repeatable. "
        "Without it every parent Service gets a free port.",
    )
    p.add_argument("--admin-port", type=int, default=0, help="/metrics, /routes (0 = free)")
    p.add_argument(
        "--caller-app-id", default="ingress", help=f"Dapr app_id of callers without a {CALLER_HEADER} header"
    )
    p.add_argument("--seed", type=int, default=None, help="seed the weighted choice")
    args = p.parse_args(argv)
    try:
        listen = _parse_listen(args.listen) if args.listen else None
    except ValueError as exc:
        p.error(str(exc))
    configure_logging()
    dp = DataPlane(
        args.kubeconfig,
        args.namespace,
        listen=listen,
        admin_port=args.admin_port,
        caller_app_id=args.caller_app_id,
        seed=args.seed,
    )
    asyncio.run(_serve(dp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
