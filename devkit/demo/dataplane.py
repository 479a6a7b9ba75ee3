"""A local data plane: what Cilium's Envoy does for GAMMA routes and a Gateway, locally.

Reads (list + watch with resourceVersion, re-list on 410 Gone; canaryd's own ``Informer``) in one
namespace:

* HTTPRoutes (gateway.networking.k8s.io/v1) whose parentRef is a Service (``{group: "", kind:
  Service}``, GAMMA) or a Gateway (``kind: Gateway``, the default);
* Gateways, for their ``spec.listeners`` (protocol HTTP);
* Services (to map a backendRef port to the EndpointSlice port by port name);
* EndpointSlices labelled ``kubernetes.io/service-name`` — the backends' endpoints;
* Pods, for the pod runner (``run_pods``, on by default).

**Endpoints.** Two kinds of slice address are served, nothing else (ignored, logged once): this
data plane never sends traffic off the host.

* *Pods.* With kwok, Deployments get Pods that are Running/Ready with Pod IPs (10.244.x.y) and the
  real EndpointSlice controller publishes those IPs — but no process listens on them. The pod
  runner (``devkit.demo.podrunner``) starts one local ``python -m devkit.demo.whoami`` per whoami
  Pod on a Node (``pod_node`` narrows it to one), with the container's ``--name``, the Pod's name
  as Hostname and the Pod's IP, on a free local port, and stops it when the Pod goes. A slice
  endpoint ``(podIP, port)`` goes to that process when ``port`` is the container's ``--port``
  (what the process stands for); for another port the connection is refused, exactly what the
  seed's bad release does on a cluster (``--port=8080`` behind a Service port targeting 80:
  every request it gets is a 503 upstream connect error). While a Pod's process starts, its
  endpoint is left out (not ready yet, as a readiness probe would have it).
* *Local FQDN endpoints.* The apiserver refuses loopback addresses in EndpointSlices of
  addressType IPv4/IPv6 ("may not be in the loopback range"), so a local process that is not a
  Pod (e.g. a daprd) sits behind a selector-less Service whose EndpointSlice has ``addressType:
  FQDN`` and an address under the reserved ``.localhost`` domain (RFC 6761), e.g.
  ``whoami-v1-0.localhost``; the data plane maps those to 127.0.0.1 itself (no DNS). Loopback IPs
  are accepted too. ``local_backend_objects()`` builds such objects, ``apply_local_backend()`` /
  ``apply_local_daprd()`` create them.

**Listeners.** All on 127.0.0.1. One per GAMMA parent Service: ``listen={"whoami": 18080}`` binds
those at ``start()`` (port 0 = a free port; read ``ports``), parents not in the mapping are not
served; ``listen=None`` binds a free port for every parent Service as it appears. One per HTTP
listener of a Gateway, keyed ``"<gateway>/<listener>"`` (``default-gateway/http``), likewise with
``gateway_listen`` (read ``gateway_ports``). The admin listener serves ``/metrics``, ``/routes``
(JSON: listeners, pods, the routing table) and ``/healthz``.

**Routing.** For a request on a parent: among the rules of its HTTPRoutes (routes ordered by
creation time, then name) the rule with the longest matching ``PathPrefix`` wins (a rule without
matches matches ``/``; other match types are ignored; hostnames are not matched); ties go to the
first. A rule's URLRewrite filter is applied: ``path`` ReplacePrefixMatch / ReplaceFullPath exactly
as the Gateway API specifies (``devkit.demo.gateway.rewrite_path``), ``hostname`` as the Host
header. A backendRef is chosen by weighted random (weight 0 = no traffic; default weight 1). All
weights 0 → 500; no rule → 404; chosen backend without ready endpoints → 503 for its share (as
Envoy's "no healthy upstream"). The routing table is an immutable snapshot swapped on every watch
event and read once per request, so a weight change never splits one request across two tables.
A connection error is retried once on another ready endpoint of the same backend (the same one if
it is alone); still failing → 503 "upstream connect error …". Every answer carries
``x-canaryd-backend: <service>`` when a backend was chosen — the innermost one: an answer that
comes back through the Gateway, the daprds and the GAMMA split names the version that served it.

**Metrics** (``/metrics``), per request — not per attempt:

* Envoy, byte for byte as Cilium's Envoy writes ``/stats/prometheus`` for these series
  (``devkit.demo.envoy_stats``, golden test tests/unit/test_envoy_exposition.py):
  ``envoy_cluster_upstream_rq{envoy_response_code, envoy_cluster_name}``,
  ``envoy_cluster_upstream_rq_total{envoy_cluster_name}`` (requests sent on a connection),
  ``envoy_cluster_upstream_rq_xx{envoy_response_code_class, envoy_cluster_name}``,
  ``envoy_cluster_upstream_rq_time_bucket/_sum/_count{envoy_cluster_name, le}`` (ms, upstream
  answers only), with ``envoy_cluster_name = "<ns>/<parent>/<ns>_<svc>_<port>"`` — ``<parent>``
  is the parent Service, or ``cilium-gateway-<gateway>`` for a Gateway route. A cluster's series
  exist (zero) from the moment a route names the backend, as Envoy's do.
* Optional (``dapr_metrics``, on by default; off once real daprds produce Dapr's own series): an
  *imitation* of a shared Dapr sidecar calling the parent Service —
  ``dapr_runtime_service_invocation_req_sent_total{app_id, dst_app_id, type}``,
  ``..._res_recv_total{app_id, src_app_id, status, type}``,
  ``..._res_recv_latency_ms_bucket/_sum/_count{app_id, src_app_id, status, le}``.
  ``app_id`` = the request header ``dapr-caller-app-id``, else ``caller_app_id`` (default
  ``ingress``); ``dst_app_id``/``src_app_id`` = the route's ``canaryd.io/app-id`` annotation, else
  the parent Service name; ``type="unary"``. Dapr sees every version of the service together
  (the split happens after it); a locally generated 503 is a response too. Gateway traffic is not
  imitated (a real ingress daprd is behind the Gateway).

Run: ``python -m devkit.demo.dataplane --kubeconfig K --namespace N [--listen whoami=0]
[--gateway-listen default-gateway/http=0] [--admin-port 0] [--pod-node kwok-node-0]
[--no-run-pods] [--no-dapr-metrics]``; prints ``{"event": "dataplane_ready", "admin_port": ..,
"listeners": {..}, "gateway_listeners": {..}}`` on stdout once the first lists are applied, every
listener is bound and the first Pods' processes are up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from canaryd.kube import GATEWAY_GROUP, GATEWAY_VERSION, HTTPROUTES, new_client
from canaryd.kube.informer import Informer
from canaryd.kube.informer import raw as raw_list
from devkit.demo import envoy_stats
from devkit.demo.envoy_stats import EnvoyStats, cluster_name
from devkit.demo.gateway import GATEWAYS, rewrite_path
from devkit.demo.podrunner import PodRunner, gone_addresses, wanted_instances
from devkit.demo.routing import (
    LOOPBACK,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    SERVICE_NAME_LABEL,
    Endpoint,
    Table,
    build_table,
    choose_backend,
    local_backend_objects,
)

__all__ = [
    "DaprImitation",
    "DataPlane",
    "apply_local_backend",
    "apply_local_daprd",
    "build_table",
    "choose_backend",
    "cluster_name",
    "local_backend_objects",
]

log = structlog.get_logger("devkit.demo.dataplane")

BACKEND_HEADER = "x-canaryd-backend"
CALLER_HEADER = "dapr-caller-app-id"
SERVICE, GATEWAY = "service", "gateway"

# Dapr's default latency distribution (ms).
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
_CONNECT_ERROR = "upstream connect error or disconnect/reset before headers. "
_REFUSED = "remote connection failure, transport failure reason: delayed connect error: Connection refused"


# --------------------------------------------------------------------------- local backends


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


async def apply_local_daprd(
    api: client.ApiClient,
    namespace: str,
    http_port: int,
    *,
    service: str = "ingress-dapr",
    service_port: int = 3500,
    port_name: str = "dapr-http",
) -> None:
    """Put a local daprd's HTTP API (``http_port`` on 127.0.0.1) behind ``service:service_port``,
    the backend of the seed's ingress route. An existing Service must name that port ``port_name``."""
    await apply_local_backend(api, namespace, service, [http_port], service_port=service_port, port_name=port_name)


# --------------------------------------------------------------------------- the Dapr imitation


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


class DaprImitation(Collector):
    """A shared daprd's service-invocation series, imitated. Mutated only on the event loop."""

    def __init__(self) -> None:
        self.sent: Counter[tuple[str, str, str]] = Counter()
        self.recv: Counter[tuple[str, str, str, str]] = Counter()
        self.latency: dict[tuple[str, str, str], _Histogram] = {}

    def record(self, *, caller: str, app_id: str, status: int, elapsed_ms: float) -> None:
        self.sent[(caller, app_id, "unary")] += 1
        self.recv[(caller, app_id, str(status), "unary")] += 1
        self.latency.setdefault((caller, app_id, str(status)), _Histogram(DAPR_BUCKETS_MS)).observe(elapsed_ms)

    def collect(self) -> Iterator[Metric]:
        sent = CounterMetricFamily(
            "dapr_runtime_service_invocation_req_sent_total",
            "Service invocation requests sent",
            labels=["app_id", "dst_app_id", "type"],
        )
        for key, v in sorted(self.sent.items()):
            sent.add_metric(list(key), v)
        yield sent
        recv = CounterMetricFamily(
            "dapr_runtime_service_invocation_res_recv_total",
            "Service invocation responses received",
            labels=["app_id", "src_app_id", "status", "type"],
        )
        for key4, v in sorted(self.recv.items()):
            recv.add_metric(list(key4), v)
        yield recv
        lat = HistogramMetricFamily(
            "dapr_runtime_service_invocation_res_recv_latency_ms",
            "Service invocation response latency (ms)",
            labels=["app_id", "src_app_id", "status"],
        )
        for key3, h in sorted(self.latency.items()):
            lat.add_metric(list(key3), h.cumulative(), h.sum)
        yield lat


# --------------------------------------------------------------------------- the data plane


@dataclass
class Upstream:
    """The answer to one proxied request, and what Envoy would charge for it."""

    status: int
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: bytes = b""
    sent: bool = False  # went out on an upstream connection (upstream_rq_total)
    upstream_ms: int | None = None  # the upstream answered after this long (upstream_rq_time)
    error: str | None = None  # why no upstream answered

    @classmethod
    def local(cls, status: int, text: str, *, sent: bool = False, error: str | None = None) -> Upstream:
        return cls(status, CIMultiDict({"content-type": "text/plain"}), text.encode(), sent=sent, error=error)


class _Refused(Exception):
    """Connecting to a Pod IP on a port its process does not stand for."""


class DataPlane:
    """Serve the routes of ``namespace`` on 127.0.0.1; see the module docstring."""

    def __init__(
        self,
        kubeconfig: str | None,
        namespace: str,
        *,
        listen: Mapping[str, int] | None = None,
        gateway_listen: Mapping[str, int] | None = None,
        admin_port: int = 0,
        caller_app_id: str = "ingress",
        upstream_timeout_s: float = 15.0,
        seed: int | None = None,
        run_pods: bool = True,
        pod_node: str | None = None,
        pod_log_dir: Path | None = None,
        dapr_metrics: bool = True,
        api: client.ApiClient | None = None,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self._listen = dict(listen) if listen is not None else None
        self._gateway_listen = dict(gateway_listen) if gateway_listen is not None else None
        self._admin_port = admin_port
        self.caller_app_id = caller_app_id
        self.upstream_timeout_s = upstream_timeout_s
        self.pod_node = pod_node
        self._rng = random.Random(seed)
        self._api = api
        self._own_api = api is None
        self.envoy = EnvoyStats()
        self.dapr = DaprImitation() if dapr_metrics else None
        self.registry = CollectorRegistry(auto_describe=False)
        if self.dapr is not None:
            self.registry.register(self.dapr)
        self.pods = PodRunner(on_change=self._mark_dirty, log_dir=pod_log_dir) if run_pods else None
        self.table = Table(namespace=namespace)
        self.ports: dict[str, int] = {}
        self.gateway_ports: dict[str, int] = {}
        self.admin_port = 0
        self._runners: dict[tuple[str, str], web.BaseRunner] = {}
        self._admin: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._informers: dict[str, Informer] = {}
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._rebuild_lock = asyncio.Lock()
        self._refused_logged: set[str] = set()
        self._unavailable_logged: set[tuple[str, str]] = set()
        self._version = 0

    # -- lifecycle

    async def start(self) -> None:
        """List everything, bind the listeners, start watching. Ready when it returns."""
        if self._api is None:
            self._api = await new_client(self.kubeconfig)
        self._informers = self._make_informers(self._api)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, limit_per_host=64),
            timeout=aiohttp.ClientTimeout(total=self.upstream_timeout_s),
            auto_decompress=False,
        )
        for name, inf in self._informers.items():
            self._tasks.append(asyncio.create_task(inf.run(), name=f"dataplane-watch-{name}"))
        try:
            await self._wait_synced()
            await self._rebuild()
            await self._start_admin()
            for parent, port in (self._listen or {}).items():
                await self._bind(SERVICE, parent, port)
            for key, port in (self._gateway_listen or {}).items():
                await self._bind(GATEWAY, key, port)
            if self.pods is not None:
                await self.pods.settled()
                await self._rebuild()
        except BaseException:
            await self.stop()
            raise
        self._tasks.append(asyncio.create_task(self._rebuild_on_change(), name="dataplane-rebuild"))
        log.info(
            "dataplane_started",
            namespace=self.namespace,
            admin_port=self.admin_port,
            listeners=self.ports,
            gateway_listeners=self.gateway_ports,
            parents=sorted(self.table.parents),
            pods=sorted(self.pods.pids()) if self.pods is not None else None,
        )

    def _make_informers(self, api: client.ApiClient) -> dict[str, Informer]:
        """The controller's own informers (list+watch, 410 relist); any change marks the table dirty."""
        co, core, disc = client.CustomObjectsApi(api), client.CoreV1Api(api), client.DiscoveryV1Api(api)
        ns = self.namespace
        changed = lambda _key, _obj: self._dirty.set()  # noqa: E731
        kinds: dict[str, tuple[Any, tuple[Any, ...], str | None]] = {
            "httproute": (co.list_namespaced_custom_object, (GATEWAY_GROUP, GATEWAY_VERSION, ns, HTTPROUTES), None),
            "gateway": (co.list_namespaced_custom_object, (GATEWAY_GROUP, GATEWAY_VERSION, ns, GATEWAYS), None),
            "service": (core.list_namespaced_service, (ns,), None),
            "endpointslice": (disc.list_namespaced_endpoint_slice, (ns,), SERVICE_NAME_LABEL),
        }
        if self.pods is not None:
            kinds["pod"] = (core.list_namespaced_pod, (ns,), None)
        return {
            kind: Informer(kind, raw_list(fn), args, on_change=changed, label_selector=sel, timeout_s=55)
            for kind, (fn, args, sel) in kinds.items()
        }

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self.pods is not None:
            await self.pods.stop()
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

    def gateway_url(self, gateway: str, listener: str = "http") -> str:
        return f"http://{LOOPBACK}:{self.gateway_ports[f'{gateway}/{listener}']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}/metrics"

    # -- table

    def _mark_dirty(self) -> None:
        self._dirty.set()

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
            by_kind = {kind: [obj for obj in inf.cache.values()] for kind, inf in self._informers.items()}
            pods = None
            if self.pods is not None:
                self.pods.reconcile(wanted_instances(by_kind["pod"], node=self.pod_node))
                pods = {**gone_addresses(by_kind["pod"]), **self.pods.addresses()}
            refused: set[str] = set()
            self._version += 1
            table = build_table(
                self.namespace,
                by_kind["httproute"],
                by_kind["service"],
                by_kind["endpointslice"],
                gateways=by_kind["gateway"],
                pods=pods,
                version=self._version,
                refused=refused,
            )
            old = self.table
            self.table = table  # the one atomic swap; requests read self.table once
            self.envoy.ensure(table.clusters())
            self._log_changes(old, table, refused)
            await self._bind_new(table)

    def _log_changes(self, old: Table, table: Table, refused: set[str]) -> None:
        for r in refused - self._refused_logged:
            log.warning(
                "endpoint_not_local_ignored",
                endpoint=r,
                hint="the demo data plane only sends to *.localhost, 127.0.0.1 and the Pods its pod runner runs",
            )
        self._refused_logged |= refused
        if _weights(old) != _weights(table):
            log.info("routes_changed", version=table.version, weights=_weights(table))

    async def _bind_new(self, table: Table) -> None:
        if self._session is None:
            return
        if self._listen is None:
            for parent in table.parents:
                if (SERVICE, parent) not in self._runners:
                    await self._bind(SERVICE, parent, 0)
        if self._gateway_listen is None:
            for key in table.gateway_listeners:
                if (GATEWAY, key) not in self._runners:
                    await self._bind(GATEWAY, key, 0)

    # -- listeners

    async def _bind(self, kind: str, key: str, port: int) -> None:
        server = web.Server(partial(self._handle, kind, key), access_log=None)
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, LOOPBACK, port, reuse_address=True)
        await site.start()
        self._runners[(kind, key)] = runner
        ports = self.ports if kind == SERVICE else self.gateway_ports
        ports[key] = _bound_port(runner)
        log.info("listener_bound", kind=kind, parent=key, port=ports[key])

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

    def exposition(self) -> bytes:
        """``/metrics``: Envoy's text, then (when imitated) Dapr's."""
        body = self.envoy.render().encode()
        if self.dapr is not None:
            body += generate_latest(self.registry)
        return body

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.exposition(), headers={"Content-Type": envoy_stats.CONTENT_TYPE})

    async def _routes(self, request: web.Request) -> web.Response:
        pods = self.pods.addresses() if self.pods is not None else {}
        return web.json_response(
            {
                "namespace": self.namespace,
                "listeners": self.ports,
                "gateway_listeners": self.gateway_ports,
                "pods": {a.pod: {"ip": ip, "port": a.port, "local_port": a.local_port} for ip, a in pods.items()},
                **self.table.to_json(),
            }
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    # -- proxy

    async def _handle(self, kind: str, key: str, request: web.BaseRequest) -> web.StreamResponse:
        began = time.monotonic()
        table = self.table  # read once: one request, one table
        routes = (table.parents if kind == SERVICE else table.listeners).get(key)
        caller = request.headers.get(CALLER_HEADER, self.caller_app_id)
        app_id = routes.app_id if routes is not None else key
        dapr = self.dapr if kind == SERVICE else None
        path = request.rel_url.raw_path
        match = routes.match(path) if routes is not None else None
        if match is None:
            return _answer(dapr, caller, app_id, began, Upstream.local(404, "route not found\n"))
        rule, prefix = match
        backend = choose_backend(rule, self._rng)
        if backend is None:
            return _answer(dapr, caller, app_id, began, Upstream.local(500, "no backend with weight > 0\n"))
        body = await request.read()
        target = rewrite_path(path, prefix, rule.rewrite) + _query(request)
        up = await self._forward(
            request, body, target, rule.hostname, table.endpoints.get((backend.service, backend.port), ())
        )
        self.envoy.cluster(backend.cluster).charge(up.status, sent=up.sent, upstream_ms=up.upstream_ms)
        if up.error is not None:
            self._log_unavailable(backend.cluster, up.error)
        # The innermost choice wins: through the Gateway, the answer already names the version the
        # GAMMA split chose behind the daprds; the Gateway hop (ingress-dapr) is not the news.
        up.headers.setdefault(BACKEND_HEADER, backend.service)
        if up.upstream_ms is not None:
            up.headers["x-envoy-upstream-service-time"] = str(up.upstream_ms)
        return _answer(dapr, caller, app_id, began, up)

    def _log_unavailable(self, cluster: str, error: str) -> None:
        """Once per cluster and cause at warning (the seed's bad release fails every request)."""
        first = (cluster, error) not in self._unavailable_logged
        self._unavailable_logged.add((cluster, error))
        (log.warning if first else log.debug)("upstream_unavailable", cluster=cluster, error=error)

    def _upstream_headers(self, request: web.BaseRequest, hostname: str | None) -> CIMultiDict[str]:
        fwd = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP)
        peer = request.remote or ""
        prior = fwd.get("x-forwarded-for")
        fwd["x-forwarded-for"] = f"{prior}, {peer}" if prior else peer
        fwd["x-forwarded-proto"] = "http"
        fwd.setdefault("x-request-id", str(uuid.uuid4()))
        if hostname:
            fwd["Host"] = hostname
        return fwd

    async def _forward(
        self,
        request: web.BaseRequest,
        body: bytes,
        target: str,
        hostname: str | None,
        endpoints: tuple[Endpoint, ...],
    ) -> Upstream:
        if not endpoints:
            return Upstream.local(503, "no healthy upstream")
        first = self._rng.choice(endpoints)
        others = [e for e in endpoints if e != first]
        attempts = [first, self._rng.choice(others) if others else first]
        fwd = self._upstream_headers(request, hostname)
        last, sent = "", False
        for i, ep in enumerate(attempts):  # bounded: at most two attempts
            try:
                return await self._send(request.method, ep, target, fwd, body)
            except _Refused as exc:
                last = str(exc)
            except aiohttp.ClientConnectorError as exc:
                last = _REFUSED if isinstance(exc.os_error, ConnectionRefusedError) else f"connection failure: {exc}"
            except aiohttp.ServerDisconnectedError as exc:
                last, sent = f"connection termination ({exc!r})", True
                if request.method not in _IDEMPOTENT:
                    break
            except TimeoutError:
                return Upstream.local(504, "upstream request timeout", sent=True)
            except aiohttp.ClientError as exc:
                last = f"{ep.host}:{ep.port}: {exc!r}"
                break
            log.debug("upstream_retry" if i == 0 else "upstream_failed", endpoint=ep.describe(), error=last)
        text = f"{_CONNECT_ERROR}retried and the latest reset reason: {last}"
        return Upstream.local(503, text, sent=sent, error=last)

    async def _send(self, method: str, ep: Endpoint, target: str, headers: CIMultiDict[str], body: bytes) -> Upstream:
        if ep.refused:
            raise _Refused(_REFUSED)
        session = self._session
        assert session is not None, "start() first"
        began = time.monotonic()
        url = f"http://{ep.host}:{ep.port}{target}"
        async with session.request(method, url, headers=headers, data=body or None, allow_redirects=False) as resp:
            payload = await resp.read()
            out = CIMultiDict((k, v) for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP)
            elapsed = int((time.monotonic() - began) * 1000.0)  # whole ms, as Envoy records it
            return Upstream(resp.status, out, payload, sent=True, upstream_ms=elapsed)


def _answer(dapr: DaprImitation | None, caller: str, app_id: str, began: float, up: Upstream) -> web.Response:
    if dapr is not None:
        dapr.record(caller=caller, app_id=app_id, status=up.status, elapsed_ms=(time.monotonic() - began) * 1000.0)
    return web.Response(status=up.status, headers=up.headers, body=up.body)


def _query(request: web.BaseRequest) -> str:
    qs = request.rel_url.raw_query_string
    return f"?{qs}" if qs else ""


def _weights(table: Table) -> dict[str, list[list[tuple[str, int]]]]:
    parents = {**table.parents, **table.listeners}
    return {p: [[(b.service, b.weight) for b in r.backends] for r in pr.rules] for p, pr in parents.items()}


def _bound_port(runner: web.BaseRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    raise RuntimeError("server is not listening on a TCP port")


# --------------------------------------------------------------------------- main


def _parse_ports(items: list[str], flag: str, example: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        name, sep, port = item.partition("=")
        if not sep or not name or not port.isdigit():
            raise ValueError(f"{flag} {item!r}: write <name>=<port>, e.g. {example} (0 = free)")
        out[name] = int(port)
    return out


async def _serve(dp: DataPlane) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await dp.start()
    ready = {
        "event": "dataplane_ready",
        "namespace": dp.namespace,
        "admin_port": dp.admin_port,
        "listeners": dp.ports,
        "gateway_listeners": dp.gateway_ports,
    }
    print(json.dumps(ready), flush=True)
    try:
        await stop.wait()
    finally:
        await dp.stop()


def _parser() -> argparse.ArgumentParser:
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
    p.add_argument(
        "--gateway-listen",
        action="append",
        default=[],
        metavar="GATEWAY/LISTENER=PORT",
        help="serve this Gateway listener on 127.0.0.1:PORT (0 = free); repeatable. "
        "Without it every HTTP listener of every Gateway gets a free port.",
    )
    p.add_argument("--admin-port", type=int, default=0, help="/metrics, /routes (0 = free)")
    p.add_argument(
        "--caller-app-id", default="ingress", help=f"Dapr app_id of callers without a {CALLER_HEADER} header"
    )
    p.add_argument("--seed", type=int, default=None, help="seed the weighted choice")
    p.add_argument(
        "--run-pods",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run a local whoami process for every whoami Pod (default: on)",
    )
    p.add_argument("--pod-node", default=None, help="only Pods bound to this Node (default: any Node)")
    p.add_argument("--pod-log-dir", type=Path, default=None, help="stderr of the Pods' processes (pod-<name>.log)")
    p.add_argument(
        "--dapr-metrics",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="imitate a shared daprd's service-invocation metrics (default: on; off with real daprds)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from devkit.demo.whoami import configure_logging

    p = _parser()
    args = p.parse_args(argv)
    try:
        listen = _parse_ports(args.listen, "--listen", "whoami=18080") if args.listen else None
        gateway_listen = (
            _parse_ports(args.gateway_listen, "--gateway-listen", "default-gateway/http=18000")
            if args.gateway_listen
            else None
        )
    except ValueError as exc:
        p.error(str(exc))
    configure_logging()
    dp = DataPlane(
        args.kubeconfig,
        args.namespace,
        listen=listen,
        gateway_listen=gateway_listen,
        admin_port=args.admin_port,
        caller_app_id=args.caller_app_id,
        seed=args.seed,
        run_pods=args.run_pods,
        pod_node=args.pod_node,
        pod_log_dir=args.pod_log_dir,
        dapr_metrics=args.dapr_metrics,
    )
    asyncio.run(_serve(dp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
